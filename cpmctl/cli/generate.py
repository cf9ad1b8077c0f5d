"""`cpmctl generate`: beam search, sampling or greedy decoding with the original's defaults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cpmctl import CpmctlError
from cpmctl.cli.common import emit_json, err, out, require_file
from cpmctl.device import resolve_device, resolve_dtype
from cpmctl.generate.decode import GenerationConfig, encode_prompt, generate as run_generation
from cpmctl.model.checkpoint import find_vocab
from cpmctl.generate.offload import describe_plan, load_for_generation
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.model.lora import load_model_with_adapter


def read_prompts(path: Path) -> list[str]:
    prompts = []
    stream = sys.stdin if str(path) == "-" else open(require_file(path, "input file"), encoding="utf-8")
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CpmctlError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise CpmctlError(f"{path}:{n}: expected an object with a string field 'prompt'")
            prompts.append(obj["prompt"])
    if not prompts:
        raise CpmctlError(f"{path}: no prompts")
    return prompts


def generate(
    prompt: str = typer.Argument(None, help="Text to continue ('-' reads it from stdin)."),
    model_path: Path = typer.Option(..., "--model", help="Checkpoint: native dir, original .pt (config .json beside) or HF dir."),
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter directory (from `cpmctl tune lora`), unmerged."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint)."),
    decode: str = typer.Option("beam", "--decode", help="beam, sample or greedy."),
    beam_size: int = typer.Option(3, "--beam-size"),
    top_k: int = typer.Option(0, "--top-k", help="Sampling: keep the k best tokens (0 = off)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Sampling: nucleus mass."),
    temperature: float = typer.Option(0.9, "--temperature"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="CTRL penalty on generated tokens (>= 1)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens"),
    seed: int = typer.Option(None, "--seed", help="Sampling seed."),
    input_file: Path = typer.Option(None, "--input", help='JSONL file of {"prompt": ...} lines (batched).'),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts decoded together from --input."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (GPU)."),
    memory_limit: float = typer.Option(None, "--memory-limit", help="GB (10^9 bytes) of device memory for weights, "
                                       "KV cache and activations; blocks that do not fit stream (docs/memory.md)."),
    quantize: str = typer.Option(None, "--quantize", help="int8: weight-only int8 linears (per-channel scales)."),
    json_out: bool = typer.Option(False, "--json", help='One {"prompt", "text", "token_ids"} object per prompt.'),
):
    """Generate text from a prompt or a JSONL file of prompts, as the original CPM-Live code would."""
    cfg = GenerationConfig(decode, beam_size, top_k, top_p, temperature, repetition_penalty, max_new_tokens, seed)
    cfg.validate()
    if (prompt is None) == (input_file is None):
        raise CpmctlError("give a PROMPT or --input FILE.jsonl (one of them)")
    if prompt == "-":
        prompt = sys.stdin.read()
    prompts = read_prompts(input_file) if input_file is not None else [prompt]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise CpmctlError(f"prompt {i + 1} is empty")
    dev = resolve_device(device)
    if memory_limit is None and quantize is None:
        model, _ = load_model_with_adapter(model_path, adapter, device=dev, dtype=resolve_dtype(dtype, dev))
        tokenizer = CPMAntTokenizer(find_vocab(model_path, vocab))
    else:
        model, tokenizer = _load_within_limit(model_path, adapter, vocab, prompts, cfg, batch_size, dev, dtype,
                                              memory_limit, quantize)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CpmctlError(
            f"vocab has {tokenizer.vocab_size} tokens but the model expects {model.config.vocab_size}: "
            f"wrong --vocab for {model_path}"
        )
    stream = len(prompts) == 1 and not json_out and decode != "beam" and sys.stdout.isatty()
    on_token = (lambda ids: out.print(tokenizer.decode(ids), end="")) if stream else None
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        for result in run_generation(model, tokenizer, batch, cfg, on_token=on_token):
            if json_out:
                emit_json({"prompt": result.prompt, "text": result.text, "token_ids": result.token_ids})
            elif stream:
                out.print()
            else:
                out.print(result.text)


def _load_within_limit(model_path, adapter, vocab, prompts, cfg, batch_size, dev, dtype, memory_limit, quantize):
    """--memory-limit / --quantize: plan for these prompts, then load lazily (cpmctl/generate/offload.py)."""
    if adapter is not None:
        raise CpmctlError("--adapter cannot be combined with --memory-limit or --quantize: merge the adapter first")
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = CPMAntTokenizer(find_vocab(model_path, vocab))
    counts = [len(encode_prompt(tokenizer, p)) for p in prompts]
    loaded = load_for_generation(model_path, counts, decode=cfg.decode, beam_size=cfg.beam_size,
                                 max_new_tokens=cfg.max_new_tokens, batch_size=batch_size, device=dev,
                                 dtype=torch_dtype, memory_limit_gb=memory_limit, quantize=quantize)
    err.print(describe_plan(loaded.plan))
    return loaded.model, tokenizer
