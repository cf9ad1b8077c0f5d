"""Faults of the environment through the real CLI: a read-only or full device, a directory where a file is expected,
damaged checkpoints, impossible settings, text that is not UTF-8. Each is one `error:` line with exit code 2 and
leaves nothing partial behind; never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from cpmctl.model.tokenizer import CPMAntTokenizer
from tests.conftest import REPO, run_cli
from tests.synthetic import write_synthetic_packed
from tests.test_outputs import leftovers, one_line_error

POOL = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看"


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 0.8 MB of varied text that passes every filter rule (so the outputs are large)."""
    rng = random.Random(0)

    def doc() -> str:
        return "".join("".join(rng.choice(POOL) for _ in range(rng.randint(8, 20))) + rng.choice("，。")
                       for _ in range(12))

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc()}, ensure_ascii=False) + "\n" for _ in range(1500)),
                    encoding="utf-8")
    return path


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path`, or a skip where this machine does not let us mount one."""
    path.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except OSError:
        proc = None
    if proc is None or proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_dir(tmp_path: Path):
    """A directory nothing can be written in: a read-only tmpfs (enforced for root too), else chmod 0555 where
    permissions are enforced (not root); else skip."""
    target = tmp_path / "ro"
    if os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o555)
        try:
            yield target
        finally:
            target.chmod(0o755)
        return
    with tmpfs(target, "ro,size=64k") as mounted:
        yield mounted


def test_a_read_only_output_is_one_line(capsys, tmp_path, config, tiny_vocab, corpus):
    with read_only_dir(tmp_path) as ro:
        for argv in (["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", ro / "m"],
                     ["data", "filter", "-i", corpus, "-o", ro / "kept.jsonl"],
                     ["data", "vocab", "-i", corpus, "-o", ro / "sub" / "vocab.txt", "--size", "400"],
                     ["data", "dedup", "-i", corpus, "-o", tmp_path / "o.jsonl", "--store", ro / "s.sqlite"]):
            code, _, err = run_cli(capsys, *argv)
            line = one_line_error(code, err, str(ro))
            assert "read-only" in line or "permission denied" in line, line
        assert list(ro.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(capsys, tmp_path, config, tiny_vocab, corpus):
    with tmpfs(tmp_path / "small", "size=256k") as small:
        cases = [
            (["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", small / "m"], small / "m"),
            (["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", small / "m"], small / "m"),
            (["data", "filter", "-i", corpus, "-o", small / "kept.jsonl"], small / "kept.jsonl"),
            (["data", "filter", "-i", corpus, "-o", small / "shards"], small / "shards"),
            (["data", "pack", "-i", corpus, "--vocab", tiny_vocab, "-o", small / "packed", "--max-length", "80"],
             small / "packed"),
        ]
        for argv, target in cases:
            code, _, err = run_cli(capsys, *argv)
            one_line_error(code, err, str(target), "disk full")
            assert sorted(p.name for p in small.iterdir()) == [], err  # nothing partial, no temp


def test_a_directory_where_a_file_is_expected(capsys, tmp_path, config, tiny_vocab, corpus):
    (tmp_path / "dir").mkdir()
    cases = [
        (["pretrain", "--recipe", tmp_path / "dir"], "is a directory"),
        (["data", "filter", "-i", corpus, "-o", tmp_path / "k.jsonl", "--recipe", tmp_path / "dir"], "is a directory"),
        (["model", "init", "--config", config, "--vocab", tmp_path / "dir", "--out", tmp_path / "m"], "is a directory"),
        (["data", "tokenize", "你好", "--vocab", tmp_path / "dir"], "is a directory"),
        (["data", "vocab", "-i", corpus, "-o", tmp_path / "dir", "--size", "400"], "is a directory"),
        (["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", "."], "current directory"),
        (["model", "init", "--config", config, "--vocab", tiny_vocab, "--out", ".."], "current directory"),
    ]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv, message in cases:
            code, _, err = run_cli(capsys, *argv)
            one_line_error(code, err, message)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "m").exists() and list((tmp_path / "dir").iterdir()) == []


def test_damaged_checkpoints(capsys, tmp_path, config, tiny_vocab):
    code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "m")
    assert code == 0, err
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "model", "convert", tmp_path / "m", "--to", "native", "--out", tmp_path / "n")
    one_line_error(code, err, "model.safetensors", "cannot read")
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "m", "你好", "--device", "cpu")
    one_line_error(code, err, "model.safetensors")

    # A training checkpoint whose exact parameters were cut short: resuming it names the file.
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    train = write_synthetic_packed(tmp_path / "train", vocab_size, 24, max_length=80, seed=0, words=40)
    args = [f"model.init={config}", f"model.vocab={tiny_vocab}", f"data.train={train}", f"out_dir={tmp_path / 'run'}",
            "train.batch_size=4", "train.device=cpu", "train.valid_batches=0", "train.save_every=2"]
    code, _, err = run_cli(capsys, "pretrain", *args, "train.steps=2")
    assert code == 0, err
    params = tmp_path / "run" / "step-0000002" / "trainer" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    code, _, err = run_cli(capsys, "pretrain", *args, "train.steps=4", "--resume", tmp_path / "run")
    errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]  # after pretrain's log line
    assert code == 2 and errors == [err.strip().splitlines()[-1]] and "Traceback" not in err, err
    assert "params.safetensors" in errors[0] and "damaged" in errors[0]


def test_impossible_settings(capsys, tmp_path, config, tiny_vocab, corpus):
    code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out", tmp_path / "m")
    assert code == 0, err
    for argv, message in (
        (["generate", "--model", tmp_path / "m", "--input", corpus, "--batch-size", "0", "--device", "cpu"],
         "--batch-size"),
        (["eval", "ppl", "--model", tmp_path / "m", "--data", corpus, "--batch-size", "0"], "--batch-size"),
        (["run", REPO / "recipes" / "lifecycle" / "mini.yaml", f"run_dir={tmp_path / 'r'}", "stages=[pretrain]"],
         "stage 'pack'"),
    ):
        code, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # the run's stage banner
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "r").exists()  # a run that could not start leaves no run directory


def test_text_that_is_not_utf8(capsys, tmp_path, config, tiny_vocab):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"train:\n  lr: \xff\xfe\n")
    code, _, err = run_cli(capsys, "pretrain", "--recipe", recipe)
    one_line_error(code, err, "bad.yaml", "UTF-8")
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"<unk>\n\xff\xfe\n")
    code, _, err = run_cli(capsys, "data", "tokenize", "你好", "--vocab", vocab)
    one_line_error(code, err, "vocab.txt", "UTF-8")
    # Data lines that are not UTF-8 are skipped and counted (or stop the run with --strict); --json stays JSON.
    text = tmp_path / "docs.txt"
    text.write_bytes("今天天气不错，我们去公园散步。北京是中国的首都。".encode() * 4 + b"\n\xff\xfe broken\n")
    code, out, err = run_cli(capsys, "data", "filter", "-i", text, "-o", tmp_path / "k.txt", "--json")
    assert code == 0 and json.loads(out)["malformed"] == 1 and "not UTF-8" in err, err
    code, out, err = run_cli(capsys, "data", "filter", "-i", text, "-o", tmp_path / "k2.txt", "--strict", "--json")
    assert code == 2 and "not UTF-8" in json.loads(out)["error"] and not (tmp_path / "k2.txt").exists()
    assert leftovers(tmp_path) == []


def test_messages_that_used_to_mislead(capsys, tmp_path, config, tiny_vocab, corpus):
    for seed, name in ((0, "a"), (1, "b")):
        code, _, err = run_cli(capsys, "model", "init", "--config", config, "--vocab", tiny_vocab, "--out",
                               tmp_path / name, "--seed", seed)
        assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "compare", "--models", tmp_path / "a", tmp_path / "b", "--names", "big",
                             "small", "--data", corpus, "--limit", "4", "--out", tmp_path / "cmp", "--json")
    assert code == 0 and [json.loads(line)["model"] for line in out.splitlines()] == ["big", "small"], err
    code, _, err = run_cli(capsys, "eval", "compare", "--models", tmp_path / "a", tmp_path / "b", "--names", "big",
                           "--data", corpus)
    one_line_error(code, err, "1 labels for 2 models")

    code, out, err = run_cli(capsys, "model", "info", config, "--json")  # a config file, as the docs say
    assert code == 0 and json.loads(out)["format"] == "config", err

    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    config.replace(tmp_path / "evil.json")
    code, out, err = run_cli(capsys, "model", "convert", tmp_path / "evil.pt", "--to", "native", "--out", tmp_path / "e")
    line = one_line_error(code, err, "evil.pt", "never runs code")
    assert "ran code" not in out and line.endswith("checkpoint"), line

    (tmp_path / "packed" / "valid").mkdir(parents=True)
    code, _, err = run_cli(capsys, "data", "inspect", tmp_path / "packed")
    one_line_error(code, err, "valid", "without meta.json")

    code, _, err = run_cli(capsys, "pretrain", "--recipe", REPO / "recipes" / "pretrain" / "mini.yaml", "train.lr=fast")
    one_line_error(code, err, "train.lr: expected a number", "override 'train.lr=fast'")
    code, out, err = run_cli(capsys, "prune", "--print-recipe", "--json")
    assert code == 0 and json.loads(out)["method"], err
