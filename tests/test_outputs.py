"""The output policy through the real CLI (cpmctl/outputs.py, docs/cli.md "Outputs"): nothing a user made is
replaced or deleted by mistake, an output is never one of the inputs, --force replaces only once the new output is
complete, one writer per output, and a killed `run` driver takes its stage child with it. Every refused case
checks that the target is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpmctl.data.store import DedupStore
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.outputs import MARKER, lock, sidecar
from tests.conftest import REPO, run_cli
from tests.synthetic import write_synthetic_packed

DOCS = ["今天天气不错，我们去公园散步。北京是中国的首都，有很多历史文化。" * 3 + f"第{i}篇。" for i in range(60)]


def tree(path: Path) -> dict:
    """Every file under `path` (or the file itself) -> sha1 of its bytes, plus the directory listing."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    # Progress lines (stderr is not a terminal here: timestamped lines, cpmctl/progress.py) may come first.
    lines = [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def leftovers(directory: Path) -> list[str]:
    """Temp names beside outputs (`.NAME.PID.*.tmp`, `.NAME.PID.old`)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS), encoding="utf-8")
    return path


@pytest.fixture
def model(capsys, tmp_path, config, tiny_vocab) -> Path:
    code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "m")
    assert code == 0, err
    return tmp_path / "m"


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's directory that cpmctl did not write."""
    path = tmp_path / "project"
    (path / "src").mkdir(parents=True)
    (path / "notes.txt").write_text("three weeks of notes\n")
    (path / "src" / "train.py").write_text("print('mine')\n")
    return path


# ----- refusing what is not ours --------------------------------------------------------------------------------
def test_a_foreign_directory_is_refused_by_every_model_writer(capsys, tmp_path, model, project, config, tiny_vocab):
    before = tree(project)
    for argv in (["model", "convert", model, "--to", "native", "--out", project],
                 ["model", "convert", model, "--to", "hf", "--out", project],
                 ["model", "convert", model, "--to", "original", "--out", project],
                 ["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", project],
                 ["tune", "merge", "--model", model, "--adapter", tmp_path, "--out", project]):
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err, str(project), "not written by cpmctl", "--force")
    assert tree(project) == before and leftovers(tmp_path) == []


def test_model_init_does_not_replace_a_checkpoint_another_command_wrote(capsys, tmp_path, model, config, tiny_vocab):
    code, _, err = run_cli(capsys, "model", "convert", model, "--to", "native", "--out", tmp_path / "trained")
    assert code == 0, err
    before = tree(tmp_path / "trained")
    code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "trained")
    one_line_error(code, err, "holds the output of `cpmctl model convert`")
    assert tree(tmp_path / "trained") == before
    # Its own output is rewritten without --force (a rerun of the same command).
    code, _, err = run_cli(capsys, "model", "convert", model, "--to", "native", "--out", tmp_path / "trained")
    assert code == 0, err


def test_an_output_that_is_an_input_is_refused(capsys, tmp_path, corpus, model, tiny_vocab):
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(corpus)
    os.link(corpus, hard)
    before, model_before = tree(corpus), tree(model)
    cases = [
        (["data", "filter", "-i", corpus, "-o", corpus], "--output"),
        (["data", "filter", "-i", corpus, "-o", link], "--output"),
        (["data", "filter", "-i", corpus, "-o", hard], "--output"),
        (["data", "filter", "-i", corpus, "-o", tmp_path / "kept.jsonl", "--rejected", corpus], "--rejected"),
        (["data", "dedup", "-i", corpus, "-o", corpus, "--store", tmp_path / "s.sqlite"], "--output"),
        (["data", "vocab", "-i", corpus, "-o", corpus, "--size", "400"], "--out"),
        (["model", "convert", model, "--to", "native", "--out", model], "--out"),
        (["tune", "merge", "--model", model, "--adapter", tmp_path, "--out", model], "--out"),
        (["model", "init", "--config", "mini-10b", "--vocab", tiny_vocab, "--out", tiny_vocab.parent], "--out"),
    ]
    for argv, flag in cases:
        for _ in range(2):  # twice: the second run must not find an emptied input
            code, _, err = run_cli(capsys, *argv)
            one_line_error(code, err, flag)
    assert tree(corpus) == before and tree(model) == model_before
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "kept.jsonl").exists()


