"""The training loop (cpmctl/train): objectives, schedules, AdamW on folded weights, exact resume, interruption,
bad input. Tiny models and synthetic packed data built in-process."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import fold_factor, load_model
from cpmctl.train.engine import Engine
from cpmctl.train.loop import TrainingInterrupted, build_optimizer, train
from cpmctl.train.recipe import TrainConfig
from cpmctl.train.metrics import read_metrics
from cpmctl.train.objectives import lm_loss
from cpmctl.train.schedule import lr_factor
from tests.synthetic import unigram_entropy, write_synthetic_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the conftest helpers, with or without tests/__init__.py
from conftest import tiny_config  # noqa: E402

VOCAB = 120


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    train_dir = write_synthetic_packed(root / "train", VOCAB, 48, max_length=96, seed=0, words=40)
    valid_dir = write_synthetic_packed(root / "valid", VOCAB, 8, max_length=96, seed=1, words=40)
    return train_dir, valid_dir


def reader(path, batch=4, **kw):
    return PackedReader(PackedDataset(path), batch, **kw)


def small_cfg(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, lr=1e-2, schedule="cosine", warmup_steps=2, log_every=1, valid_every=4,
                valid_batches=2, save_every=4, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ----- schedules -----------------------------------------------------------------------------------------------
def test_noam_is_the_original_schedule():
    peak = 0.1 / math.sqrt(2000)  # start 0.1, warmup 2000 (BMTrain NoamLRScheduler)
    lr = lambda step: peak * lr_factor("noam", step, 2000, 10**6)  # noqa: E731
    assert lr(2000) == pytest.approx(2.236e-3, rel=1e-3)
    assert lr(1000) == pytest.approx(0.1 / math.sqrt(2000) * 1000 / 2000)
    assert lr(8000) == pytest.approx(0.1 / math.sqrt(8000))
    assert lr(1) < lr(2) < lr(2000) > lr(2001)


def test_cosine_and_linear_warm_up_then_decay_to_the_floor():
    for schedule in ("cosine", "linear"):
        f = [lr_factor(schedule, s, 10, 110, min_lr_ratio=0.1) for s in range(1, 111)]
        assert f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
        assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor("cosine", 60, 10, 110) == pytest.approx(0.5)
    assert lr_factor("constant", 500, 10, 110) == 1.0


# ----- objective -----------------------------------------------------------------------------------------------
def test_lm_loss_is_the_cross_entropy_of_the_targets_with_per_task_means(packed):
    torch.manual_seed(0)
    model = build_model(tiny_config(VOCAB), seed=0)
    batch = reader(packed[0], batch=16, shuffle=False).next_batch()
    loss, metrics = lm_loss(model, batch)
    logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])
    full = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=-100, reduction="none")
    mask = batch["target"].flatten() != -100
    assert loss.item() == pytest.approx(full[mask].mean().item(), rel=1e-5)
    for task, name in ((1, "mlm"), (2, "lm")):
        selected = mask & (batch["task"].flatten() == task)
        assert metrics[f"loss/{name}"] == pytest.approx(full[selected].mean().item(), rel=1e-5)
        assert metrics[f"targets/{name}"] == selected.sum().item()


# ----- AdamW on folded weights ---------------------------------------------------------------------------------
def test_scaled_adamw_on_folded_weights_takes_the_original_steps():
    """AdamW(lr, eps, wd) on the original-convention weights == our grouped AdamW on the folded weights."""
    config = tiny_config(VOCAB)
    model = build_model(config, seed=0)
    batch = {
        "input": torch.randint(10, VOCAB, (2, 24)), "segment": torch.full((2, 24), 2),
        "context": torch.arange(24).expand(2, 24) < 12, "span": torch.zeros(2, 24, dtype=torch.long),
    }
    batch["target"] = torch.where(~batch["context"], torch.randint(10, VOCAB, (2, 24)), -100)
    batch["task"] = torch.full((2, 24), 2)
    factors = {k: fold_factor(k, p.shape, config) for k, p in model.named_parameters()}
    original = {k: (p.detach() / factors[k]).clone().requires_grad_(True) for k, p in model.named_parameters()}
    reference = torch.optim.AdamW(
        [{"params": [p], "weight_decay": 0.01 if p.dim() >= 2 else 0.0} for p in original.values()],
        lr=1e-2, eps=1e-8)
    cfg = small_cfg(lr=1e-2, weight_decay=0.01)
    ours = build_optimizer(model, cfg, None, Engine("single", torch.device("cpu")))
    for g in ours.param_groups:
        g["lr"] = g["base_lr"]
    for _ in range(3):
        folded = {k: original[k] * factors[k] for k in original}
        loss, _ = lm_loss(lambda *a: functional_call(model, folded, a), batch)
        loss.backward()
        reference.step()
        reference.zero_grad()
        lm_loss(model, batch)[0].backward()
        ours.step()
        ours.zero_grad()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), original[k].detach() * factors[k], rtol=2e-4, atol=1e-6)


# ----- training ------------------------------------------------------------------------------------------------
def test_loss_falls_well_below_the_unigram_entropy(packed, tmp_path):
    entropy = unigram_entropy(packed[0])
    model = build_model(tiny_config(VOCAB), seed=0)
    # 100 steps: with the original's 0.02 embedding init a tiny model needs a little longer than 60 to get there.
    cfg = small_cfg(steps=100, lr=2e-2, warmup_steps=5, valid_every=50, valid_batches=2, save_every=100, log_every=10)
    result = train(model, reader(packed[0], seed=0), cfg, tmp_path / "run",
                   valid=reader(packed[1], shuffle=False), progress=False)
    assert result.steps == 100 and result.valid_loss < 0.8 * entropy, (result.valid_loss, entropy)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_mb", "loss/lm", "loss/mlm"} <= set(train_rows[0])
    assert [r["valid_loss"] for r in rows if "valid_loss" in r][-1] == result.valid_loss
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # The step directory is itself a loadable checkpoint holding the trained weights.
    loaded, info = load_model(result.checkpoint)
    assert info.format == "native"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def _interruptible_run(packed, out, stop_at=None, resume=False, **kw):
    model = build_model(tiny_config(VOCAB, dropout_p=0.1), seed=0)

    def on_step(step, m):
        torch.rand(4)  # uses the RNG between steps, as pruning's gate sampling does
        if step == stop_at:
            raise KeyboardInterrupt

    cfg = small_cfg(steps=10, grad_accum=2, save_every=3, keep_last=2, **kw)
    return train(model, reader(packed[0], seed=0), cfg, out, valid=reader(packed[1], shuffle=False),
                 on_step=on_step, resume=resume, progress=False), model


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one_bit_for_bit(packed, tmp_path):
    straight, straight_model = _interruptible_run(packed, tmp_path / "a")
    with pytest.raises(TrainingInterrupted) as stopped:
        _interruptible_run(packed, tmp_path / "b", stop_at=8)
    assert stopped.value.step == 7 and stopped.value.checkpoint.name == "step-0000007"
    resumed, resumed_model = _interruptible_run(packed, tmp_path / "b", resume=True)
    assert resumed.steps == 10
    assert [r.get("loss") for r in resumed.history] == [r.get("loss") for r in straight.history]
    assert [r.get("valid_loss") for r in resumed.history] == [r.get("valid_loss") for r in straight.history]
    for (name, a), b in zip(straight_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    # keep_last=2 and the latest pointer
    steps = sorted(p.name for p in (tmp_path / "b").glob("step-*"))
    assert steps == ["step-0000009", "step-0000010"]
    assert (tmp_path / "b" / "latest").read_text().strip() == "step-0000010"


def test_sigterm_finishes_the_step_saves_and_stops(packed, tmp_path):
    model = build_model(tiny_config(VOCAB), seed=0)

    def on_step(step, m):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(model, reader(packed[0]), small_cfg(steps=10, save_every=100), tmp_path / "run", on_step=on_step,
              progress=False)
    assert stopped.value.step == 3 and (stopped.value.checkpoint / "trainer" / "state.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    result = train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(steps=5, save_every=100),
                   tmp_path / "run", resume=True, progress=False)
    assert result.steps == 5 and [r["step"] for r in result.history if "loss" in r] == [1, 2, 3, 4, 5]


def test_custom_groups_extra_state_and_callbacks(packed, tmp_path):
    """The contract pruning and LoRA use: an ascent group with a constant lr, out of clipping; extra state."""
    model = build_model(tiny_config(VOCAB), seed=0)
    multiplier = torch.nn.Parameter(torch.zeros(()))

    class Extra:
        def __init__(self):
            self.calls = []

        def state_dict(self):
            return {"calls": list(self.calls)}

        def load_state_dict(self, state):
            self.calls = list(state["calls"])

    extra = Extra()

    def loss_fn(m, batch):
        loss, metrics = lm_loss(m, batch)
        return loss + multiplier * 1.0, {**metrics, "multiplier": multiplier.item()}  # d/d(multiplier) = 1

    groups = lambda m: [  # noqa: E731
        {"params": list(m.parameters())},
        {"params": [multiplier], "lr": 0.1, "maximize": True, "scheduled": False, "clip": False, "weight_decay": 0.0},
    ]
    saved_dirs = []

    def save_model(m, d):
        saved_dirs.append(d)
        (d / "adapter.txt").write_text("model part")

    result = train(model, reader(packed[0]), small_cfg(steps=4, save_every=2), tmp_path / "run", loss_fn=loss_fn,
                   param_groups=groups, on_step=lambda s, m: extra.calls.append(s), save_model=save_model,
                   extra_state=extra, progress=False)
    assert extra.calls == [1, 2, 3, 4]
    assert multiplier.item() == pytest.approx(0.4, rel=1e-3)  # Adam ascent: +lr per step at a constant gradient
    assert (result.checkpoint / "adapter.txt").read_text() == "model part"
    assert "multiplier" in result.history[0]
    # Resuming from step 2 restores the extra state and the optimized tensors that live outside the model.
    resumed_extra = Extra()
    with torch.no_grad():
        multiplier.fill_(99.0)
    train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(steps=4, save_every=2),
          tmp_path / "run", loss_fn=loss_fn, param_groups=groups, extra_state=resumed_extra,
          on_step=lambda s, m: resumed_extra.calls.append(s), save_model=save_model,
          resume=tmp_path / "run" / "step-0000002", progress=False)
    assert resumed_extra.calls == [1, 2, 3, 4]
    assert multiplier.item() == pytest.approx(0.4, rel=1e-3)


def test_bf16_autocast_and_activation_checkpointing_train_on_cpu(packed, tmp_path):
    base = small_cfg(steps=2, save_every=100, schedule="constant")
    plain = train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), base, tmp_path / "a", progress=False)
    checkpointed = train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]),
                         small_cfg(steps=2, save_every=100, schedule="constant", activation_checkpointing=True),
                         tmp_path / "b", progress=False)
    assert [r["loss"] for r in checkpointed.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-6)
    bf16 = train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]),
                 small_cfg(steps=2, save_every=100, schedule="constant", precision="bf16"), tmp_path / "c",
                 progress=False)
    assert all(math.isfinite(r["loss"]) for r in bf16.history)
    assert bf16.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=0.05)


# ----- bad input -----------------------------------------------------------------------------------------------
def test_vocab_mismatch_is_caught_before_step_one(packed, tmp_path):
    model = build_model(tiny_config(VOCAB + 8), seed=0)
    steps = []
    with pytest.raises(CpmctlError, match="120-token vocabulary but the model"):
        train(model, reader(packed[0]), small_cfg(), tmp_path / "run", on_step=lambda s, m: steps.append(s),
              progress=False)
    assert steps == [] and not (tmp_path / "run").exists()


def test_out_of_memory_names_the_batch_size(packed, tmp_path):
    def loss_fn(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(CpmctlError, match="train.batch_size=4") as e:
        train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(), tmp_path / "run",
              loss_fn=loss_fn, progress=False)
    assert e.value.exit_code == 1


def test_an_earlier_run_is_not_overwritten_without_resume(packed, tmp_path):
    train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(steps=2), tmp_path / "run",
          progress=False)
    with pytest.raises(CpmctlError, match="resume"):
        train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(steps=2), tmp_path / "run",
              progress=False)


@pytest.mark.parametrize("key,value,message", [
    ("schedule", "exp", "train.schedule"), ("precision", "fp16", "train.precision"), ("engine", "ddp", "torchrun"),
    ("batch_size", 0, "train.batch_size"), ("checkpoint_format", "sharded", "train.checkpoint_format"),
])
def test_bad_settings_name_the_key(packed, tmp_path, key, value, message):
    with pytest.raises(CpmctlError, match=message):
        train(build_model(tiny_config(VOCAB), seed=0), reader(packed[0]), small_cfg(**{key: value}),
              tmp_path / "run", progress=False)


def test_weight_decay_on_matrices_or_everything():
    """`weight_decay_on: matrices` (the default) decays 2-D weights only; `all` decays every parameter, layer-norm
    gains and the position bias included, as the original's single optimizer group. The per-weight decay is the
    original-convention decay divided by the weight's fold factor (see default_param_groups)."""
    from cpmctl.train.loop import default_param_groups

    model = build_model(tiny_config(VOCAB), seed=0)
    for mode in ("matrices", "all"):
        groups = default_param_groups(model, TrainConfig(weight_decay=0.01, weight_decay_on=mode))
        decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        for name, p in model.named_parameters():
            scale = fold_factor(name, p.shape, model.config)
            want = 0.01 / scale if (p.dim() >= 2 or mode == "all") else 0.0
            assert decay_of[id(p)] == pytest.approx(want), (mode, name)
    assert any(p.dim() < 2 for p in model.parameters())  # there are gains for `all` to decay
