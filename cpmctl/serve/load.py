"""Loading a model for serving, under `generate`'s policy: plain (with an optional unmerged LoRA adapter), or lazily
within `--memory-limit` / with `--quantize int8`, planned before any weight is read. The plan's shape is the
engine's worst case rather than a set of prompts: `max_batch` slot-cache rows plus as many again (a prefill, or a
beam group of max_batch // beam_size prompts x beam_size rows), each of the engine's cache capacity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cpmctl.generate.batch import LoadedForGeneration, load_with_policy
from cpmctl.generate.plan import MemoryPlan, plan_generation, plan_memory
from cpmctl.model.config import CPMAntConfig
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.serve.engine import Limits, cache_capacity


@dataclass
class ServedModel:
    loaded: LoadedForGeneration
    plan: MemoryPlan | None  # the memory plan of the engine's shape (also without a limit, to show its sizes)
    name: str


def engine_plan(config: CPMAntConfig, limits: Limits, device: torch.device, dtype: torch.dtype,
                memory_limit_gb: float | None, quantize: str | None) -> MemoryPlan | None:
    """The plan of the engine's shape. plan_generation checks the inputs (quantize name, the limit against the
    device, int8 support) as it does for `generate`; a beam search of one beam over max_batch prompts of
    max_prompt_tokens has exactly this shape (2 x max_batch rows, the engine's capacity)."""
    capacity = cache_capacity(config.prompt_length, limits)
    prefill = config.prompt_length + limits.max_prompt_tokens
    if device.type not in ("cpu", "cuda"):
        return None
    if memory_limit_gb is None and quantize is None:
        return plan_memory(config, device_type=device.type, dtype=dtype, budget=None, batch_rows=2 * limits.max_batch,
                           prefill_length=prefill, capacity=capacity)
    shape = GenerationConfig(decode="beam", beam_size=1, max_new_tokens=capacity - prefill - 3)
    return plan_generation(config, [limits.max_prompt_tokens] * limits.max_batch, decoding=shape,
                           batch_size=limits.max_batch, device=device, dtype=dtype, memory_limit_gb=memory_limit_gb,
                           quantize=quantize, batch_option="--max-batch")


def load_for_serving(model_path: str | Path, limits: Limits, *, device: torch.device, dtype: torch.dtype,
                     adapter: str | Path | None = None, vocab: str | Path | None = None,
                     memory_limit_gb: float | None = None, quantize: str | None = None,
                     name: str | None = None) -> ServedModel:
    limits.check()
    served = name or Path(model_path).resolve().name.removesuffix(".pt")
    loaded = load_with_policy(
        model_path, device=device, dtype=dtype, adapter=adapter, vocab=vocab,
        planned=memory_limit_gb is not None or quantize is not None,
        plan_for=lambda config, _: engine_plan(config, limits, device, dtype, memory_limit_gb, quantize))
    # A whole-model load has no plan of its own: the engine's sizes are still shown.
    plan = loaded.plan or engine_plan(loaded.model.config, limits, device, dtype, None, None)
    return ServedModel(loaded, plan, served)
