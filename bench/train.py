"""Training throughput: cpmctl's training loop against transformers' CpmAntForCausalLM on the same work.

Both sides train the same config on the same batch: forward over the 32 prompt slots + text, cross-entropy on the
same target positions, backward, gradient clipping at 1.0 and a fused AdamW step. cpmctl runs its real loop
(`cpmctl.train.loop.train`, metrics and all); the peer is a plain PyTorch loop around CpmAntForCausalLM. Steps are
timed after warm-up, the two contenders alternate `--rounds` times and the median of each is reported, so a busy
machine slows both alike. Tokens/s counts every position of the batch (prompt slots included) on both sides.

cpmctl's loss applies the output head only at the positions that have a target (the loss and its gradients are
those of full logits); transformers computes logits at every text position. On a GPU the script also prints the
model FLOPs utilisation (MFU): matmul FLOPs of forward + backward (3x forward: the linears and both attention
products over the full context at every position, the tied head at the target positions) per second, divided by
the GPU's dense bf16 peak. On every device it also measures the limit in the same run: one dense product of the
step's largest linear shape, (batch x seq_len) x dim_model @ dim_model x dim_ff in the step's precision, best of
several calls, and prints each contender's model FLOP/s as a fraction of it (the same FLOP count for both: the
work of the step, not what each side chooses to compute).

    python bench/train.py                                    # mini-10b shape, CPU fp32, 1 thread, ~1-3 minutes
    python bench/train.py --threads 0 --batch-size 8         # all cores (on a machine nobody else is using)
    python bench/train.py --preset 1b --device cuda --precision bf16 --batch-size 8 --seq-len 1024
    python bench/train.py --preset 1b --device cuda --precision bf16 --no-peer --compile
    python bench/train.py --preset 1b --device cuda --precision bf16 --no-peer --attention flex   # FlexAttention
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmctl.model.ant import build_model, param_counts  # noqa: E402
from cpmctl.model.config import CPMAntConfig, resolve_config  # noqa: E402
from cpmctl.train.engine import autocast  # noqa: E402
from cpmctl.train.loop import train  # noqa: E402
from cpmctl.train.recipe import TrainConfig  # noqa: E402

PRESETS = {
    # ~1.03B parameters: 20 layers of d 2048, 16 heads x 128, gated FFN 5120, the CPM-Ant vocabulary.
    "1b": dict(vocab_size=30720, dim_model=2048, dim_ff=5120, num_layers=20, num_heads=16, dim_head=128, half=False),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (SXM)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini-10b", help="A ladder name (mini-10b, 300m, ...) or '1b'.")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256, help="Positions per row, the 32 prompt slots included.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per round.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps before each round.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (0 = torch's default). 1 by default: on a shared machine, timings of several "
                        "OpenMP threads measure the contention more than the code.")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (cpmctl) / the model (peer).")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flex"],
                   help="cpmctl's train.attention: SDPA with a float bias, or FlexAttention (score_mod + BlockMask; "
                        "fast on CUDA only, on the CPU a correctness path).")
    p.add_argument("--no-peer", action="store_true", help="Measure cpmctl only (e.g. for MFU on a large config).")
    p.add_argument("--profile", action="store_true", help="Print the top operators of cpmctl's training step.")
    p.add_argument("--json", action="store_true", help="Also print one JSON object with the numbers.")
    return p.parse_args()


def model_config(preset: str) -> CPMAntConfig:
    return CPMAntConfig(**PRESETS[preset]) if preset in PRESETS else resolve_config(preset)


def make_batch(config: CPMAntConfig, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Rows of one lm record each: 32 prompt slots (task 2), <s>, text; the second half of the text predicted."""
    g = torch.Generator().manual_seed(seed)
    text_len = seq_len - config.prompt_length
    text = torch.randint(10, config.vocab_size, (batch_size, text_len), generator=g)
    prompt = config.vocab_size + 2 * config.prompt_length + torch.arange(config.prompt_length)
    ids = torch.cat([prompt.expand(batch_size, -1), text], dim=1)
    context = torch.ones(batch_size, seq_len, dtype=torch.bool)
    context[:, config.prompt_length + text_len // 2 :] = False
    target = torch.full((batch_size, seq_len), -100)
    target[:, :-1] = torch.where(~context[:, 1:], ids[:, 1:], -100)
    segment = torch.cat([torch.zeros(batch_size, config.prompt_length, dtype=torch.long),
                         torch.full((batch_size, text_len), 2)], dim=1)
    return {"input": ids, "target": target, "segment": segment, "context": context,
            "span": torch.zeros(batch_size, seq_len, dtype=torch.long), "task": torch.full((batch_size, seq_len), 2)}


class FixedBatches:
    """A data source that hands out the same batch (the contract of the loop: next_batch / state_dict)."""

    def __init__(self, batch: dict):
        self.batch, self.on_device = batch, None

    def next_batch(self, device):
        if self.on_device is None:
            self.on_device = {k: v.to(device) for k, v in self.batch.items()}
        return self.on_device

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- cpmctl --------------------------------------------------------------------------------------------------
class _Timed(Exception):
    """Raised by the step callback once the timed steps are done: leaves the loop without its final checkpoint."""


def clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time: on a shared machine the CPU time is the steadier measure."""
    return time.perf_counter(), time.process_time()


def per_step(start, end, steps) -> tuple[float, float]:
    return (end[0] - start[0]) / steps, (end[1] - start[1]) / steps


def cpmctl_round(model, batch, args, device) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the real training loop, from clocks read at each step's start."""
    stamps = {}
    last = args.warmup + args.steps + 1  # this step's start closes the last timed step

    def on_step(step, _model):
        sync(device)
        stamps[step] = clocks()
        if step == last:
            raise _Timed

    cfg = TrainConfig(steps=last, batch_size=args.batch_size, lr=1e-4, schedule="constant", warmup_steps=0,
                      precision=args.precision, device=str(device), log_every=last, valid_every=last,
                      save_every=10**9, compile=args.compile, activation_checkpointing=args.activation_checkpointing,
                      attention=args.attention)
    with tempfile.TemporaryDirectory() as out:
        try:
            train(model, FixedBatches(batch), cfg, out, on_step=on_step, progress=False)
        except _Timed:
            pass
    return per_step(stamps[args.warmup + 1], stamps[last], args.steps)


# ----- transformers --------------------------------------------------------------------------------------------
def make_peer(config, batch, args, device):
    """A training step of CpmAntForCausalLM with the same loss, clipping and fused AdamW."""
    from transformers import CpmAntConfig, CpmAntForCausalLM

    hf_config = CpmAntConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim_model, num_attention_heads=config.num_heads,
        dim_head=config.dim_head, dim_ff=config.dim_ff, num_hidden_layers=config.num_layers, dropout_p=0.0,
        position_bias_num_buckets=config.position_bias_num_buckets,
        position_bias_max_distance=config.position_bias_max_distance, eps=config.eps,
        prompt_types=config.prompt_types, prompt_length=config.prompt_length, segment_types=config.segment_types,
        init_std=1.0, use_cache=False)
    model = CpmAntForCausalLM(hf_config).to(device).train()
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    # HF prepends the 32 prompt slots itself: it gets the text and the labels of the text positions.
    input_ids = batch["input"][:, config.prompt_length :].to(device)
    labels = batch["target"][:, config.prompt_length :].to(device)

    def step():
        with autocast(args.precision, device):
            logits = forward(input_ids=input_ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)  # the same host sync as cpmctl's loss logging

    return step


