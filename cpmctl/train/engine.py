"""Where and how a training run executes: device, precision, and torch.distributed (DDP or FSDP2).

`engine: single` runs in this process. `engine: ddp | fsdp` expects the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and uses NCCL on GPUs, gloo on CPU. FSDP2 shards every TransformerBlock,
then the root (embeddings, position bias, final norm), so one block's parameters are gathered at a time.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from cpmctl import CpmctlError
from cpmctl.device import resolve_device
from cpmctl.model.ant import CPMAnt, Encoder, TransformerBlock

ENGINES = ("single", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16", "fp16")
FP16_INITIAL_SCALE = 2.0**20  # the original's loss scale


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def engine_for_world(kind: str, at: str = "train.engine") -> str:
    """The engine to run: under torchrun with several processes `single` would train one copy per process into
    the same out_dir, so it becomes ddp (as `--nproc` does), said once on stderr."""
    rank, _, world_size = dist_env()
    if kind != "single" or not launched_by_torchrun() or world_size <= 1:
        return kind
    if rank == 0:
        print(f"{at}: single with {world_size} processes (torchrun) -> ddp", file=sys.stderr, flush=True)
    return "ddp"


@dataclass
class Engine:
    kind: str
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.kind in ("ddp", "fsdp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----- collectives (no-ops on one process) ------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used to stop all ranks at the same step)."""
        if not self.distributed:
            return flag
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, tensors: list[torch.Tensor]) -> None:
        """Mean of each tensor's gradient over the ranks, in place: for replicated tensors the wrapper does not
        reduce (pruning's gates and multipliers live outside the model), so every rank applies the same update."""
        grads = [t.grad for t in tensors if t.grad is not None]
        if not self.distributed or not grads:
            return
        flat = torch.cat([g.reshape(-1).to(self.comm_device, torch.float64) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g).to(g.device, g.dtype))
            offset += g.numel()

    @property
    def comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo moves CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def setup_engine(kind: str, device_name: str = "auto") -> Engine:
    """The engine of one training run. On a GPU the allocator's peak restarts here, so a run's memory_mb is its own
    peak, not that of an earlier phase in the same process (prune's mask phase before its recovery)."""
    if kind not in ENGINES:
        raise CpmctlError(f"train.engine: expected one of {', '.join(ENGINES)}, got {kind!r}")
    if kind == "single":
        engine = Engine(kind, resolve_device(device_name, what="train.device"))
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        return engine
    if not launched_by_torchrun():
        raise CpmctlError(
            f"train.engine: {kind} runs under torchrun (torchrun --nproc_per_node N -m cpmctl pretrain ...) "
            "or with `cpmctl pretrain --nproc N`"
        )
    rank, local_rank, world_size = dist_env()
    device = resolve_device(device_name, local_rank, what="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        owns = True
    return Engine(kind, device, rank, local_rank, world_size, owns)


# ----- sharded parameters: which rows a rank holds ---------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_rows(param: torch.Tensor) -> slice:
    """The dim-0 rows of the full parameter held by this rank (all rows for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return slice(0, param.shape[0] if param.dim() else 1)
    n, world, rank = param.shape[0], dist.get_world_size(), dist.get_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    held = param.to_local().shape[0]
    if held != stop - start:  # FSDP2 changed how it splits dim 0: loading would put rows in the wrong place
        raise CpmctlError(f"internal: rank {rank} holds {held} rows of a {n}-row parameter, expected {stop - start}",
                          exit_code=1)
    return slice(start, stop)


@torch.no_grad()
def copy_rows(param: torch.Tensor, full_value: torch.Tensor) -> None:
    """Copy a full-size value into a parameter, sharded (this rank's rows) or not."""
    rows = local_rows(param)
    target = param.to_local() if hasattr(param, "to_local") else param
    target.copy_(full_value[rows] if param.dim() else full_value)


# ----- precision -----------------------------------------------------------------------------------------------
def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise CpmctlError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise CpmctlError("train.precision: fp16 (with loss scaling) needs a GPU; use bf16 or fp32 on the CPU")


def autocast(precision: str, device: torch.device):
    """Parameters stay fp32 (the master copy); matmuls run in bf16/fp16 under autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """Dynamic loss scaling for fp16, starting at 2**20 like the original; None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_SCALE)


# ----- model wrapping ------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is already the user's module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    encoders = [m for m in model.modules() if isinstance(m, Encoder)]
    if not encoders:
        raise CpmctlError("train.activation_checkpointing: the model has no CPM-Ant encoder to checkpoint")
    for encoder in encoders:
        encoder.gradient_checkpointing = True


def compile_model(model: nn.Module, kind: str) -> None:
    """torch.compile in place. FSDP2 gathers parameters per block, so each TransformerBlock is compiled on its own;
    otherwise the whole CPM-Ant forward is one graph (the attention bias is built and cast once, not per layer)."""
    compiled = lambda m: getattr(m, "_compiled_call_impl", None) is not None  # noqa: E731 - already compiled
    if kind != "fsdp" and isinstance(model, CPMAnt):
        if not compiled(model):
            model.compile()
        return
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not compiled(module):
            module.compile()


def wrap_model(model: nn.Module, engine: Engine) -> nn.Module:
    """Move to the device and wrap for the engine. Returns the module to call in the training step. A model
    already sharded at start-up (train/sharded_start.py) is used as it is."""
    if engine.kind == "fsdp" and is_sharded(model):
        return model
    model = model.to(engine.device)
    if engine.kind == "ddp":
        device_ids = [engine.device.index] if engine.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if engine.kind == "fsdp":
        fully_shard_model(model)
    return model


def fully_shard_model(model: nn.Module) -> None:
    """FSDP2 in place: every TransformerBlock, then the root (embeddings, position bias, final norm)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not isinstance(model, CPMAnt):
        raise CpmctlError("train.engine: fsdp shards the full CPM-Ant model; use ddp for adapters and other wrappers")
    for block in model.encoder.layers:
        fully_shard(block)
    fully_shard(model)
    # The loss applies the tied output head to the target positions only (objectives.py): a second entry
    # point into the root module, which must gather the root's parameters like forward does.
    register_fsdp_forward_method(model, "logits")


def shard_frozen(model: nn.Module, engine: Engine) -> nn.Module:
    """A frozen helper model (pruning's distillation teacher) placed like the trained one: under fsdp sharded
    block by block (gathered one block at a time in its forward), otherwise whole on the device."""
    if engine.kind != "fsdp":
        return model.to(engine.device)
    model.requires_grad_(False)
    return wrap_model(model, engine)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, engine: Engine, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if enabled or not engine.distributed:
        yield
    elif engine.kind == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the global L2 norm before clipping."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