def test_own_outputs_are_rewritten_and_a_changed_file_is_no_longer_ours(capsys, tmp_path, corpus):
    out, vocab = tmp_path / "kept.jsonl", tmp_path / "vocab.txt"
    for _ in range(2):
        code, _, err = run_cli(capsys, "data", "filter", "-i", corpus, "-o", out, "--rejected", tmp_path / "rej.jsonl")
        assert code == 0, err
        code, _, err = run_cli(capsys, "data", "vocab", "-i", corpus, "-o", vocab, "--size", "400")
        assert code == 0, err
    assert sidecar(out).exists() and json.loads(sidecar(out).read_text())["command"] == "data filter"
    vocab.write_text(vocab.read_text() + "我的词\n")  # the user edits it: not cpmctl's output any more
    before = tree(vocab)
    code, _, err = run_cli(capsys, "data", "vocab", "-i", corpus, "-o", vocab, "--size", "400")
    one_line_error(code, err, "not written by cpmctl `data vocab`")
    assert tree(vocab) == before
    code, _, err = run_cli(capsys, "data", "vocab", "-i", corpus, "-o", vocab, "--size", "400", "--force")
    assert code == 0 and "我的词" not in vocab.read_text(), err


def test_json_error_object_on_stdout(capsys, tmp_path, corpus):
    code, out, err = run_cli(capsys, "data", "filter", "-i", corpus, "-o", corpus, "--json")
    assert code == 2 and json.loads(out) == {"error": err.strip()[len("error: "):], "exit_code": 2}


# ----- --force: replace only after success ----------------------------------------------------------------------
def test_force_replaces_a_directory_only_once_the_new_one_is_complete(capsys, tmp_path, model, project, monkeypatch):
    before = tree(project)
    # A damaged source: the conversion fails after the check, the old directory is untouched.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((model / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5000])
    code, _, err = run_cli(capsys, "model", "convert", bad, "--to", "native", "--out", project, "--force")
    one_line_error(code, err, "cannot read safetensors")
    assert tree(project) == before and leftovers(tmp_path) == []

    # The write itself fails halfway (the device fills up): the old directory is untouched, no temp is left.
    import cpmctl.model.checkpoint as checkpoint

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code, _, err = run_cli(capsys, "model", "convert", model, "--to", "native", "--out", project, "--force")
    one_line_error(code, err, "disk full", str(project))
    assert tree(project) == before and leftovers(tmp_path) == []
    monkeypatch.undo()

    code, _, err = run_cli(capsys, "model", "convert", model, "--to", "native", "--out", project, "--force")
    assert code == 0, err
    assert (project / MARKER).exists() and not (project / "notes.txt").exists() and leftovers(tmp_path) == []


def test_force_replaces_a_file_only_after_a_successful_run(capsys, tmp_path, corpus):
    target = tmp_path / "mine.jsonl"
    target.write_text('{"text": "my own data"}\n')
    before = tree(target)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(corpus.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "data", "filter", "-i", broken, "-o", target, "--strict", "--force")
    one_line_error(code, err, "--strict")
    assert tree(target) == before and leftovers(tmp_path) == []
    code, _, err = run_cli(capsys, "data", "filter", "-i", corpus, "-o", target, "--force")
    assert code == 0 and "my own data" not in target.read_text(), err


# ----- housekeeping ---------------------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temps_of_a_killed_run_are_removed_by_the_next_run(capsys, tmp_path, corpus):
    out = tmp_path / "kept.jsonl"
    dead, live = dead_pid(), os.getppid()
    stale = [tmp_path / f".kept.jsonl.{dead}.abcd1234.tmp", tmp_path / f".kept.jsonl.{dead}.efgh5678.spool.tmp"]
    for p in stale:
        p.write_text("half")
    (tmp_path / f".kept.jsonl.{dead}.ijkl9012.tmp").mkdir()
    busy = tmp_path / f".kept.jsonl.{live}.mnop3456.tmp"  # a live writer's
    busy.write_text("in progress")
    other = tmp_path / f".kept.jsonl.gz.{dead}.qrst7890.tmp"  # another output's temp
    other.write_text("not ours")
    code, _, err = run_cli(capsys, "data", "filter", "-i", corpus, "-o", out)
    assert code == 0, err
    assert leftovers(tmp_path) == sorted([busy.name, other.name])

    # A swap cut short between its two renames: the old directory is put back, not deleted.
    saved = tmp_path / f".ckpt.{dead}.old"
    saved.mkdir()
    (saved / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, "model", "init", "--config", "mini-10b", "--vocab", corpus, "--out", tmp_path / "ckpt")
    assert code == 2 and (tmp_path / "ckpt" / "notes.txt").read_text() == "keep"


