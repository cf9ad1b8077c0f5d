"""Will a training run fit? Per-rank bytes of a training step, from the config and the recipe alone (no weights).

What one rank holds (bytes; N = processes; /N where fsdp shards it, whole under single and ddp):
- parameters: the trained weights in fp32 (the master copy: under bf16/fp16 autocast parameters stay fp32,
  engine.autocast), or the frozen base in tune.base_dtype beside fp32 LoRA weights;
- gradients: fp32, of the trained parameters only;
- optimizer: AdamW's two fp32 moments per trained parameter (+ a step counter per tensor, negligible);
- teacher (prune with distillation): the frozen unpruned model in fp32, sharded like the student under fsdp;
- autocast copies: bf16/fp16 casts of every trained weight a matmul reads (the blocks' linears and the tied head);
  autocast caches them for the whole forward and autograd keeps them to the backward, so they are the full model
  in 2 bytes on every rank, also under fsdp (the gathered block is cast, then the fp32 copy is freed);
- fsdp gathers: two blocks' fp32 weights (the one running and the one prefetched), the root's while it runs, and
  in backward the two blocks' unsharded gradients before their reduce-scatter;
- activations: what autograd saves, read off model/ant.py tensor by tensor (saved_block_bytes): the fp32 residual
  stream and RMSNorm statistics, the inputs of trained linears (frozen ones save none), q/k/v, the attention
  scores b*H*n*n (math SDPA: the CPU path) or the (b,H,n,n) bias cast per layer (fused SDPA on a GPU under
  autocast), the FFN intermediates, the pruning gates' products; plus the (b,H,n,n) fp32 position-bias mask alive
  through the forward and the vocabulary-wide logits of the loss. With activation checkpointing a block saves only
  its input, and one block is recomputed at a time in backward.
The peak is the resident part (parameters, gradients, optimizer, teacher) plus the largest of three moments: the
end of the forward (all saved activations, the autocast copies, the loss's logits), the start of the backward
(saved activations + the logits' gradients) and the end of the backward (every gradient). The host memory to start
is what the start-up does on each rank: with single and ddp the whole model built (or loaded: the checkpoint's
tensors and the folded copy at once) in host memory before it is moved, and the whole model on the device once
(start_device_bytes), the teacher besides in a prune run; with fsdp the sharded start (train/sharded_start.py): the
shards where they live plus one parameter in flight.

Calibrated on CPU against torch's own live-tensor accounting (torch.distributed._tools.mem_tracker.MemTracker):
tests/test_memory_plan.py. Not counted: the CUDA context and cuBLAS / NCCL workspaces (CUDA_RESERVE below),
allocator fragmentation, the data loader.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace

from cpmctl import CpmctlError
from cpmctl.model.ant import param_counts
from cpmctl.model.config import CPMAntConfig

GB = 10**9  # --device-memory is in GB (10^9 bytes), as generate's --memory-limit
# The CUDA context, cuBLAS/NCCL workspaces and allocator slack a GPU process needs beside its tensors.
CUDA_RESERVE = 2 * GB
DEFAULT_SEQ_LEN = 1024  # CPM-Ant's pretraining rows (data pack --max-length 1024) when no data is given
MAX_NPROC = 1024
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4


@dataclass(frozen=True)
class Workload:
    """What a step computes: the batch shape and what is trained."""

    batch_size: int  # rows per micro-batch per process
    seq_len: int
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    activation_checkpointing: bool = False
    trained: str = "full"  # full | lora
    base_dtype_bytes: int = FP32  # the weights' dtype in memory (4; LoRA: tune.base_dtype)
    lora_r: int = 0
    lora_targets: tuple = ()
    lora_trainable: int = 0  # LoRA parameters (model/lora.py dry_run_counts)
    gates: bool = False  # the mask phase: head / channel / sub-block gates in the forward
    teacher: bool = False  # distillation from a frozen copy of the model
    teacher_parameters: int = 0  # the teacher's size when it is another model (prune recovery: the source); 0: same
    full_logits: bool = False  # the loss builds logits at every position (the mask phase) or only at targets
    sdpa: str = "math"  # math (scores materialised: CPU) | fused (memory-efficient attention: CUDA)


@dataclass
class TrainPlan:
    engine: str
    nproc: int
    device_memory: int | None  # bytes available per rank; None = not given
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    teacher_bytes: int
    autocast_bytes: int
    gathered_bytes: int  # fsdp: unsharded blocks (weights, then gradients) while they run
    activations_bytes: int  # at the peak moment (forward end, backward start or end)
    activations_no_ckpt_bytes: int  # the same run without activation checkpointing
    activations_ckpt_bytes: int  # and with it
    peak_bytes: int  # the step's peak (tensors)
    start_device_bytes: int  # single/ddp: the whole model on the device at start (and the teacher); fsdp: 0
    host_bytes: int  # host memory per rank to start
    reserve_bytes: int  # CUDA context and workspaces (GPU only)
    peak_moment: str = ""
    parameters: int = 0
    trained_parameters: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def needed_bytes(self) -> int:
        return max(self.peak_bytes, self.start_device_bytes) + self.reserve_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.needed_bytes <= self.device_memory

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(needed_bytes=self.needed_bytes, fits=self.fits)
        return out


# ----- activations: what autograd saves, block by block ---------------------------------------------------------
def saved_block_bytes(config: CPMAntConfig, layer: int, w: Workload) -> int:
    """Bytes autograd saves for the backward of block `layer` (model/ant.py TransformerBlock.forward)."""
    t = w.batch_size * w.seq_len
    d, ff, inner, heads = config.dim_model, config.dim_ff, config.num_heads * config.dim_head, config.num_heads
    a = PRECISION_BYTES[w.precision]  # what matmuls output under autocast (fp32 without it)
    cast = a != FP32  # autocast casts the fp32 residual into each matmul: one copy per linear reading it
    full = w.trained == "full"
    pairs = w.batch_size * heads * w.seq_len * w.seq_len
    lora = lambda name, width_in: (t * width_in * a + t * w.lora_r * a) if name in w.lora_targets else 0  # noqa: E731

    def norm() -> int:  # RMSNorm: its fp32 input, the rsqrt statistics, the normalised product (trained weight)
        return t * d * FP32 + t * FP32 + (t * d * FP32 if full else 0)

    def linear_inputs(n_linears: int, width: int, shared: int) -> int:
        """Inputs that trained linears save: under autocast each one's own cast, else one shared fp32 tensor."""
        if not full:
            return 0
        return n_linears * t * width * a if cast else shared

    total = 0
    if config.has_attention(layer):
        total += norm() + linear_inputs(3, d, t * d * FP32)
        total += lora("project_q", d) + lora("project_k", d) + lora("project_v", d)
        total += 3 * t * inner * a  # q, k, v
        if w.sdpa == "math":
            total += pairs * a  # softmax(q k^T + bias): the (b, H, n, n) probabilities
        else:
            total += t * inner * a + w.batch_size * heads * w.seq_len * FP32  # output, logsumexp
            total += pairs * a if cast else 0  # bias.to(q.dtype): a (b, H, n, n) copy per layer
        if w.gates:
            total += t * inner * a + t * d * a  # head gate and sub-block gate products
        total += t * inner * a if full else 0  # the heads merged: input of attention_out
        total += lora("attention_out", inner)
    if config.has_ffn(layer):
        total += norm() + linear_inputs(2, d, t * d * FP32)
        total += lora("w_0", d) + lora("w_1", d)
        total += 3 * t * ff * a  # w_0 (gelu's input), gelu(w_0), w_1: the gated product's factors
        total += t * ff * a if full else 0  # the product: input of w_out
        total += lora("w_out", ff)
        if w.gates:
            total += t * ff * a + t * d * a  # channel gate and sub-block gate products
    return total


