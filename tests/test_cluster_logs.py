"""Cluster logs: with stderr piped (Slurm, nohup), a long command prints plain timestamped progress lines on stderr
while it runs (at CPMCTL_LOG_INTERVAL seconds, here 0.05 s), stdout stays JSON-only, metrics rows carry a time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.train.metrics import read_metrics
from tests.conftest import REPO, tiny_config
from tests.synthetic import write_synthetic_packed

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d  ")


def test_pretrain_with_stderr_piped_prints_timestamped_lines_while_running(tmp_path, tiny_vocab):
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    data = write_synthetic_packed(tmp_path / "data", vocab_size, 16, max_length=64, seed=0, words=40)
    config = tmp_path / "tiny.json"
    tiny_config(vocab_size, num_layers=1).save(config)
    steps = 200  # long enough for several intervals on a fast machine (60 steps once ran in under 0.2 s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CPMCTL_LOG_INTERVAL": "0.05"}
    command = [sys.executable, "-m", "cpmctl", "pretrain", f"model.init={config}", f"model.vocab={tiny_vocab}",
               f"data.train={data}", f"out_dir={tmp_path / 'run'}", "train.device=cpu", f"train.steps={steps}",
               "train.batch_size=2", "train.log_every=1000", "train.save_every=1000", "train.valid_batches=0", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[tuple[str, bool]] = []  # (line, was the command still running when it arrived)

    def read_stderr():
        for line in proc.stderr:
            lines.append((line.rstrip("\n"), proc.poll() is None))

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, "\n".join(line for line, _ in lines)[-3000:]
    reader.join()

    progress = [(line, live) for line, live in lines if STAMP.match(line) and " train " in line]
    assert len(progress) >= 2, lines  # periodic lines, not only the final one
    assert any(live for _, live in progress[:-1]), "no progress line arrived before the command ended"
    last = progress[-1][0]
    assert f"{steps}/{steps} steps" in last
    for field in ("loss ", "lr ", "tok/s", "elapsed ", "eta "):
        assert field in last, last
    steps_seen = [int(re.search(r"train  (\d+)/", line).group(1)) for line, _ in progress]
    assert steps_seen == sorted(steps_seen) and steps_seen[0] < steps
    # stdout: one JSON object, nothing else.
    assert json.loads(stdout)["steps"] == steps
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and all(re.match(r"\d{4}-\d\d-\d\dT", row["time"]) for row in rows)


def test_count_bar_prints_plain_lines_when_stderr_is_not_a_terminal(capfd, monkeypatch):
    from cpmctl import progress

    monkeypatch.setenv("CPMCTL_LOG_INTERVAL", "0")
    monkeypatch.setattr(progress, "plain_logs", lambda: True)
    with progress.count_bar("eval demo") as bar:
        job = bar.add_task("predict", total=3)
        for _ in range(3):
            bar.advance(job, 1)
            time.sleep(0.01)
    err = capfd.readouterr().err.splitlines()
    plain = [line for line in err if STAMP.match(line)]
    assert [re.search(r"(\d)/3", line).group(1) for line in plain] == ["1", "2", "3"], err
    assert "eval demo predict" in plain[0] and "eta " in plain[0]


def test_a_bad_log_interval_is_one_line_error(monkeypatch):
    import pytest

    from cpmctl import CpmctlError, progress

    monkeypatch.setenv("CPMCTL_LOG_INTERVAL", "soon")
    with pytest.raises(CpmctlError, match="CPMCTL_LOG_INTERVAL"):
        progress.log_interval()
