"""Selection methods of `cpmctl prune` at equal compute, over seeds, on a base model trained near its loss floor.

1. Data: a synthetic Markov-chain corpus (tests/synthetic.py; --words states, 4 successors each) packed into rows.
   Its floor is known: on lm-task word -> word targets no model can beat the chain's conditional entropy, estimated
   here from the training rows' transition counts and evaluated on the validation rows.
2. A base model (`cpmctl pretrain`), CACHED under --work (default runs/bench-prune/, keyed by every setting that
   changes it): reruns skip data and pretraining, and finished (arm, seed, stage) runs are skipped too.
   --ladder micro (default): the mini ladder's layer / head / dim_ff counts at dim_model 64 (dim_ff / 4), sized
   for a loaded 2-core CPU; --ladder mini: the mini ladder itself; --ladder wide: the mini counts at dim_model 1024,
   dim_head 128, dim_ff x 4 (96.5M parameters at the top: the issue's ~100M run, for a GPU).
3. For every arm and seed, the first --stages stages down the ladder, each arm pruning its own previous stage:
     learned     hard-concrete masks + weights for --mask-steps (LM + distillation + Lagrangian), then recovery;
     activation  activation importance (norm scores) on seeded calibration rows of the training data, then recovery;
     magnitude   weight-norm selection, then recovery;   random  random selection, then recovery;
     METHOD:V    an arm with a variant V of its options (VARIANTS below), e.g. learned:init, activation:loss;
                 the plain activation arm is pinned to the norm scores (importance.layers / heads: norm).
   Equal total compute: every arm makes --mask-steps + --recovery-steps weight updates per stage on batches of the
   same size (the baselines spend the mask phase's steps on recovery), so they train on the same number of tokens.
   With --distill > 0 the learned mask phase distils from the stage's unpruned model, and so does every arm's
   recovery (distill.recovery): equal treatment. Seeds change the data order, the gate noise and init, the random
   selection and the calibration rows; the base model is the same.
4. Per stage and arm: validation loss after recovery, mean and 95% confidence interval (Student t over seeds), the
   relative performance L(base) / L(stage) next to the original's published 96.3 / 92.4 / 86.0 / 76.2 %
   (7b / 3b / 1b / 300m; none for 2b), which arm has the best mean, and which arms' intervals it is clear of and
   which overlap it; then, seed by seed, the --reference arm against every other arm: in how many seeds it is
   lower, the exact sign test, and the paired difference with its interval (`paired`).

    python bench/prune.py --threads 1                                  # micro ladder, all 5 stages, 3 seeds
    python bench/prune.py --arms learned,learned:init,learned:gate-lr --seeds 0,1,2
    python bench/prune.py --threads 1 --pretrain-steps 800 --seeds 0,1,2,3,4 --arms activation:joint-width,activation
    python bench/prune.py --ladder mini --device cuda --pretrain-steps 3000 --stages 5 --batch-size 32
    python bench/prune.py --ladder wide --device cuda --pretrain-steps 800 --seeds 0,1,2   # ~100M (gpu_checks.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cpmctl.model.config import MINI_LADDER, resolve_config  # noqa: E402
from cpmctl.prune.pipeline import prepare, run_prune  # noqa: E402
from cpmctl.prune.recipe import load_prune_recipe  # noqa: E402

PUBLISHED = {"7b": 96.3, "3b": 92.4, "2b": None, "1b": 86.0, "300m": 76.2}
BASE_ARMS = ("learned", "activation", "magnitude", "random")
# Options of an arm, each measured as its own arm `METHOD:NAME` (overrides on top of the method's arm).
VARIANTS = {
    # log_alpha from the ranks of the default importance (drop-one sub-blocks, greedy heads, 32 calibration batches)
    "learned:init": ["gates.init=activation", "importance.layers=loss", "importance.heads=loss",
                     "data.calibration_batches=32"],
    "learned:gate-lr": ["gates.lr=0.2", "gates.lambda_lr=0.2"],  # slower gates (default 0.5)
    "learned:warmup": ["gates.target_warmup=0.7"],  # the target shrinks over 70% of the phase (default 30%)
    "learned:kd-t1": ["distill.temperature=1.0"],  # distillation temperature 1 (default 2)
    "learned:kd-w0.9": ["distill.weight=0.9"],  # distillation weight 0.9 (default --distill)
    "learned:long-mask": [],  # 3/4 of the budget on the mask phase, 1/4 on recovery (same total); set in run_arm
    "activation:loss": ["importance.layers=loss"],  # sub-blocks by their drop-one calibration loss increase
    "activation:loss-heads": ["importance.layers=loss", "importance.heads=loss"],  # and heads by a greedy loss search
    # The same two with 8x the calibration rows (32 batches): loss differences of 1e-2 need more than 32 rows.
    "activation:c32": ["data.calibration_batches=32"],
    "activation:loss-heads-c32": ["importance.layers=loss", "importance.heads=loss", "data.calibration_batches=32"],
    "activation:loss-heads-c64": ["importance.layers=loss", "importance.heads=loss", "data.calibration_batches=64"],
    # The same searches scored by KL(full || candidate) of the next-token distributions instead of the loss change.
    "activation:kl": ["importance.layers=kl", "importance.heads=kl", "data.calibration_batches=32"],
    "activation:kl-layers": ["importance.layers=kl", "importance.heads=loss", "data.calibration_batches=32"],
    # The default with the sub-blocks removed one at a time, each round re-scored (greedy) instead of drop-one.
    "activation:greedy-layers": ["importance.layers=loss", "importance.heads=loss", "data.calibration_batches=32",
                                 "importance.layer_search=greedy"],
    # The default's sub-blocks with Minitron's head norms: the head stages from the same models as the default's.
    "activation:loss-layers-norm-heads": ["importance.layers=loss", "importance.heads=norm",
                                          "data.calibration_batches=32"],
    # The default: loss-heads-c32 with the head search run with the stage's channel cut in place.
    "activation:joint-width": ["importance.layers=loss", "importance.heads=loss", "data.calibration_batches=32",
                               "importance.width_search=joint"],
    # The default with channels scored by the mean norm of their output (mean |h_j| x ||w_out[:, j]||).
    "activation:loss-heads-c32-out": ["importance.layers=loss", "importance.heads=loss", "data.calibration_batches=32",
                                      "importance.channels=output"],
    # learned:init with the weights frozen during the mask phase: only the gates move, recovery trains the weights.
    "learned:init-frozen": ["gates.init=activation", "importance.layers=loss", "importance.heads=loss",
                            "data.calibration_batches=32", "gates.train_weights=false"],
    # learned:init from the default's scores as they are now (the head search with the channel cut in place).
    "learned:init-joint": ["gates.init=activation", "importance.layers=loss", "importance.heads=loss",
                           "data.calibration_batches=32", "importance.width_search=joint"],
    "learned:init-kl": ["gates.init=activation", "importance.layers=kl", "importance.heads=kl",
                        "data.calibration_batches=32"],
}
# The plain activation arm is pinned to the norm scores whatever the recipe's default: its cached runs keep meaning it.
ARM_PINS = {"activation": ["importance.layers=norm", "importance.heads=norm"]}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-prune", help="Cache and work directory.")
    p.add_argument("--ladder", choices=tuple(WIDTHS), default="micro")
    p.add_argument("--stages", type=int, default=5, help="How many stages down the ladder (1-5).")
    p.add_argument("--words", type=int, default=64, help="Markov-chain states of the synthetic corpus.")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=64, help="Row length (32 prompt slots included).")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=0.02, help="Peak lr (original convention).")
    p.add_argument("--base-seed", type=int, default=0,
                   help="The base model's initialisation and data-order seed (same corpus): bases from several seeds.")
    p.add_argument("--mask-steps", type=int, default=20)
    p.add_argument("--recovery-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gate-lr", type=float, default=0.5)
    p.add_argument("--weight-lr", type=float, default=None,
                   help="lr of the weights in the mask phase and in recovery (default: the recipe's recovery.lr; "
                        "the work dir is keyed by it, so caches from another lr are never reused).")
    p.add_argument("--distill", type=float, default=0.5, help="distill.weight (mask phase and every recovery).")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--arms", default=",".join(BASE_ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--reference", default=None,
                   help="Arm compared seed by seed with every other arm (default: the first of --arms).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = p.parse_args()
    if args.weight_lr is None:
        args.weight_lr = load_prune_recipe(ROOT / "recipes" / "prune" / "mini.yaml").recovery.lr
    if not 1 <= args.stages <= len(MINI_LADDER) - 1:
        p.error(f"--stages {args.stages}: the ladder has {len(MINI_LADDER) - 1} stages (1-{len(MINI_LADDER) - 1})")
    return args


def cpmctl(*args, threads: int | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args)], check=True, cwd=ROOT, env=env)


# ----- data, ladder, base model ------------------------------------------------------------------------------
def prepare_data(args, cache: Path) -> tuple[Path, Path, Path]:
    from cpmctl.model.tokenizer import CPMAntTokenizer
    from tests.conftest import write_tiny_vocab
    from tests.synthetic import write_synthetic_packed  # the test suite's Markov-chain data

    vocab, packed = cache / "vocab.txt", cache / "packed"
    if not (packed / "valid" / "meta.json").exists():
        write_tiny_vocab(vocab)
        n = CPMAntTokenizer(vocab).vocab_size
        write_synthetic_packed(packed / "train", n, args.train_rows, max_length=args.max_length, seed=1, words=args.words)
        write_synthetic_packed(packed / "valid", n, 256, max_length=args.max_length, seed=2, words=args.words)
    return vocab, packed / "train", packed / "valid"


# Per --ladder: (dim_model, dim_head, dim_ff scale) applied to the mini ladder's layer / head / dim_ff counts.
WIDTHS = {"micro": (64, 8, 1 / 4), "mini": (None, None, 1), "wide": (1024, 128, 4)}


def ladder_configs(args, cache: Path, vocab_size: int) -> list[Path]:
    """Config files of the ladder's first --stages + 1 rungs: the mini ladder's counts at the --ladder's width."""
    paths = []
    dim_model, dim_head, ff_scale = WIDTHS[args.ladder]
    for name in MINI_LADDER[: args.stages + 1]:
        config = dataclasses.replace(resolve_config(name), vocab_size=vocab_size, half=False)
        if dim_model is not None:
            config = dataclasses.replace(config, dim_model=dim_model, dim_head=dim_head,
                                         dim_ff=max(1, round(config.dim_ff * ff_scale)))
        path = cache / "configs" / f"{name.replace('mini', args.ladder)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.save(path)
        paths.append(path)
    return paths