def activation_moments(config: CPMAntConfig, w: Workload, checkpointing: bool) -> dict[str, int]:
    """Activation bytes at the forward's end, the backward's start, and the largest block's recompute."""
    t = w.batch_size * w.seq_len
    d, v = config.dim_model, config.vocab_size
    a = PRECISION_BYTES[w.precision]
    pairs = w.batch_size * config.num_heads * w.seq_len * w.seq_len
    blocks = [saved_block_bytes(config, i, w) for i in range(config.num_layers)]
    saved = config.num_layers * t * d * FP32 if checkpointing else sum(blocks)
    recompute = max(blocks) if checkpointing else 0
    # The position bias (b, H, n, n) fp32 with -inf where masked, alive through the encoder, and its int32
    # bucket index (saved by the embedding lookup when the bias table is trained).
    bias = pairs * FP32 + (w.batch_size * w.seq_len * w.seq_len * 4 if w.trained == "full" else 0)
    final = 2 * t * d * FP32 + t * d * FP32  # the output norm's input and product, the hidden states of the head
    # The loss: logits (matmul dtype), their fp32 copy under autocast, log-softmax (fp32, saved); the mask phase
    # builds logits everywhere, then indexes the targets (one more fp32 copy).
    logits = t * v * a
    head_fwd = logits + (t * v * FP32 if a != FP32 else 0) + t * v * FP32 + (t * v * FP32 if w.full_logits else 0)
    head_bwd = t * v * FP32 * 2 + (logits if w.full_logits else 0)
    if w.teacher:  # the teacher's logits (no grad) and its log-softmax for the KL
        head_fwd += logits + 2 * t * v * FP32
        head_bwd += t * v * FP32
    return {"forward_end": saved + bias + final + head_fwd, "backward_start": saved + final + head_bwd,
            "recompute": recompute, "saved": saved}