def test_outputs_honour_the_umask(capsys, tmp_path, config, tiny_vocab, corpus):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "a")
        assert code == 0, err
        code, _, err = run_cli(capsys, "data", "filter", "-i", corpus, "-o", tmp_path / "k.jsonl")
        assert code == 0, err
        os.umask(0o077)
        code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "b")
        assert code == 0, err
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a" / "model.safetensors") == 0o644 and mode(tmp_path / "a") == 0o755
    assert mode(tmp_path / "k.jsonl") == 0o644
    assert mode(tmp_path / "b" / "model.safetensors") == 0o600


# ----- one writer per output ------------------------------------------------------------------------------------
def test_a_symlinked_dedup_store_meets_the_same_lock(capsys, tmp_path, corpus):
    store, link = tmp_path / "s.sqlite", tmp_path / "link.sqlite"
    link.symlink_to(store)
    with DedupStore.open(store):
        code, _, err = run_cli(capsys, "data", "dedup", "-i", corpus, "-o", tmp_path / "o.jsonl", "--store", link)
        one_line_error(code, err, f"in use by PID {os.getpid()}")
    code, _, err = run_cli(capsys, "data", "dedup", "-i", corpus, "-o", tmp_path / "o.jsonl", "--store", link)
    assert code == 0, err
    with DedupStore.open(store) as s:
        rows = s.conn.execute("SELECT (SELECT count(*) FROM paragraphs) + (SELECT count(*) FROM recent) "
               "+ (SELECT coalesce(sum(length(hashes)), 0) / 8 FROM pending)").fetchone()[0]
        assert rows == s.paragraph_count > 0


