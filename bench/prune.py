"""Learned masks against random and magnitude-based structure selection, down the whole mini ladder.

1. Data: `cpmctl data vocab` and `cpmctl data pack` on the bundled corpus (cpmctl/assets/corpus/batch1.jsonl), with a
   held-out validation split (--synthetic: a Markov-chain corpus instead).
2. A pretrained mini model: `cpmctl pretrain` of mini-10b on that data.
3. Three prune runs mini-10b -> mini-7b -> mini-3b -> mini-2b -> mini-1b -> mini-300m, each arm pruning its own
   previous stage's output:
     learned    hard-concrete masks trained with the weights (LM loss + distillation + Lagrangian) for --mask-steps,
                then --recovery-steps of recovery training;
     magnitude  weight-norm selection, then recovery training;
     random     random selection, then recovery training.
   --budget recovery (default): every arm gets the same --recovery-steps of recovery (the mask phase is the
   learned arm's selection cost). --budget total: the baselines get --mask-steps + --recovery-steps of recovery,
   the same number of weight updates as the learned arm. Same data order and validation rows for every arm.
4. Validation loss after recovery per stage and arm, and relative performance L(mini-10b) / L(stage) next to the
   original's published 96.3 / 92.4 / 86.0 / 76.2 % (7b / 3b / 1b / 300m; its 2b step was not published).

    python bench/prune.py                                  # defaults: a few minutes of CPU per arm
    python bench/prune.py --device cuda --pretrain-steps 2000 --mask-steps 300 --recovery-steps 300 --batch-size 16

Intermediate results are kept under --work (default: a temp dir); rerunning with the same --work reuses the data,
the pretrained model and finished stages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cpmctl.prune.pipeline import prepare, run_prune  # noqa: E402
from cpmctl.prune.recipe import load_prune_recipe  # noqa: E402

PUBLISHED = {"mini-7b": 96.3, "mini-3b": 92.4, "mini-2b": None, "mini-1b": 86.0, "mini-300m": 76.2}
ARMS = ("learned", "magnitude", "random")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Working directory (kept; default: a new temp dir).")
    p.add_argument("--to", default="mini-300m", help="Last stage of the mini ladder.")
    p.add_argument("--vocab-size", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--pretrain-lr", type=float, default=0.02, help="Peak lr (original convention, as recipes/pretrain/mini.yaml).")
    p.add_argument("--mask-steps", type=int, default=40)
    p.add_argument("--recovery-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gate-lr", type=float, default=0.5)
    p.add_argument("--distill", type=float, default=0.5, help="distill.weight of the learned arm.")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--budget", choices=("recovery", "total"), default="recovery",
                   help="recovery: the same recovery steps for every arm; total: the same weight updates.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--synthetic", action="store_true", help="Markov-chain data instead of the bundled corpus.")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cpmctl(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args)], check=True, cwd=ROOT, env=env)


def prepare_data(args, work: Path) -> tuple[Path, Path, Path]:
    """(vocab, train, valid) packed with the real pipeline commands."""
    vocab, packed = work / "vocab.txt", work / "packed"
    if (packed / "valid" / "meta.json").exists():
        return vocab, packed / "train", packed / "valid"
    if args.synthetic:
        from cpmctl.model.tokenizer import CPMAntTokenizer
        from tests.synthetic import write_synthetic_packed  # the test suite's Markov-chain data
        from tests.conftest import write_tiny_vocab

        write_tiny_vocab(vocab)
        n = CPMAntTokenizer(vocab).vocab_size
        write_synthetic_packed(packed / "train", n, 2000, max_length=args.max_length, seed=1)
        write_synthetic_packed(packed / "valid", n, 200, max_length=args.max_length, seed=2)
        return vocab, packed / "train", packed / "valid"
    corpus = ROOT / "cpmctl" / "assets" / "corpus" / "batch1.jsonl"
    cpmctl("data", "vocab", "--input", corpus, "--size", args.vocab_size, "--out", vocab)
    cpmctl("data", "pack", "--input", corpus, "--vocab", vocab, "--out", packed, "--max-length", args.max_length,
           "--valid-fraction", 0.05, "--seed", args.seed)
    return vocab, packed / "train", packed / "valid"


def pretrain(args, work: Path, vocab: Path, train: Path, valid: Path) -> Path:
    out = work / "pretrain"
    if (out / "final" / "config.json").exists():
        return out / "final"
    cpmctl("pretrain", "model.init=mini-10b", f"model.vocab={vocab}", f"data.train={train}", f"data.valid={valid}",
           f"train.steps={args.pretrain_steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.pretrain_lr}",
           "train.schedule=cosine", f"train.warmup_steps={max(1, args.pretrain_steps // 20)}", "train.min_lr_ratio=0.1",
           f"train.save_every={args.pretrain_steps}", "train.valid_every=100", "train.valid_batches=8",
           f"train.device={args.device}", f"out_dir={out}", "resume=true", threads=args.threads)
    return out / "final"


def run_arm(arm: str, args, work: Path, model: Path, vocab: Path, train: Path, valid: Path) -> list[dict]:
    budget = args.recovery_steps + (args.mask_steps if arm != "learned" and args.budget == "total" else 0)
    overrides = [
        f"method={arm}", f"seed={args.seed}", f"data.train={train}", f"data.valid={valid}",
        f"data.eval_batches={args.eval_batches}",
        f"mask.steps={args.mask_steps}", f"mask.batch_size={args.batch_size}", f"mask.device={args.device}",
        f"mask.save_every={args.mask_steps}",
        f"recovery.steps={budget}", f"recovery.batch_size={args.batch_size}", f"recovery.device={args.device}",
        f"recovery.save_every={budget}", f"recovery.warmup_steps={max(1, budget // 10)}", "recovery.valid_batches=0",
        f"gates.lr={args.gate_lr}", f"gates.lambda_lr={args.gate_lr}", f"distill.weight={args.distill}",
    ]
    recipe = load_prune_recipe(ROOT / "recipes" / "prune" / "mini.yaml", overrides)
    plan = prepare("mini-10b", args.to, model, work / f"prune-{arm}-r{budget}", vocab)
    started = time.perf_counter()
    reports = run_prune(plan, recipe, progress=False, log=lambda m: print(f"  [{arm}] {m}", file=sys.stderr))
    print(f"  [{arm}] {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return reports


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="cpmctl-bench-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocab, train, valid = prepare_data(args, work)
    model = pretrain(args, work, vocab, train, valid)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    results = {arm: run_arm(arm, args, work, model, vocab, train, valid) for arm in arms}

    base = results[arms[0]][0]["loss"]["before"]  # the pretrained mini-10b on the validation rows
    baseline_steps = args.recovery_steps + (args.mask_steps if args.budget == "total" else 0)
    print(f"\nmini ladder, {args.mask_steps} mask + {args.recovery_steps} recovery steps per stage (baselines: "
          f"{baseline_steps} recovery steps), batch {args.batch_size} x {args.max_length}, "
          f"device {args.device}; validation loss of the pretrained mini-10b: {base:.4f}")
    header = f"{'stage':<22}" + "".join(f"{a + ' loss':>16}" for a in arms)
    header += "".join(f"{a + ' rel':>14}" for a in arms) + f"{'original rel':>14}  learned best"
    print(header)
    rows = []
    for i, report in enumerate(results[arms[0]]):
        losses = {a: results[a][i]["loss"]["recovered"] for a in arms}
        rel = {a: 100 * base / losses[a] for a in arms}
        published = PUBLISHED.get(report["to"])
        best = "learned" in losses and all(losses["learned"] < losses[a] for a in arms if a != "learned")
        line = f"{report['from'] + ' -> ' + report['to']:<22}" + "".join(f"{losses[a]:>16.4f}" for a in arms)
        line += "".join(f"{rel[a]:>13.1f}%" for a in arms)
        line += f"{(f'{published:.1f}%' if published else '-'):>14}  {'yes' if best else 'NO'}"
        print(line)
        rows.append({"stage": report["to"], "loss": losses, "relative": rel, "published": published,
                     "learned_best": best, "extracted": {a: results[a][i]["loss"]["extracted"] for a in arms}})
    print("relative = L(mini-10b) / L(stage) on the same validation rows; the original's figures are its published "
          "relative performance of 7b / 3b / 1b / 300m.")
    print(f"total {time.perf_counter() - started:.0f} s; work dir {work}")
    (work / "bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "base_loss": base, "stages": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