# ----- the plan -------------------------------------------------------------------------------------------------
def _blocks_params(config: CPMAntConfig) -> tuple[int, int, int]:
    """(all parameters, the largest block's, the root's: embeddings, position bias, final norm)."""
    return _blocks_params_of(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=16)  # the smallest-nproc search plans one config many times
def _blocks_params_of(config_json: str) -> tuple[int, int, int]:
    from cpmctl.model.ant import TransformerBlock
    import torch

    config = CPMAntConfig.from_dict(json.loads(config_json))
    counts = param_counts(config)
    with torch.device("meta"):
        block = max(sum(p.numel() for p in TransformerBlock(config, i).parameters()) for i in range(config.num_layers))
    root = counts["embedding"] + (config.segment_types**2 + config.position_bias_num_buckets) * config.num_heads
    return counts["total"], block, root + config.dim_model


def plan_training(config: CPMAntConfig, w: Workload, *, engine: str, nproc: int = 1,
                  device_memory_gb: float | None = None, device_type: str = "cuda",
                  checkpoint_bytes: int = 0) -> TrainPlan:
    """Per-rank bytes of training `config` on `w` with `engine` over `nproc` processes (module docstring).
    `checkpoint_bytes`: bytes per parameter of the checkpoint read at start-up (0: a new model)."""
    check_plan_inputs(engine, nproc, device_memory_gb)
    total, block, root = _blocks_params(config)
    largest = max(config.vocab_size, config.dim_ff) * config.dim_model  # the largest single parameter
    shard = nproc if engine == "fsdp" else 1
    trained = total if w.trained == "full" else w.lora_trainable
    frozen = 0 if w.trained == "full" else total
    params = math.ceil((trained * FP32 + frozen * w.base_dtype_bytes) / shard)
    grads = math.ceil(trained * FP32 / shard)
    optimizer = math.ceil(2 * trained * FP32 / shard)
    teacher_total = (w.teacher_parameters or total) if w.teacher else 0
    teacher = math.ceil(teacher_total * FP32 / shard)
    a = PRECISION_BYTES[w.precision]
    # Autocast caches casts of trained fp32 weights (leaves that require grad); matmul weights: all but the norms,
    # the bias table and the prompt/segment embeddings.
    matmul = total - config.num_prompts * config.dim_model - config.segment_types * config.dim_model
    autocast = matmul * a if a != FP32 and w.trained == "full" else 0
    gathered = 0
    if engine == "fsdp" and nproc > 1:
        weight_bytes = FP32 if w.trained == "full" else w.base_dtype_bytes
        gathered = 2 * block * weight_bytes + root * weight_bytes  # two blocks in flight + the root
        gathered += 2 * block * FP32 if w.trained == "full" else 0  # unsharded gradients before reduce-scatter
    moments = {ck: activation_moments(config, w, ck) for ck in (False, True)}
    m = moments[w.activation_checkpointing]
    resident = params + optimizer + teacher + gathered
    # Without checkpointing the autocast copies stay saved until each block's backward; with it they are freed
    # when the forward's autocast region ends, and a recomputed block casts its own again.
    ck = w.activation_checkpointing
    one_block_cast = block * a if autocast else 0
    # The tied embedding's gradient comes twice, whole (unsharded) on every rank: from the head at the backward's
    # start, and as the lookup's dense gradient at its end, before it is added in.
    embedding_grad = config.vocab_size * config.dim_model * FP32 if w.trained == "full" else 0
    candidates = {
        "forward end": autocast + m["forward_end"],
        "backward start": (one_block_cast if ck else autocast) + m["backward_start"] + m["recompute"] + embedding_grad,
        "backward end": grads + m["recompute"] + (one_block_cast if ck else 0) + embedding_grad,
    }
    moment = max(candidates, key=candidates.get)
    activations_at = {"forward end": m["forward_end"],
                      "backward start": m["backward_start"] + m["recompute"] + embedding_grad,
                      "backward end": m["recompute"] + embedding_grad}[moment]
    peak = resident + candidates[moment]
    # Start-up. single/ddp: each rank builds or loads the whole model in host memory (load_model: the checkpoint's
    # tensors and the folded copy at once), then moves it whole to the device. fsdp: the sharded start
    # (train/sharded_start.py) allocates each rank's shards where they live and fills them one parameter at a time,
    # so the host holds the shards (CPU ranks) plus one parameter in flight: read, folded, and (new models) drawn.
    model_bytes = trained * FP32 + frozen * w.base_dtype_bytes
    if engine == "fsdp":
        in_flight = largest * (checkpoint_bytes + 2 * FP32)
        host = in_flight + ((params + teacher) if device_type != "cuda" else 0)
        start_device = 0  # the shards are the resident parameters, nothing more
    else:
        host = model_bytes + total * checkpoint_bytes + teacher_total * (FP32 + checkpoint_bytes)
        start_device = model_bytes + teacher_total * FP32 if device_type == "cuda" else 0
    return TrainPlan(
        engine=engine, nproc=nproc,
        device_memory=int(device_memory_gb * GB) if device_memory_gb is not None else None,
        params_bytes=params, grads_bytes=grads, optimizer_bytes=optimizer, teacher_bytes=teacher,
        autocast_bytes=autocast, gathered_bytes=gathered, activations_bytes=activations_at,
        activations_no_ckpt_bytes=max(moments[False]["forward_end"], moments[False]["backward_start"]),
        activations_ckpt_bytes=max(moments[True]["forward_end"], moments[True]["backward_start"]
                                   + moments[True]["recompute"]),
        peak_bytes=peak, start_device_bytes=start_device, host_bytes=host,
        reserve_bytes=CUDA_RESERVE if device_type == "cuda" else 0, peak_moment=moment,
        parameters=total, trained_parameters=trained,
        detail={"batch_size": w.batch_size, "seq_len": w.seq_len, "precision": w.precision,
                "activation_checkpointing": w.activation_checkpointing, "sdpa": w.sdpa})


