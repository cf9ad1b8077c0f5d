"""torch.distributed training on CPU (gloo), 2 processes launched by torchrun: DDP replicas stay identical, FSDP2
equals single-process training on the same global batch, and a sharded checkpoint resumes exactly (also after
kill -9 of the launcher and its ranks mid-run).

Run as a script (under torchrun) this file is the DDP worker: it trains and saves each rank's parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402
from cpmctl.data.packed_format import PackedDataset, PackedReader  # noqa: E402
from cpmctl.model.ant import build_model  # noqa: E402
from cpmctl.model.checkpoint import read_checkpoint  # noqa: E402
from cpmctl.model.tokenizer import CPMAntTokenizer  # noqa: E402
from cpmctl.train.loop import train  # noqa: E402
from cpmctl.train.recipe import TrainConfig  # noqa: E402
from cpmctl.train.metrics import read_metrics  # noqa: E402
from tests.synthetic import write_synthetic_packed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 120


def loop_config(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=2, lr=1e-2, schedule="cosine", warmup_steps=1, log_every=1, save_every=2,
                keep_last=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def ddp_worker(data_dir: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = build_model(tiny_config(VOCAB), seed=0)
    data = PackedReader(PackedDataset(data_dir), 2, seed=0, rank=rank, world_size=world)
    train(model, data, loop_config(engine="ddp"), out, progress=False)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")


def torchrun(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def cpmctl(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cpmctl", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def single_process(data_dir, out, vocab_size=VOCAB) -> dict:
    """The same global batch in one process: two micro-batches of 2 rows = the rows of rank 0 and rank 1."""
    model = build_model(tiny_config(vocab_size), seed=0)
    train(model, PackedReader(PackedDataset(data_dir), 2, seed=0), loop_config(grad_accum=2), out, progress=False)
    return model.state_dict()


def test_ddp_replicas_stay_identical_and_equal_single_process_training(tmp_path):
    data = write_synthetic_packed(tmp_path / "data", VOCAB, 24, max_length=80, seed=0, words=40)
    run = torchrun(__file__, str(data), str(tmp_path / "ddp"))
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    reference = single_process(data, tmp_path / "single")
    for key, value in reference.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)
    losses = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")]
    single = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    assert losses == pytest.approx(single, rel=1e-5)


def test_fsdp_equals_single_process_and_resumes_a_sharded_checkpoint(tmp_path, tiny_vocab):
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    data = write_synthetic_packed(tmp_path / "data", vocab_size, 24, max_length=80, seed=0, words=40)
    config = tmp_path / "tiny.json"
    tiny_config(vocab_size).save(config)
    run_dir = tmp_path / "fsdp"
    args = ["pretrain", f"model.init={config}", f"model.vocab={tiny_vocab}", f"data.train={data}",
            f"out_dir={run_dir}", "train.engine=fsdp", "train.checkpoint_format=sharded", "train.device=cpu",
            "train.steps=4", "train.batch_size=2", "train.lr=1e-2", "train.schedule=cosine", "train.warmup_steps=1",
            "train.log_every=1", "train.save_every=2", "train.keep_last=0", "--json"]
    first = cpmctl(*args, "--nproc", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 4
    shards = sorted(p.name for p in (run_dir / "step-0000002" / "trainer" / "sharded").glob("*.distcp"))
    assert len(shards) == 2  # one file per rank: nothing was gathered

    # FSDP2 on 2 ranks == one process on the same global batch (2 micro-batches of 2 rows).
    _, fsdp_state = read_checkpoint(run_dir / "final")
    _, single_state = read_checkpoint(_single_native(data, tmp_path / "single", vocab_size))
    for key, value in single_state.items():
        torch.testing.assert_close(fsdp_state[key], value, rtol=1e-4, atol=1e-5)

    # Resume the sharded step-2 checkpoint of a copy: the same curve and the same final weights, exactly.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("step-0000004", "final"))
    (resumed_dir / "latest").write_text("step-0000002\n")
    second = torchrun("-m", "cpmctl", *[a for a in args if not a.startswith("out_dir=")], "--resume", str(resumed_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    straight = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    resumed = [r["loss"] for r in read_metrics(resumed_dir / "metrics.jsonl")]
    assert resumed == straight and len(resumed) == 4
    _, resumed_state = read_checkpoint(resumed_dir / "final")
    for key, value in fsdp_state.items():
        assert torch.equal(resumed_state[key], value), key


@pytest.mark.slow
def test_plain_torchrun_with_a_single_engine_recipe_trains_one_ddp_run(tmp_path, tiny_vocab):
    """`torchrun -m cpmctl pretrain` with engine single: switched to ddp (said on stderr), one run, no step twice."""
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    data = write_synthetic_packed(tmp_path / "data", vocab_size, 16, max_length=64, seed=0, words=40)
    config = tmp_path / "tiny.json"
    tiny_config(vocab_size, num_layers=1).save(config)
    run = torchrun("-m", "cpmctl", "pretrain", f"model.init={config}", f"model.vocab={tiny_vocab}",
                   f"data.train={data}", f"out_dir={tmp_path / 'run'}", "train.device=cpu", "train.steps=3",
                   "train.batch_size=2", "train.log_every=1", "train.save_every=3", "train.valid_batches=0", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("train.engine: single with 2 processes (torchrun) -> ddp") == 1
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2 and summaries[0]["engine"] == "ddp"
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_lora_under_fsdp_equals_single_process_lora(tmp_path, tiny_vocab):
    """`tune lora --nproc 2` with engine fsdp (frozen base sharded from the start, adapters trained) == one process
    on the same global batch; the adapter is written once, in the single-process format."""
    from safetensors.torch import load_file

    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.lora import ADAPTER_WEIGHTS
    from cpmctl.tune.recipe import load_tune_recipe
    from cpmctl.tune.tuning import tune_lora

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(tiny_vocab.read_text(encoding="utf-8") + "否\n确\n", encoding="utf-8")
    base = save_native(build_model(tiny_config(CPMAntTokenizer(vocab).vocab_size), seed=0), tmp_path / "base",
                       vocab=vocab)
    data = tmp_path / "task"
    data.mkdir()
    for split in ("train", "dev"):
        shutil.copy(REPO / "tests" / "fixtures" / "tasks" / "lcsts" / "train.jsonl", data / f"{split}.jsonl")
    settings = ["train.device=cpu", "train.valid_batches=0", "train.log_every=1", "train.warmup_steps=1",
                "train.schedule=constant", "train.lr=0.02", "train.batch_size=1", "tune.epochs=2", "tune.patience=0",
                "decode.decode=greedy", "decode.max_new_tokens=8"]
    # `--nproc 2` launches torchrun itself; under fsdp each rank builds only its shards of the base (sharded start)
    run = cpmctl("tune", "lora", "--nproc", "2", "--task", "lcsts", "--model", str(base), "--data", str(data),
                 "--out", str(tmp_path / "fsdp"), "--json", *settings, "train.engine=fsdp", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len([line for line in run.stdout.splitlines() if line.startswith("{")]) == 1
    recipe = load_tune_recipe(None, settings + ["train.grad_accum=2"], task="lcsts")
    single = tune_lora(base, data, tmp_path / "single", recipe, log=lambda *a: None, progress=False)
    assert single["steps"] == 4
    for name in ("step-0000004", "best"):
        got = load_file(str(tmp_path / "fsdp" / name / ADAPTER_WEIGHTS))
        want = load_file(str(tmp_path / "single" / name / ADAPTER_WEIGHTS))
        assert got.keys() == want.keys() and any("lora_A" in k for k in got)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
        assert sorted(p.name for p in (tmp_path / "fsdp" / name).iterdir() if p.is_file()) == sorted(
            p.name for p in (tmp_path / "single" / name).iterdir() if p.is_file())


def _single_native(data, out, vocab_size) -> Path:
    model = build_model(tiny_config(vocab_size), seed=0)
    result = train(model, PackedReader(PackedDataset(data), 2, seed=0), loop_config(grad_accum=2), out,
                   progress=False)
    return result.checkpoint


if __name__ == "__main__":
    ddp_worker(sys.argv[1], sys.argv[2])


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (the launcher's ranks and anything they started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_fsdp_run_killed_with_sigkill_mid_run_resumes_to_the_same_bits(tmp_path, tiny_vocab):
    """kill -9 of the launcher and both ranks at a moment nobody chose (saving every step, so most likely during a
    sharded save), then --resume: the same loss curve and the same final weights as a run never interrupted."""
    import signal
    import time

    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    data = write_synthetic_packed(tmp_path / "data", vocab_size, 48, max_length=80, seed=0, words=40)
    config = tmp_path / "tiny.json"
    tiny_config(vocab_size).save(config)
    common = [f"model.init={config}", f"model.vocab={tiny_vocab}", f"data.train={data}", "train.engine=fsdp",
              "train.checkpoint_format=sharded", "train.device=cpu", "train.steps=14", "train.batch_size=2",
              "train.lr=1e-2", "train.schedule=cosine", "train.warmup_steps=1", "train.log_every=1",
              "train.save_every=1", "train.keep_last=2", "--json"]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = torchrun("-m", "cpmctl", "pretrain", *common, f"out_dir={straight_dir}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "cpmctl", "pretrain", *common, f"out_dir={killed_dir}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    latest = killed_dir / "latest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-0000005":
            break
        time.sleep(0.01)
    time.sleep(0.3)  # into the next steps: on this machine a step and its save take ~0.2 s, so mid-step or mid-save
    victims = _descendants(launcher.pid)
    for pid in [launcher.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(30)
    assert launcher.returncode == -signal.SIGKILL, "the run finished (or failed) before it could be killed"
    assert not (killed_dir / "final").exists()

    # What a rank killed while writing its loss curve leaves (the kill above lands there only sometimes).
    (killed_dir / f".loss_curve.png.{launcher.pid}.x1y2z3w4.tmp").write_bytes(b"half a png")
    (killed_dir / ".step-0000099.tmp" / "trainer").mkdir(parents=True)  # and a save for a step the resume never saves
    resumed = torchrun("-m", "cpmctl", "pretrain", *common, "--resume", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(killed_dir.glob(".*.tmp")), "a killed writer's temporary was left behind"
    assert [r["loss"] for r in read_metrics(killed_dir / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(straight_dir / "metrics.jsonl")]
    _, want = read_checkpoint(straight_dir / "final")
    _, got = read_checkpoint(killed_dir / "final")
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
