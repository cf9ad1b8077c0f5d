"""`cpmctl generate` as a core call: the prompts (a text, stdin, or a JSONL file), the model and vocabulary loaded
for them, and decoding them `batch_size` at a time.

Two ways to load: the plain one (load_model, with an optional unmerged LoRA adapter; on the CPU the linears then
run in oneDNN's packed layout, packed.py), and, with a memory limit or int8 / int4 linears, the lazy one: the
prompts are tokenized first, plan_generation sizes the plan for them, and load_planned follows it (offload.py).
Either way the vocabulary is the one beside the checkpoint unless given, and its size must be the model's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from cpmctl import CpmctlError
from cpmctl.data.textio import read_jsonl
from cpmctl.device import resolve_device, resolve_dtype
from cpmctl.generate.decode import GenerationResult, encode_prompt, generate
from cpmctl.model.mapped import MappedCheckpoint
from cpmctl.generate.offload import OffloadedModel, load_planned
from cpmctl.generate.packed import PackedLinear, pack_linears, packing_applies, use_output_head
from cpmctl.generate.plan import MemoryPlan, plan_generation
from cpmctl.generate.quant import check_dynamic_support, is_dynamic, use_int8_activations
from cpmctl.model.ant import CPMAnt
from cpmctl.model.checkpoint import load_tokenizer
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.lora import load_model_with_adapter
from cpmctl.model.tokenizer import CPMAntTokenizer

DEFAULT_BATCH_SIZE = 8  # prompts of an input file decoded together


# ----- prompts -------------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """Every non-blank line of a JSONL file of prompts ('-' = stdin): objects with a string field `prompt`; their
    other fields (an `id`) are carried through to the results."""
    records = []
    for n, obj in read_jsonl(path, "input file"):
        if not isinstance(obj.get("prompt"), str):
            raise CpmctlError(f"{path}:{n}: expected an object with a string field 'prompt'")
        records.append(obj)
    if not records:
        raise CpmctlError(f"{path}: no prompts")
    return records


def read_prompts(path: str | Path) -> list[str]:
    return [r["prompt"] for r in read_records(path)]


def collect_records(prompt: str | None, input_file: str | Path | None) -> list[dict]:
    """One PROMPT ('-' reads it from stdin, without the newline that ends the input) or the lines of an input
    file, as {"prompt", ...other fields} records; no prompt may be empty."""
    if (prompt is None) == (input_file is None):
        raise CpmctlError("give a PROMPT or --input FILE.jsonl (one of them)")
    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")  # `echo TEXT |` adds the newline; the prompt has none
    records = read_records(input_file) if input_file is not None else [{"prompt": prompt}]
    for i, r in enumerate(records):
        if not r["prompt"].strip():
            raise CpmctlError(f"prompt {i + 1} is empty")
    return records


def collect_prompts(prompt: str | None, input_file: str | Path | None) -> list[str]:
    return [r["prompt"] for r in collect_records(prompt, input_file)]


# ----- loading -------------------------------------------------------------------------------------------------
@dataclass
class LoadedForGeneration:
    """What decoding runs on; `plan` and `offloaded` are set when it was loaded within a plan."""

    model: CPMAnt
    tokenizer: CPMAntTokenizer
    plan: MemoryPlan | None = None
    offloaded: OffloadedModel | None = None

    def close(self) -> None:
        if self.offloaded is not None:
            self.offloaded.close()


def load_for_generation(
    model_path: str | Path,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    adapter: str | Path | None = None,
    vocab: str | Path | None = None,
    memory_limit_gb: float | None = None,
    quantize: str | None = None,
) -> LoadedForGeneration:
    """The model and tokenizer for decoding `prompts` with `cfg`: plain, or lazily within a memory limit / with
    int8 linears (then planned for these prompts before any weight is read)."""

    def plan_for(config, tokenizer) -> MemoryPlan:
        # The plan's shape is in tokens, so the prompts are tokenized before loading.
        counts = [len(encode_prompt(tokenizer, p)) for p in prompts]
        return plan_generation(config, counts, decoding=cfg, batch_size=batch_size, device=device, dtype=dtype,
                               memory_limit_gb=memory_limit_gb, quantize=quantize)

    return load_with_policy(model_path, device=device, dtype=dtype, adapter=adapter, vocab=vocab,
                            planned=memory_limit_gb is not None or quantize is not None, plan_for=plan_for)


def load_with_policy(model_path: str | Path, *, device: torch.device, dtype: torch.dtype, adapter, vocab,
                     planned: bool, plan_for: Callable) -> LoadedForGeneration:
    """The one load policy of `generate` and `serve`: the whole model (with an optional unmerged adapter), or, when
    `planned`, the memory plan `plan_for(config, tokenizer)` made before any weight is read, then a lazy load."""
    if not planned:
        # The weights first: a missing or damaged checkpoint is named before its vocabulary.
        model, _ = load_model_with_adapter(model_path, adapter, device=device, dtype=dtype)
        tokenizer = load_tokenizer(model_path, vocab, vocab_size=model.config.vocab_size)
        if adapter is None and packing_applies(device, dtype):  # an unmerged adapter's peft layers stay as they are
            pack_linears(model)
        return LoadedForGeneration(model, tokenizer)
    if adapter is not None:
        raise CpmctlError("--adapter cannot be combined with --memory-limit or --quantize: merge the adapter first")
    config = MappedCheckpoint.read_config(model_path)
    tokenizer = load_tokenizer(model_path, vocab, vocab_size=config.vocab_size)
    plan = plan_for(config, tokenizer)
    if is_dynamic(plan.quantize):  # before any weight is read
        check_dynamic_support(plan.quantize, device, streamed=bool(plan.streamed))
    offloaded = load_planned(model_path, plan, device=device)
    if is_dynamic(plan.quantize):  # the loaded int8 weights, now with int8 activations
        use_int8_activations(offloaded.model, plan.quantize)
    if plan.output_head == "onednn":  # the head's fp32 / bf16 product in oneDNN's packed layout (plan counts the copy)
        use_output_head(offloaded.model, PackedLinear(offloaded.model.input_embedding.weight))
    return LoadedForGeneration(offloaded.model, tokenizer, plan, offloaded)


# ----- decoding ------------------------------------------------------------------------------------------------
@dataclass
class GenerationRun:
    """Prompts ready to decode on a loaded model. `results()` decodes them batch by batch, in input order, and
    releases a streamed model's hooks once done; with `streaming`, each new token's text went to `on_text` as it
    was produced (one prompt, greedy or sampling)."""

    loaded: LoadedForGeneration
    prompts: list[str]
    cfg: GenerationConfig
    batch_size: int
    on_text: Callable[[str], None] | None = None
    # Per prompt, the input line's other fields ({"id": ...}), for the results: `fields(i)`.
    extras: list[dict] = field(default_factory=list)
    _used: bool = field(default=False, repr=False)

    def fields(self, index: int) -> dict:
        """The other fields of the input line of prompt `index` (results come in input order)."""
        return self.extras[index] if index < len(self.extras) else {}

    @property
    def plan(self) -> MemoryPlan | None:
        return self.loaded.plan

    @property
    def streaming(self) -> bool:
        return self.on_text is not None

    def results(self) -> Iterator[GenerationResult]:
        if self._used:
            raise RuntimeError("a GenerationRun decodes once")
        self._used = True
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        on_token = None
        if self.on_text is not None:
            on_text = self.on_text
            on_token = lambda ids: on_text(tokenizer.decode(ids))  # noqa: E731
        try:
            for start in range(0, len(self.prompts), self.batch_size):
                yield from generate(model, tokenizer, self.prompts[start : start + self.batch_size], self.cfg,
                                    on_token=on_token)
        finally:
            self.loaded.close()


def prepare_generation(
    model_path: str | Path,
    cfg: GenerationConfig,
    *,
    prompt: str | None = None,
    input_file: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "fp32",
    adapter: str | Path | None = None,
    vocab: str | Path | None = None,
    memory_limit_gb: float | None = None,
    quantize: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationRun:
    """`cpmctl generate`: check the settings, read the prompts, load the model for them. `on_text` receives the
    text of each token as it comes where that is possible (a single prompt, not beam search)."""
    cfg.validate()
    if batch_size < 1:
        raise CpmctlError(f"--batch-size must be >= 1, got {batch_size}")
    records = collect_records(prompt, input_file)
    prompts = [r["prompt"] for r in records]
    dev = resolve_device(device)
    loaded = load_for_generation(model_path, prompts, cfg, batch_size=batch_size, device=dev,
                                 dtype=resolve_dtype(dtype, dev), adapter=adapter, vocab=vocab,
                                 memory_limit_gb=memory_limit_gb, quantize=quantize)
    streams = on_text is not None and len(prompts) == 1 and cfg.decode != "beam"
    extras = [{k: v for k, v in r.items() if k != "prompt"} for r in records]
    return GenerationRun(loaded, prompts, cfg, batch_size, on_text if streams else None, extras)