def check_plan_inputs(engine: str, nproc: int, device_memory_gb: float | None) -> None:
    if nproc < 1:
        raise CpmctlError(f"--nproc must be >= 1, got {nproc}")
    if engine == "single" and nproc > 1:
        raise CpmctlError("engine single runs one process; --nproc above 1 needs ddp or fsdp")
    if device_memory_gb is not None and (not math.isfinite(device_memory_gb) or device_memory_gb <= 0):
        raise CpmctlError(f"--device-memory must be a positive number of GB, got {device_memory_gb}")


def smallest_nproc(fits_with) -> int | None:
    """The smallest process count whose plan fits (fits_with(n) -> bool), up to MAX_NPROC; None if none does.
    Memory per rank only falls as n grows, so a binary search over 1..MAX_NPROC finds it."""
    if not fits_with(MAX_NPROC):
        return None
    lo, hi = 1, MAX_NPROC
    while lo < hi:
        mid = (lo + hi) // 2
        if fits_with(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def verdict(plans: list[TrainPlan], smallest: int | None, engine: str) -> dict:
    """fits / does not fit for the run (every phase must fit), and the smallest process count that fits."""
    if plans[0].device_memory is None:
        return {"fits": None, "smallest_nproc": None, "text": "no --device-memory given: nothing to check against"}
    fits = all(p.fits for p in plans)
    need = max(p.needed_bytes for p in plans)
    text = f"{'fits' if fits else 'does not fit'}: {need / GB:.1f} of {plans[0].device_memory / GB:.0f} GB per rank"
    if smallest is not None:
        text += f"; the smallest {engine if engine == 'fsdp' else 'fsdp'} process count that fits is {smallest}"
    else:
        worst = max(plans, key=lambda p: p.activations_bytes)
        text += (f"; no fsdp process count up to {MAX_NPROC} fits: activations alone take "
                 f"{worst.activations_bytes / GB:.1f} GB per rank (sharding does not split them); lower the batch "
                 "size or turn on activation_checkpointing")
    return {"fits": fits, "smallest_nproc": smallest, "text": text}


def plan_rows(plan: TrainPlan) -> list[tuple[str, str]]:
    """Human rows (label, GB) of one plan."""
    g = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
    ck = plan.detail["activation_checkpointing"]
    rows = [("per rank", f"{plan.engine} x {plan.nproc}, batch {plan.detail['batch_size']} x "
                         f"{plan.detail['seq_len']} tokens, {plan.detail['precision']}"),
            ("parameters", g(plan.params_bytes)), ("gradients", g(plan.grads_bytes)),
            ("optimizer (AdamW)", g(plan.optimizer_bytes))]
    if plan.teacher_bytes:
        rows.append(("teacher", g(plan.teacher_bytes)))
    if plan.autocast_bytes:
        rows.append(("autocast weight copies", g(plan.autocast_bytes)))
    if plan.gathered_bytes:
        rows.append(("fsdp gathered blocks", g(plan.gathered_bytes)))
    rows += [(f"activations at {plan.peak_moment}", g(plan.activations_bytes)),
             ("activations, checkpointing off" + (" " if ck else " (this run)"), g(plan.activations_no_ckpt_bytes)),
             ("activations, checkpointing on" + (" (this run)" if ck else ""), g(plan.activations_ckpt_bytes)),
             ("step peak", g(plan.peak_bytes)), ("start-up on the device", g(plan.start_device_bytes)),
             ("needed per rank", g(plan.needed_bytes)), ("host memory per rank to start", g(plan.host_bytes))]
    return rows


# ----- from a recipe --------------------------------------------------------------------------------------------
def plan_recipe_phase(config: CPMAntConfig, cfg, *, seq_len: int, nproc: int | None,
                      device_memory_gb: float | None, checkpoint_bytes: int = 0, **workload) -> tuple[TrainPlan, int | None]:
    """The plan of a TrainConfig section (`train:`, `mask:`, `recovery:`) at `nproc` processes, and the smallest
    fsdp process count that fits `device_memory_gb` (None without a limit, or when none up to MAX_NPROC does).
    As `--nproc` does, engine single with several processes runs as ddp."""
    nproc = nproc or 1
    engine = "ddp" if cfg.engine == "single" and nproc > 1 else cfg.engine
    device_type = "cpu" if cfg.device == "cpu" else "cuda"
    w = Workload(cfg.batch_size, seq_len, cfg.precision, cfg.activation_checkpointing,
                 sdpa="math" if device_type == "cpu" else "fused", **workload)

    def plan(kind: str, n: int) -> TrainPlan:
        return plan_training(config, w, engine=kind, nproc=n, device_memory_gb=device_memory_gb,
                             device_type=device_type, checkpoint_bytes=checkpoint_bytes)

    smallest = smallest_nproc(lambda n: plan("fsdp", n).fits) if device_memory_gb is not None else None
    return plan(engine, nproc), smallest


def checkpoint_bytes_per_param(files: list, parameters: int) -> int:
    """Bytes per parameter of a checkpoint on disk (2 for fp16/bf16, 4 for fp32), from the file sizes."""
    size = sum(f.stat().st_size for f in files if f.exists())
    return max(1, round(size / max(parameters, 1))) if size else 0


def plan_lines(named: list[tuple[str, TrainPlan]], verdict_row: dict, seq_len_note: str = "") -> list[str]:
    """The human summary of a dry run: one block of `label  value` lines per phase, then the verdict."""
    lines = []
    for name, plan in named:
        lines.append(f"{name}:" + (f" ({seq_len_note})" if seq_len_note else ""))
        rows = plan_rows(plan)
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines.append(verdict_row["text"])
    return lines


def plan_prune(stages: list, model_config: CPMAntConfig | None, model_path, recipe, nproc: int | None,
               device_memory_gb: float | None) -> dict:
    """A prune run's plan (prune/pipeline.py PrunePlan.memory): each stage's mask phase (the source model with its
    gates, full logits, and the teacher with distillation) and recovery (the target shape); the run fits when every
    phase does. `stages` are prune/targets.py Stages, `recipe` a PruneRecipe (read by attribute: this floor is
    below prune/)."""
    from cpmctl.data.packed_format import PackedDataset
    from cpmctl.model.checkpoint import weight_files

    train_path = Path(recipe.data.train) if recipe.data.train else None
    seq_len = PackedDataset(train_path).max_length if train_path and train_path.is_dir() else DEFAULT_SEQ_LEN
    rows, plans, smallest = [], [], []
    # The ladder's configs carry the ladder's vocab_size; the run's vocabulary is the model's (--model).
    own_vocab = (lambda c: replace(c, vocab_size=model_config.vocab_size)) if model_config else (lambda c: c)
    for stage in stages:
        source = model_config if (stage.index == 1 and model_config is not None) else own_vocab(stage.source)
        # Bytes per parameter read at start-up: --model's files, else the config's dtype (half: the original
        # fp16 .pt); later stages and every recovery read cpmctl's fp32 native files.
        if stage.index == 1 and model_path is not None:
            on_disk = checkpoint_bytes_per_param(weight_files(model_path), param_counts(source)["total"])
        else:
            on_disk = 2 if stage.index == 1 and source.half else 4
        row = {"stage": stage.index, "from": stage.source_name, "to": stage.target_name}
        # Recovery with distill.recovery distils from the stage's unpruned model: a teacher of the source's size.
        distil = recipe.distill.recovery and recipe.distill.weight > 0
        phases = [("recovery", own_vocab(stage.target), recipe.recovery,
                   {"checkpoint": 4, "teacher": distil,
                    "teacher_parameters": param_counts(source)["total"] if distil else 0})]
        if recipe.method == "learned":
            phases.insert(0, ("mask", source, recipe.mask, {"gates": True, "full_logits": True,
                                                             "teacher": recipe.distill.weight > 0,
                                                             "checkpoint": on_disk}))
        for name, config, cfg, extra in phases:
            read = extra.pop("checkpoint")
            plan, least = plan_recipe_phase(config, cfg, seq_len=seq_len, nproc=nproc,
                                            device_memory_gb=device_memory_gb, checkpoint_bytes=read, **extra)
            row[name] = plan.to_dict()
            plans.append(plan)
            smallest.append(least)
        rows.append(row)
    least = None if None in smallest else max(smallest, default=None)
    return {"seq_len": seq_len, "stages": rows,
            "verdict": verdict(plans, least, recipe.mask.engine if recipe.method == "learned" else
                               recipe.recovery.engine)}