def test_a_refused_store_is_left_byte_identical(capsys, tmp_path, corpus):
    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    db.close()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all " * 100)
    for store, message in ((foreign, "not a cpmctl dedup store"), (junk, "not a usable SQLite database")):
        before = tree(store)
        code, _, err = run_cli(capsys, "data", "dedup", "-i", corpus, "-o", tmp_path / "o.jsonl", "--store", store)
        one_line_error(code, err, message)
        assert tree(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite", "docs.jsonl", "junk.sqlite"]  # no -wal, .lock
    # A bad argument creates no empty store.
    code, _, err = run_cli(capsys, "data", "dedup", "-i", corpus, "-o", tmp_path / "o.jsonl", "--store",
                           tmp_path / "new.sqlite", "--threshold", "2")
    one_line_error(code, err, "--threshold")
    assert not list(tmp_path.glob("new.sqlite*"))


@pytest.fixture
def pretrain_args(tmp_path, config, tiny_vocab) -> list[str]:
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    train = write_synthetic_packed(tmp_path / "train", vocab_size, 24, max_length=80, seed=0, words=40)
    return [f"model.init={config}", f"model.vocab={tiny_vocab}", f"data.train={train}", f"out_dir={tmp_path / 'run'}",
            "train.batch_size=4", "train.warmup_steps=1", "train.device=cpu", "train.lr=1e-2", "train.valid_batches=0"]


def test_two_pretrains_on_one_out_dir_end_with_one_writer(capsys, tmp_path, pretrain_args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = pretrain_args + ["train.steps=100000", "train.save_every=100000", "train.log_every=1"]
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "cpmctl", "pretrain", *args], cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 90
        while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, log.read_text()
        code, _, err = run_cli(capsys, "pretrain", *args)  # the second writer
        one_line_error(code, err, f"in use by PID {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)  # the first one saves a checkpoint and stops
        first.wait(timeout=60)
    assert first.returncode == 130, log.read_text()
    steps = [row["step"] for row in map(json.loads, metrics.read_text().splitlines()) if "loss" in row]
    assert steps == list(range(1, len(steps) + 1))  # one writer's rows, in order
    code, _, err = run_cli(capsys, "pretrain", *pretrain_args, "train.steps=2", "--resume", tmp_path / "run")
    assert code == 0, err  # the lock went with the first process


def test_pretrain_refuses_a_foreign_out_dir_and_force_swaps_in_the_finished_run(capsys, tmp_path, pretrain_args,
                                                                                project):
    args = [a for a in pretrain_args if not a.startswith("out_dir=")] + [f"out_dir={project}", "train.steps=2",
                                                                         "train.save_every=2"]
    before = tree(project)
    code, _, err = run_cli(capsys, "pretrain", *args)
    one_line_error(code, err, "out_dir", "not written by cpmctl `pretrain`")
    assert tree(project) == before
    code, out, err = run_cli(capsys, "pretrain", *args, "--force", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["final"] == str(project / "final")
    assert (project / "final" / "model.safetensors").exists() and not (project / "notes.txt").exists()
    assert leftovers(tmp_path) == []


# ----- the run driver and its stage children --------------------------------------------------------------------
def _processes(field: int, value: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose /proc stat field (1 = parent, 2 = process group) is `value`;
    a container's init may never reap zombies."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    return _processes(1, pid)


def _alive_in_group(pgid: int) -> list[int]:
    return _processes(2, pgid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_run_driver_leaves_no_stage_child(tmp_path, how):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "今天天气不错，我们去公园散步。" * 20}, ensure_ascii=False) + "\n"
    big.write_text(line * 60_000, encoding="utf-8")  # a filter stage of many seconds
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CPMCTL_STOP_GRACE_S": "5"}
    log = tmp_path / "driver.log"
    with open(log, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "cpmctl", "run", REPO / "recipes" / "lifecycle" / "mini.yaml",
                                   f"run_dir={run_dir}", "stages=[filter]", f"data.input=[{big}]",
                                   "data.next_batch=[]", "data.workers=2"], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    child = None
    try:
        deadline, child = time.time() + 60, None
        while time.time() < deadline and child is None:
            kids = _children(driver.pid)
            if kids and os.getpgid(kids[0]) == kids[0] and len(_alive_in_group(kids[0])) >= 3:
                child = kids[0]  # the stage child leads its own group, with its two workers
            time.sleep(0.1)
        assert child is not None and driver.poll() is None, log.read_text()
        driver.send_signal(how)
        driver.wait(timeout=30)
        deadline = time.time() + 20
        while _alive_in_group(child) and time.time() < deadline:
            time.sleep(0.1)
        assert _alive_in_group(child) == [], "the stage child (or one of its workers) outlived the driver"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _alive_in_group(child) if child else []:
            os.kill(pid, signal.SIGKILL)
        big.unlink()  # 50 MB
    if how == signal.SIGTERM:
        assert driver.returncode == 130, log.read_text()
    assert not (run_dir / "data" / "batch1.filtered.jsonl").exists()  # no partial output
    lock(run_dir, "run_dir").release()  # nobody holds the run any more


def test_a_non_writer_rank_waits_for_the_writers_marker(tmp_path, monkeypatch):
    """Another rank of a distributed run may check --out between the writer's lock and its marker: it waits for
    the marker instead of refusing the directory being created; a locked directory that never gets one is refused."""
    import threading

    from cpmctl import CpmctlError

    from cpmctl import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / outputs.LOCK).write_text("123")  # the writer has locked, its marker is not there yet
    timer = threading.Timer(0.3, outputs.write_marker, (out, "prune"))
    timer.start()
    try:
        rd = outputs.run_dir(out, "prune", writer=False)
    finally:
        timer.join()
    assert rd.work == out and rd.locks == []
    other = tmp_path / "other"
    other.mkdir()
    (other / outputs.LOCK).write_text("123")
    (other / "notes.txt").write_text("a user's file")
    monkeypatch.setattr(outputs, "_CLAIM_WAIT_S", 0.2)
    with pytest.raises(CpmctlError, match="not written by cpmctl"):
        outputs.run_dir(other, "prune", writer=False)
    assert (other / "notes.txt").read_text() == "a user's file"
