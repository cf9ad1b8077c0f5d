"""`cpmctl generate`: beam search, sampling or greedy decoding with the original's defaults.

Decoding flags default to None and override GenerationConfig(), whose dataclass defaults are the only ones."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
import typer

from cpmctl.cli.common import emit_json, err, examples, out
from cpmctl.generate.batch import DEFAULT_BATCH_SIZE, prepare_generation
from cpmctl.generate.offload import describe_plan
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.progress import count_bar
from cpmctl.train.engine import memory_mb

DEFAULTS = GenerationConfig()  # named in the help; the flags override it
EXAMPLES = examples("cpmctl generate '今天天气很好，' --model runs/mini/model",
                    "cpmctl generate --input prompts.jsonl --model runs/mini/model --decode greedy --json",
                    "echo 北京的冬天 | cpmctl generate - --model runs/mini/model --adapter runs/mini/lora/best")


def generate(
    prompt: str = typer.Argument(None, help="Text to continue ('-' reads it from stdin, without its final newline)."),
    model_path: Path = typer.Option(..., "--model", help="Checkpoint: native dir, original .pt (config .json beside) or HF dir."),
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter directory (from `cpmctl tune lora`), unmerged."),
    vocab: Path = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint)."),
    decode: str = typer.Option(None, "--decode", help=f"beam, sample or greedy (default {DEFAULTS.decode})."),
    beam_size: int = typer.Option(None, "--beam-size", help=f"Beams per prompt (default {DEFAULTS.beam_size})."),
    top_k: int = typer.Option(None, "--top-k", help=f"Sampling: keep the k best tokens, 0 = off (default {DEFAULTS.top_k})."),
    top_p: float = typer.Option(None, "--top-p", help=f"Sampling: nucleus mass (default {DEFAULTS.top_p})."),
    temperature: float = typer.Option(None, "--temperature", help=f"Sampling temperature (default {DEFAULTS.temperature})."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty",
                                             help=f"CTRL penalty on generated tokens, >= 1 (default {DEFAULTS.repetition_penalty})."),
    repetition_window: int = typer.Option(None, "--repetition-window",
                                          help="Penalise only the last W generated tokens (default: all of them)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help=f"Tokens to generate (default {DEFAULTS.max_new_tokens})."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default 0: the same command gives the same text)."),
    input_file: Path = typer.Option(None, "--input", help='JSONL file of {"prompt": ...} lines (batched); their other '
                                    'fields (an "id") are carried into the --json results.'),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="Prompts decoded together from --input."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (GPU)."),
    memory_limit: float = typer.Option(None, "--memory-limit", help="GB (10^9 bytes) of device memory for weights, "
                                       "KV cache and activations; blocks that do not fit stream (docs/memory.md)."),
    quantize: str = typer.Option(None, "--quantize", help="int8: weight-only int8 linears (per-channel "
                                  "scales); int8-dynamic: int8 activations too (per token; CPU, all blocks resident); "
                                  "int8-dynamic-head: also the output head; int4: weight-only int4 linears (groups of 128 inputs, "
                                  "CPU and CUDA, streams too) (docs/memory.md)."),
    json_out: bool = typer.Option(False, "--json", help='One {"prompt", "text", "token_ids"} object per prompt, in input '
                                  'order, with the input line\'s other fields.'),
):
    """Generate text from a prompt or a JSONL file of prompts, as the original CPM-Live code would."""
    cfg = GenerationConfig().updated(dict(
        decode=decode, beam_size=beam_size, top_k=top_k, top_p=top_p, temperature=temperature,
        repetition_penalty=repetition_penalty, repetition_window=repetition_window, max_new_tokens=max_new_tokens,
        seed=seed,
    ))
    # Tokens are streamed only to a terminal, and only where the core can (one prompt, not beam search).
    to_terminal = not json_out and sys.stdout.isatty()
    run = prepare_generation(
        model_path, cfg, prompt=prompt, input_file=input_file, batch_size=batch_size, device=device, dtype=dtype,
        adapter=adapter, vocab=vocab, memory_limit_gb=memory_limit, quantize=quantize,
        on_text=(lambda text: out.print(text, end="")) if to_terminal else None,
    )
    if run.plan is not None:
        err.print(describe_plan(run.plan))
    # A file of prompts is a long job: progress (timestamped lines when stderr is not a terminal) on stderr.
    started, tokens = time.perf_counter(), 0
    with count_bar("generate") if input_file is not None else contextlib.nullcontext() as bar:
        task = bar.add_task("generate", total=len(run.prompts)) if bar is not None else None
        for i, result in enumerate(run.results()):
            tokens += len(result.token_ids)
            if json_out:  # the input line's other fields (an id) first, then the result's
                emit_json({**run.fields(i), "prompt": result.prompt, "text": result.text,
                           "token_ids": result.token_ids})
            elif run.streaming:
                out.print()
            else:
                out.print(result.text)
            if bar is not None:
                bar.advance(task)
    # The run's summary on stderr (stdout holds only the results): speed and the peak memory it took.
    seconds = time.perf_counter() - started
    # A streamed model's weights live on the host while it decodes on the GPU: the GPU peak is the one its
    # --memory-limit bounds, whenever CUDA was used at all.
    on_gpu = torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0
    device = torch.device("cuda" if on_gpu else "cpu")
    where = "CUDA allocator peak" if on_gpu else "peak RSS"
    err.print(f"generated {tokens} tokens for {len(run.prompts)} prompt{'s' if len(run.prompts) != 1 else ''} in "
              f"{seconds:.1f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s, prompt passes included); "
              f"{where} {memory_mb(device):,.0f} MB")
