"""Peak host memory of starting a training run: one process loading the whole model (load_model, what ddp and
single do) against each of N gloo ranks building its FSDP2 shards straight from the checkpoint
(train/sharded_start.py, what engine fsdp does), on the same checkpoint, in one script. Goal (issue 14): a rank's
peak RSS at most 0.6x the single-process peak at N = 2, with the same bits (a sha256 of every gathered tensor
against the full load's).

Each measurement runs in a fresh interpreter and reports its peak RSS (VmHWM) after the load; the baseline row is the same
interpreter after its imports only (torch, cpmctl, the process group), so the loads' own share is visible too.
Rows: a native safetensors checkpoint and the original .pt (both memory-mapped, each tensor's pages handed back
once its rows are copied), and `init: new` (seeded draws, no file: a rank draws each whole parameter and keeps
its rows, so its transient is the largest parameter, here the embedding, a larger share than at 10b).

    python bench/startup_memory.py                      # a ~260M-parameter config, 2 ranks
    python bench/startup_memory.py --dim-model 2048 --layers 8 --nproc 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork + exec from the parent, so a
    child of a driver that once held the model would report the driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def digest(state: dict) -> str:
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_of(args):
    from cpmctl.model.config import CPMAntConfig

    return CPMAntConfig(vocab_size=args.vocab, dim_model=args.dim_model, dim_ff=args.dim_model * 5 // 2,
                        num_layers=args.layers, num_heads=args.dim_model // 64, dim_head=64, half=False)


# ----- the measured processes ------------------------------------------------------------------------------------
def single(kind: str, path: str, args) -> dict:
    import torch  # noqa: F401

    from cpmctl.model.ant import build_model
    from cpmctl.model.checkpoint import load_model

    baseline = rss_mb()
    if kind == "baseline":
        return {"peak_mb": baseline}
    model = build_model(config_of(args), seed=0) if kind == "init" else load_model(path)[0]
    peak = rss_mb()
    return {"peak_mb": peak, "baseline_mb": baseline, "sha256": digest(model.state_dict())}


def rank_worker(kind: str, path: str, args) -> dict:
    import torch
    import torch.distributed as dist

    from cpmctl.train.checkpointing import full_copy
    from cpmctl.train.engine import Engine
    from cpmctl.train.sharded_start import init_sharded, load_sharded

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    baseline = rss_mb()
    cpu = torch.device("cpu")
    if kind == "baseline":
        model = None
    elif kind == "init":
        model = init_sharded(config_of(args), cpu, seed=0)
    else:
        model = load_sharded(path, cpu)[0]
    peaks = [None] * world
    dist.all_gather_object(peaks, rss_mb())  # measured before the gather below, which needs the whole model
    sha = None
    if model is not None:
        full = full_copy(model, Engine("fsdp", cpu, rank, rank, world))
        sha = digest(full.state_dict()) if rank == 0 else None
    dist.destroy_process_group()
    return {"peaks_mb": peaks, "baseline_mb": baseline, "sha256": sha} if rank == 0 else {}


# ----- the driver --------------------------------------------------------------------------------------------------
def run_child(args, role: str, kind: str, path: Path, nproc: int) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    child = [__file__, "--role", role, "--kind", kind, "--path", str(path), "--result", str(out),
             "--vocab", str(args.vocab), "--dim-model", str(args.dim_model), "--layers", str(args.layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if role == "rank":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *child]
    else:
        argv = [sys.executable, *child]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{role} {kind} failed: {proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-startup-memory"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30720)
    parser.add_argument("--dim-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--role", choices=["driver", "single", "rank"], default="driver")
    parser.add_argument("--kind", default="native")
    parser.add_argument("--path", default="")
    parser.add_argument("--result", default="")
    args = parser.parse_args()
    if args.role != "driver":
        result = (single if args.role == "single" else rank_worker)(args.kind, args.path, args)
        if result:
            Path(args.result).write_text(json.dumps(result))
        return

    from cpmctl.model.ant import build_model, param_counts
    from cpmctl.model.checkpoint import save_native, save_original

    config = config_of(args)
    work = Path(args.work) / f"v{args.vocab}-d{args.dim_model}-l{args.layers}"
    native, pt = work / "native", work / "original" / "model.pt"
    if not (native / "model.safetensors").exists() or not pt.exists():
        work.mkdir(parents=True, exist_ok=True)
        model = build_model(config, seed=0)
        save_native(model, native, replace=True)
        pt.parent.mkdir(parents=True, exist_ok=True)
        save_original(model, pt)
        del model
    params = param_counts(config)["total"]
    print(f"model: {params / 1e6:.1f}M parameters, {params * 4 / 2**30:.2f} GiB fp32; {args.nproc} ranks (gloo, CPU)")
    base_single = run_child(args, "single", "baseline", native, 1)["peak_mb"]
    base_rank = max(run_child(args, "rank", "baseline", native, args.nproc)["peaks_mb"])
    print(f"{'start':<22}{'1 process':>12}{'per rank':>12}{'ratio':>8}{'  loads only':>14}  same bits")
    print(f"{'imports only':<22}{base_single:>10.0f}MB{base_rank:>10.0f}MB{base_rank / base_single:>8.2f}")
    ratios = []
    for kind, path in (("native", native), ("original .pt", pt), ("init: new", native)):
        key = "init" if kind.startswith("init") else kind.split()[0]
        one = run_child(args, "single", key, path, 1)
        many = run_child(args, "rank", key, path, args.nproc)
        rank_peak = max(many["peaks_mb"])
        ratio = rank_peak / one["peak_mb"]
        own = (rank_peak - base_rank) / max(one["peak_mb"] - base_single, 1e-9)
        if key != "init":  # the goal is about loading a checkpoint; a new model's single start holds no file copy
            ratios.append(ratio)
        print(f"{kind:<22}{one['peak_mb']:>10.0f}MB{rank_peak:>10.0f}MB{ratio:>8.2f}{own:>14.2f}  "
              f"{'yes' if one['sha256'] == many['sha256'] else 'NO'}")
    print(f"goal (checkpoint loads): per-rank peak at most 0.6x one process at {args.nproc} ranks -> "
          f"{'met' if max(ratios) <= 0.6 else 'not met'} (worst {max(ratios):.2f})")


if __name__ == "__main__":
    main()