def pretrain(args, cache: Path, config: Path, vocab: Path, train: Path, valid: Path) -> Path:
    out = cache / "pretrain"
    if not (out / "final" / "config.json").exists():
        cpmctl("pretrain", f"model.init={config}", f"model.vocab={vocab}", f"data.train={train}",
               f"data.valid={valid}", f"model.seed={args.base_seed}", f"train.seed={args.base_seed}",
               f"train.steps={args.pretrain_steps}", f"train.batch_size={args.batch_size * 2}",
               f"train.lr={args.pretrain_lr}", "train.schedule=cosine", f"train.warmup_steps={args.pretrain_steps // 20}",
               "train.min_lr_ratio=0.1", f"train.save_every={args.pretrain_steps}", "train.valid_every=100",
               "train.valid_batches=8", f"train.device={args.device}", f"out_dir={out}", "resume=true",
               threads=args.threads)
    return out / "final"


@torch.no_grad()
def floor_report(model_dir: Path, train: Path, valid: Path, device: str) -> dict:
    """The base model's loss on lm-task word -> word validation targets, next to the chain's conditional entropy
    on the same targets (transition probabilities counted on the training rows): the floor no model can beat."""
    from cpmctl.data.packed_format import PackedDataset, PackedReader
    from cpmctl.model.checkpoint import load_model
    from cpmctl.model.inputs import LM_TASK
    from tests.synthetic import FIRST_WORD

    def pairs(arrays):
        inp, tgt, task = (np.asarray(arrays[k]).astype(np.int64) for k in ("input", "target", "task"))
        keep = (task == LM_TASK) & (inp >= FIRST_WORD) & (tgt >= FIRST_WORD)
        return inp, tgt, keep

    inp, tgt, keep = pairs(PackedDataset(train).arrays)
    size = int(max(inp.max(), tgt.max())) + 1
    counts = np.zeros((size, size))
    np.add.at(counts, (inp[keep], tgt[keep]), 1)
    prob = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    model, _ = load_model(model_dir, device=device)
    model.eval()
    data = PackedDataset(valid)
    reader = PackedReader(data, 16, shuffle=False)
    nll, floor, count = 0.0, 0.0, 0
    for _ in range(len(data) // 16):
        batch = reader.next_batch()
        i, t, k = pairs({n: batch[n].numpy() for n in ("input", "target", "task")})
        logits = model(*(batch[n].to(device) for n in ("input", "segment", "context", "span"))).float().cpu()
        mask = torch.from_numpy(k)
        nll += float(torch.nn.functional.cross_entropy(logits[mask], batch["target"][mask].long(), reduction="sum"))
        floor += float(-np.log(np.maximum(prob[i[k], t[k]], 1e-12)).sum())
        count += int(k.sum())
    return {"model_lm_word_loss": nll / count, "chain_floor": floor / count, "targets": count}


# ----- arms --------------------------------------------------------------------------------------------------
def run_arm(arm: str, seed: int, args, work: Path, base: Path, configs: list[Path], vocab: Path, train: Path,
            valid: Path) -> list[dict]:
    method, _, variant = arm.partition(":")
    mask_steps, recovery_steps = args.mask_steps, args.recovery_steps
    if variant == "long-mask":
        total = args.mask_steps + args.recovery_steps  # three quarters of the same budget on the mask phase
        mask_steps = total * 3 // 4
        recovery_steps = total - mask_steps
    if method != "learned":  # the mask phase's weight updates go to recovery: equal total compute
        recovery_steps, mask_steps = args.mask_steps + args.recovery_steps, 0
    overrides = [
        f"method={method}", f"seed={seed}", f"data.train={train}", f"data.valid={valid}",
        f"data.eval_batches={args.eval_batches}", f"data.calibration_batches={args.calibration_batches}",
        f"mask.steps={max(mask_steps, 1)}", f"mask.batch_size={args.batch_size}", f"mask.device={args.device}",
        f"mask.save_every={max(mask_steps, 1)}", f"mask.seed={seed}",
        f"recovery.steps={recovery_steps}", f"recovery.batch_size={args.batch_size}", f"recovery.device={args.device}",
        f"recovery.save_every={recovery_steps}", f"recovery.warmup_steps={max(1, recovery_steps // 10)}",
        "recovery.valid_batches=0", f"recovery.seed={seed}",
        f"gates.lr={args.gate_lr}", f"gates.lambda_lr={args.gate_lr}", f"distill.weight={args.distill}",
        f"mask.lr={args.weight_lr}", f"recovery.lr={args.weight_lr}",
        f"distill.recovery={'true' if args.distill > 0 else 'false'}", *ARM_PINS.get(method, []),
        "importance.width_search=separate",  # what every arm measured before joint was the default; variants set it
        *VARIANTS.get(arm, []),
    ]
    recipe = load_prune_recipe(ROOT / "recipes" / "prune" / "mini.yaml", overrides)
    reports, source = [], base
    started = time.perf_counter()
    for k in range(args.stages):
        out = work / "runs" / arm.replace(":", "-") / f"seed{seed}" / f"stage{k + 1}"
        plan = prepare(str(configs[k]), str(configs[k + 1]), source, out, vocab)
        report = run_prune(plan, recipe, progress=False, log=lambda m: print(f"  [{arm} s{seed}] {m}", file=sys.stderr))[0]
        reports.append(report)
        source = out / plan.stages[0].dirname / "model"
    print(f"  [{arm} s{seed}] {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return reports


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def paired(reference: list[float], other: list[float]) -> dict:
    """The same seeds of two arms: in how many the reference is lower, the one-sided exact sign test's p (ties
    dropped; the chance of that many wins or more if neither arm were better), and the mean paired difference
    other - reference with its 95% Student-t half-width. Seed by seed, a seed's data order and calibration rows are
    shared by both arms, so this is the test of "the reference is better", which the two per-arm intervals are
    not: one arm's breakdown in one seed widens its own interval, not the evidence of the other seeds."""
    diffs = [o - r for r, o in zip(reference, other)]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0
    mean, half = interval(diffs)
    return {"wins": wins, "seeds": len(diffs), "sign_p": p, "diff_mean": mean, "diff_ci95": half}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    key = (f"{args.ladder}-w{args.words}-r{args.train_rows}-l{args.max_length}-p{args.pretrain_steps}"
           f"-lr{args.pretrain_lr}-b{args.batch_size}" + (f"-s{args.base_seed}" if args.base_seed else ""))
    cache = args.work / key
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocab, train, valid = prepare_data(args, cache)
    from cpmctl.model.tokenizer import CPMAntTokenizer

    configs = ladder_configs(args, cache, CPMAntTokenizer(vocab).vocab_size)
    base = pretrain(args, cache, configs[0], vocab, train, valid)
    floor = floor_report(base, train, valid, args.device)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in BASE_ARMS and a not in VARIANTS]
    if unknown:
        raise SystemExit(f"--arms {unknown[0]}: no such arm (known: {', '.join((*BASE_ARMS, *VARIANTS))})")
    seeds = [int(s) for s in args.seeds.split(",")]
    reference = args.reference or arms[0]
    if reference not in arms:
        raise SystemExit(f"--reference {reference}: not among --arms ({', '.join(arms)})")
    work = cache / (f"m{args.mask_steps}-r{args.recovery_steps}-b{args.batch_size}-g{args.gate_lr}-d{args.distill}"
                    f"-c{args.calibration_batches}-e{args.eval_batches}"
                    f"-w{args.weight_lr}")
    results = {arm: [run_arm(arm, s, args, work, base, configs, vocab, train, valid) for s in seeds] for arm in arms}

    base_loss = results[arms[0]][0][0]["loss"]["before"]
    steps = args.mask_steps + args.recovery_steps
    print(f"\n{args.ladder} ladder, {len(seeds)} seeds, equal compute: {steps} weight updates per stage and arm "
          f"(learned: {args.mask_steps} mask + {args.recovery_steps} recovery), batch {args.batch_size} x "
          f"{args.max_length}, distill {args.distill}, device {args.device}")
    print(f"base: validation loss {base_loss:.4f}; on lm word->word targets {floor['model_lm_word_loss']:.4f} vs the "
          f"chain's floor {floor['chain_floor']:.4f} ({floor['targets']} targets)")
    w = 2 + max(len(f"{Path(r['from']).stem} -> {Path(r['to']).stem}") for r in results[arms[0]][0])  # stage column
    print(f"{'stage':<{w}}{'arm':<18}{'recovered loss (95% CI)':>26}{'extracted':>11}{'rel.':>8}{'original':>10}")
    rows = []
    for k in range(args.stages):
        stage = {}
        for arm in arms:
            rec = [r[k]["loss"]["recovered"] for r in results[arm]]
            ext = [r[k]["loss"]["extracted"] for r in results[arm]]
            mean, half = interval(rec)
            stage[arm] = {"recovered": rec, "mean": mean, "ci95": half, "extracted_mean": statistics.fmean(ext),
                          "relative": 100 * base_loss / mean}
        first = results[arms[0]][0][k]
        name = f"{Path(first['from']).stem} -> {Path(first['to']).stem}"
        published = PUBLISHED.get(Path(first["to"]).stem.split("-")[-1])
        for arm in arms:
            s = stage[arm]
            print(f"{name:<{w}}{arm:<18}{s['mean']:>15.4f} +- {s['ci95']:<7.4f}{s['extracted_mean']:>11.4f}"
                  f"{s['relative']:>7.1f}%{(f'{published:.1f}%' if published else '-'):>10}")
        best = min(arms, key=lambda a: stage[a]["mean"])
        # Which other arms' intervals lie wholly above the best's: the claim "best outside the intervals" per peer.
        clear_of = [a for a in arms if a != best
                    and stage[best]["mean"] + stage[best]["ci95"] < stage[a]["mean"] - stage[a]["ci95"]]
        overlaps = [a for a in arms if a != best and a not in clear_of]
        clear = len(arms) > 1 and not overlaps
        verdict = (" (the only arm)" if len(arms) == 1 else " (outside the intervals)" if clear
                   else " (intervals overlap)")
        print(f"{'':<{w}}best: {best}{verdict}"
              + (f"; clear of {', '.join(clear_of)}" if clear_of and overlaps else "")
              + (f"; overlaps {', '.join(overlaps)}" if overlaps else ""))
        comparisons = {a: paired(stage[reference]["recovered"], stage[a]["recovered"]) for a in arms if a != reference}
        for a, c in comparisons.items():
            print(f"{'':<{w}}{reference} vs {a}: lower in {c['wins']}/{c['seeds']} seeds (sign test p "
                  f"{c['sign_p']:.3f}), paired difference {c['diff_mean']:+.4f} +- {c['diff_ci95']:.4f}")
        rows.append({"stage": name, "published": published, "arms": stage, "best": best, "best_clear": clear,
                     "clear_of": clear_of, "overlaps": overlaps, "reference": reference, "paired": comparisons})
    print("relative = L(base) / L(stage) on the same validation rows (the original's figures are task-performance "
          "ratios of a converged 10b after long recovery: a reference, not the same measure).")
    print(f"total {time.perf_counter() - started:.0f} s; work dir {work}")
    (work / "bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "base_loss": base_loss, "floor": floor, "stages": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
