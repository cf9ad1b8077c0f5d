"""Start-up time of light cpmctl commands against `python -c "import torch"`, measured in the same script on the
same machine, as the ratio command / torch import (goal for `cpmctl --help`: at most 0.2).

Each command runs in a fresh interpreter (`python -m cpmctl ...`, as a shell script calling cpmctl per file
would); the median of --runs wall-clock times is reported. `data tokenize` reads a one-line file from stdin with
the vocabulary given (by default a small one written from the demo corpus' characters); its time includes jieba
loading its dictionary (cached after the first run) but no torch.

    python bench/startup.py
    python bench/startup.py --runs 7 --vocab ../shared/reference/ant.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(argv: list[str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return seconds


def median_wall(argv: list[str], runs: int, stdin: str | None = None) -> float:
    wall(argv, stdin)  # warm the file cache (and jieba's dictionary cache) first
    return statistics.median(wall(argv, stdin) for _ in range(runs))


def small_vocab(path: Path) -> Path:
    """A vocabulary of the special tokens and the characters of a demo sentence (enough to tokenize it)."""
    sys.path.insert(0, str(ROOT))
    from cpmctl.model.tokenizer import SPECIAL_TOKENS

    chars = sorted(set("今天天气很好我们学校的图书馆北京的冬天"))
    path.write_text("\n".join(list(SPECIAL_TOKENS) + chars) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median)")
    parser.add_argument("--vocab", type=Path, default=None, help="vocabulary for `data tokenize`")
    args = parser.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        vocab = args.vocab or small_vocab(Path(tmp) / "vocab.txt")
        commands = {
            "cpmctl --help": ([py, "-m", "cpmctl", "--help"], None),
            "cpmctl recipes list": ([py, "-m", "cpmctl", "recipes", "list"], None),
            "cpmctl data tokenize -": ([py, "-m", "cpmctl", "data", "tokenize", "-", "--vocab", str(vocab)],
                                       "今天天气很好\n"),
        }
        torch_s = median_wall([py, "-c", "import torch"], args.runs)
        print(f"python -c 'import torch'   {torch_s:7.3f} s  (median of {args.runs})")
        for label, (argv, stdin) in commands.items():
            seconds = median_wall(argv, args.runs, stdin)
            print(f"{label:26s} {seconds:7.3f} s  ratio {seconds / torch_s:.3f}")


if __name__ == "__main__":
    main()
