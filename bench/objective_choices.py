"""Two choices where cpmctl differs from the original on purpose, measured on a short run (issue 16, rows 8 and 9).

    python bench/objective_choices.py                 # about 5 minutes on 2 CPU cores
    python bench/objective_choices.py --steps 400 --seeds 0 1 2

Arms, each pretraining the same small CPM-Ant on the bundled corpus for --steps steps with the mini recipe's
settings, then scoring the same held-out rows (prompt slots from the prompt embedding in every arm's validation
data, so the numbers compare):
- baseline: cpmctl's defaults (every record of a packed row gets its prompt slots from the prompt embedding;
  weight decay on 2-D weights only);
- later-prompts=input-embedding: the original's quirk, later records of a row read their prompt ids from the
  input embedding (`data pack --later-prompts input-embedding`);
- weight_decay_on=all: the original's single optimizer group, decay on every parameter (norms, position bias).

It prints the validation loss of each arm and seed, their mean, and the difference to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "cpmctl" / "assets" / "corpus" / "batch1.jsonl"
CONFIG = {"vocab_size": 5000, "dim_model": 128, "dim_ff": 320, "num_layers": 4, "num_heads": 4, "dim_head": 32}


def cpmctl(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args), "--json"], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpmctl-objective-"))
    vocab = work / "vocab.txt"
    cpmctl("data", "vocab", "-i", CORPUS, "--size", CONFIG["vocab_size"], "-o", vocab)
    config = work / "small.json"
    config.write_text(json.dumps(CONFIG))
    for mode in ("prompt-embedding", "input-embedding"):
        cpmctl("data", "pack", "-i", CORPUS, "--vocab", vocab, "-o", work / mode, "--max-length", 256,
               "--valid-fraction", 0.05, "--later-prompts", mode, "-w", 1)
    valid = work / "prompt-embedding" / "valid"  # the same held-out rows for every arm
    arms = {
        "baseline": (work / "prompt-embedding" / "train", []),
        "later-prompts=input-embedding": (work / "input-embedding" / "train", []),
        "weight_decay_on=all": (work / "prompt-embedding" / "train", ["train.weight_decay_on=all"]),
    }
    results: dict[str, list[float]] = {}
    for arm, (train, extra) in arms.items():
        for seed in args.seeds:
            out = work / f"run-{arm}-{seed}"
            r = cpmctl("pretrain", "--recipe", ROOT / "recipes" / "pretrain" / "mini.yaml", f"model.init={config}",
                       f"model.vocab={vocab}", f"model.seed={seed}", f"data.train={train}", f"data.valid={valid}",
                       f"out_dir={out}", f"train.steps={args.steps}", f"train.seed={seed}", "train.valid_every=1000000",
                       "train.valid_batches=20", "train.save_every=1000000", "train.device=cpu", *extra)
            results.setdefault(arm, []).append(r["valid_loss"])
            print(f"{arm:32s} seed {seed}: valid loss {r['valid_loss']:.4f}", flush=True)
    base = statistics.mean(results["baseline"])
    print(f"\n{args.steps} steps, seeds {args.seeds}")
    for arm, losses in results.items():
        mean = statistics.mean(losses)
        print(f"{arm:32s} mean valid loss {mean:.4f}  ({mean - base:+.4f} vs baseline)")


if __name__ == "__main__":
    main()