def peer_round(step, args, device) -> tuple[float, float]:
    for _ in range(args.warmup):
        step()
    sync(device)
    start = clocks()
    for _ in range(args.steps):
        step()
    sync(device)
    return per_step(start, clocks(), args.steps)


# ----- FLOPs ---------------------------------------------------------------------------------------------------
def train_flops_per_step(config: CPMAntConfig, batch_size: int, seq_len: int, targets: int) -> float:
    """Matmul FLOPs of one training step: 3 x forward (backward = 2 x forward). The output head counts at the
    `targets` positions that have a loss (all the head needs to compute), the rest at every position."""
    inner = config.num_heads * config.dim_head
    per_token = 0
    for layer in range(config.num_layers):
        if config.has_attention(layer):
            per_token += 2 * 4 * config.dim_model * inner  # q, k, v, out projections
            per_token += 2 * 2 * seq_len * inner  # q k^T and (scores) v over the full context
        if config.has_ffn(layer):
            per_token += 2 * 3 * config.dim_model * config.dim_ff  # w_0, w_1, w_out
    head = 2 * config.dim_model * config.vocab_size  # tied output head
    return 3.0 * (per_token * batch_size * seq_len + head * targets)


def matmul_limit(config: CPMAntConfig, tokens: int, device: torch.device, precision: str, calls: int = 20) -> float:
    """FLOP/s of one (tokens x dim_model) @ (dim_model x dim_ff) product in the step's precision on this device and
    thread count, best of `calls` after a warm-up: what the step's matmuls can reach here at best."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, config.dim_model, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(config.dim_model, config.dim_ff, generator=gen).to(device=device, dtype=dtype)
    best = float("inf")
    for i in range(calls + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * tokens * config.dim_model * config.dim_ff / best


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def profile_step(model, batch, args, device) -> None:
    """torch.profiler over the timed steps of one more cpmctl round: where the time goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        cpmctl_round(model, batch, args, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = model_config(args.preset)
    batch = make_batch(config, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    params = param_counts(config)["total"]
    print(f"config {args.preset}: {params / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len} "
          f"positions, {args.precision} on {device} ({torch.get_num_threads()} threads), {args.attention} attention, "
          f"{args.rounds} rounds x {args.steps} steps")

    model = build_model(config, seed=0)
    peer_step = None
    if not args.no_peer:
        try:
            peer_step = make_peer(config, batch, args, device)
        except ImportError as e:
            print(f"transformers is not available ({e}): measuring cpmctl only")
    ours, peer = [], []
    for _ in range(args.rounds):  # alternate, so that load from other processes hits both alike
        ours.append(cpmctl_round(model, batch, args, device))
        if peer_step is not None:
            peer.append(peer_round(peer_step, args, device))
    ours_s = statistics.median(w for w, _ in ours)
    result = {"preset": args.preset, "params": params, "device": str(device), "precision": args.precision,
              "attention": args.attention,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "cpmctl_tokens_per_s": tokens / ours_s, "cpmctl_step_s": ours_s}
    show = lambda rounds: ", ".join(f"{w * 1e3:.0f}" for w, _ in rounds)  # noqa: E731
    print(f"cpmctl        {tokens / ours_s:12,.0f} tokens/s   ({ours_s * 1e3:8.1f} ms/step; rounds {show(ours)})")
    if peer:
        peer_s = statistics.median(w for w, _ in peer)
        result.update(hf_tokens_per_s=tokens / peer_s, hf_step_s=peer_s, ratio=peer_s / ours_s)
        print(f"transformers  {tokens / peer_s:12,.0f} tokens/s   ({peer_s * 1e3:8.1f} ms/step; rounds {show(peer)})")
        print(f"ratio cpmctl / transformers: {peer_s / ours_s:.2f}x (wall-clock tokens/s)")
        if device.type == "cpu":
            ours_cpu, peer_cpu = statistics.median(c for _, c in ours), statistics.median(c for _, c in peer)
            result.update(cpmctl_cpu_s=ours_cpu, hf_cpu_s=peer_cpu, cpu_ratio=peer_cpu / ours_cpu)
            print(f"ratio by CPU time per step: {peer_cpu / ours_cpu:.2f}x ({ours_cpu * 1e3:.0f} vs "
                  f"{peer_cpu * 1e3:.0f} ms; steadier than wall time when other processes share the cores)")
    if args.profile:
        profile_step(model, batch, args, device)
    targets = int((batch["target"] != -100).sum())
    flops = train_flops_per_step(config, args.batch_size, args.seq_len, targets)
    limit = matmul_limit(config, tokens, device, args.precision)
    result.update(step_gflop=flops / 1e9, matmul_limit_gflops=limit / 1e9, fraction_of_limit=flops / ours_s / limit)
    line = (f"limit: a {tokens} x {config.dim_model} @ {config.dim_model} x {config.dim_ff} {args.precision} matmul "
            f"at {limit / 1e9:,.1f} GFLOP/s (measured here); model FLOPs {flops / 1e9:.2f} GFLOP/step: cpmctl "
            f"{flops / ours_s / 1e9:,.1f} GFLOP/s = {flops / ours_s / limit:.2f} of the limit")
    if peer:
        result.update(hf_fraction_of_limit=flops / peer_s / limit)
        line += f", transformers {flops / peer_s / 1e9:,.1f} = {flops / peer_s / limit:.2f}"
    print(line)
    peak = peak_flops(device)
    if peak:
        result.update(model_tflops_per_s=flops / ours_s / 1e12, mfu=flops / ours_s / peak)
        print(f"model FLOPs: {flops / ours_s / 1e12:.1f} TFLOP/s = MFU {100 * flops / ours_s / peak:.1f}% of "
              f"{peak / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name(device)})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
