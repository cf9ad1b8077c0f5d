"""FlexAttention for training (cpmctl/model/flex_attention.py, `train.attention: flex`): the score_mod and mask_mod
are the SDPA path's bias and mask, logits, loss and every gradient match SDPA, decoding keeps SDPA, and a short
training run follows the SDPA loss curve. On the CPU torch runs flex's forward only (its backward is refused), so
gradients go through the mods' dense evaluation; one test reaches flex's own autograd through torch internals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.data.packed_format import PackedDataset, PackedReader
from cpmctl.model import flex_attention as fa
from cpmctl.model.ant import KVCache, attention_allowed, build_model
from cpmctl.model.flex_attention import FlexMask, use_attention
from cpmctl.recipe import load_recipe
from cpmctl.train.loop import train
from cpmctl.train.objectives import lm_loss
from cpmctl.train.recipe import PretrainRecipe, TrainConfig
from tests.synthetic import write_synthetic_packed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config  # noqa: E402

pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

VOCAB = 120


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Packed rows of several lm/mlm records (spans), prompt/text/mlm segments and a padding span at the end."""
    root = tmp_path_factory.mktemp("flex")
    train_dir = write_synthetic_packed(root / "train", VOCAB, 16, max_length=80, seed=0, words=40, piece_length=(6, 20))
    valid_dir = write_synthetic_packed(root / "valid", VOCAB, 4, max_length=80, seed=1, words=40, piece_length=(6, 20))
    return train_dir, valid_dir


def packed_batch(path, rows=4):
    return PackedReader(PackedDataset(path), rows, shuffle=False).next_batch()


def random_rows(b=3, n=57, segments=6, seed=0):
    """Rows with random segments (6 types), context/target mixes and span boundaries: every case of the bias."""
    g = torch.Generator().manual_seed(seed)
    ids, context = torch.randint(10, VOCAB, (b, n), generator=g), torch.rand(b, n, generator=g) < 0.5
    return {"input": ids, "segment": torch.randint(0, segments, (b, n), generator=g), "context": context,
            "span": (torch.rand(b, n, generator=g) < 0.08).cumsum(-1),
            "target": torch.where(context, -100, ids), "task": torch.full_like(ids, 2)}


def forward(model, batch):
    return model(batch["input"], batch["segment"], batch["context"], batch["span"])


def test_the_mods_are_the_sdpa_bias_and_mask(packed):
    model = build_model(tiny_config(VOCAB), seed=0)
    for batch in (packed_batch(packed[0]), random_rows()):
        seg, ctx, span = batch["segment"], batch["context"].bool(), batch["span"]
        b, n = seg.shape
        pos = torch.arange(n)[None].expand(b, n)
        expected = model.attention_bias(seg, ctx, span, pos, seg, ctx, span, pos)
        dense = FlexMask(model.position_bias, seg, ctx, span).dense_bias()
        assert torch.equal(dense, expected)  # same buckets, same -inf pattern, bit for bit
        # No row is fully masked: every token sees itself (padding included: a span of its own, seen causally).
        assert attention_allowed(ctx, span, pos, ctx, span, pos).diagonal(dim1=1, dim2=2).all()
    assert (packed_batch(packed[0])["span"][:, -1] > 0).all()  # the rows do end in padding


def test_a_fully_masked_row_gives_zeros_on_both_kernels():
    """Cannot happen in CPM-Ant (see above); if it did, torch 2.13 on the CPU gives 0 on both paths, not NaN."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, :] = float("-inf")
    block = create_block_mask(lambda b, h, i, j: i != 3, 1, None, 8, 8, device="cpu")
    sdpa = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    flex = flex_attention(q, q, q, block_mask=block)
    assert torch.equal(sdpa[..., 3, :], torch.zeros(1, 2, 4)) and torch.equal(flex[..., 3, :], sdpa[..., 3, :])
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-6)


def test_flex_kernel_logits_equal_sdpa(packed, monkeypatch):
    """Without gradients the CPU runs torch's flex_attention itself (counted): logits within fp32 rounding."""
    calls = []
    kernel = fa._kernel
    monkeypatch.setattr(fa, "_kernel", lambda device: calls.append(device) or kernel(device))
    model = build_model(tiny_config(VOCAB, num_layers=3), seed=1).eval()
    for batch in (packed_batch(packed[0]), random_rows(seed=1)):
        with torch.no_grad():
            sdpa = forward(model, batch)
            model.attention_kernel = "flex"
            flex = forward(model, batch)
            model.attention_kernel = "sdpa"
        assert (flex - sdpa).abs().max().item() < 1e-5
    assert len(calls) == 2 * 3


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _compare_training_step(model, batch, tolerance):
    sdpa_loss, sdpa_grads = _loss_and_grads(model, batch)
    model.attention_kernel = "flex"
    flex_loss, flex_grads = _loss_and_grads(model, batch)
    model.attention_kernel = "sdpa"
    assert flex_loss == pytest.approx(sdpa_loss, rel=tolerance / 10)
    assert sdpa_grads["position_bias.relative_attention_bias"].abs().sum() > 0
    for name, grad in sdpa_grads.items():
        scale = grad.abs().max().item()
        assert (flex_grads[name] - grad).abs().max().item() <= tolerance * max(scale, 1e-6), name


def test_loss_and_every_gradient_equal_sdpa_with_pruning_gates(packed):
    model = build_model(tiny_config(VOCAB), seed=2).train()
    block = model.encoder.layers[1]
    block.self_att.self_attention.head_gate = torch.tensor([1.0, 0.0, 0.5, 0.25])  # pruning's gates still apply
    block.attention_gate = torch.tensor(0.7)
    _compare_training_step(model, packed_batch(packed[0]), 1e-5)
    _compare_training_step(model, random_rows(seed=2), 1e-5)


def _flex_with_cpu_backward(q, k, v, score_mod, block_mask):
    """torch's own flex_attention path (the higher-order op traced by dynamo, captured tensors lifted as inputs,
    flex's autograd function), minus the public wrapper's refusal of a CPU backward. Private API: skipped if gone."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_op
        from torch._higher_order_ops.utils import setup_compilation_env
        from torch.nn.attention.flex_attention import _apply_kernel_options
    except ImportError:
        pytest.skip("this torch has no flex_attention higher-order op to reach on the CPU")

    def call(*args):
        return flex_op(*args)

    options = _apply_kernel_options(q, k, v, False, None)
    with setup_compilation_env() as backend:
        out = torch.compile(call, backend=backend, fullgraph=True)(
            q, k, v, score_mod, block_mask.as_tuple(), 1.0 / math.sqrt(q.shape[-1]), options)
    return out[0]


def test_flex_autograd_itself_gives_the_sdpa_gradients(monkeypatch):
    """The table's gradient through flex's own backward (as on CUDA, where it is compiled), summed over layers."""
    monkeypatch.setattr(FlexMask, "attend", lambda self, q, k, v, dropout_p=0.0: _flex_with_cpu_backward(
        q, k, v, self.score_mod, self.block_mask))
    model = build_model(tiny_config(VOCAB, dim_model=32, dim_ff=48, num_heads=2), seed=3).train()
    _compare_training_step(model, random_rows(b=2, n=24, seed=3), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flex kernel needs CUDA")
def test_cuda_fused_kernel_gives_the_sdpa_loss_and_gradients(packed):
    """The GPU check: torch.compile(flex_attention) forward and backward (the table's gradient from the fused
    kernel) against SDPA on the same batch, fp32."""
    model = build_model(tiny_config(VOCAB), seed=5).cuda().train()
    batch = {k: v.cuda() for k, v in packed_batch(packed[0]).items()}
    _compare_training_step(model, batch, 1e-4)


def test_decoding_keeps_sdpa(monkeypatch):
    built, init = [], FlexMask.__init__
    monkeypatch.setattr(FlexMask, "__init__", lambda self, *a: built.append(1) or init(self, *a))
    model = build_model(tiny_config(VOCAB), seed=4).eval()
    model.attention_kernel = "flex"
    batch = random_rows(b=2, n=12, seed=4)
    batch["context"][:, 8:] = False  # fed through the cache: tokens that earlier ones cannot see
    with torch.no_grad():
        full = forward(model, batch)
        assert len(built) == 1
        cache = KVCache.allocate(model, 2, 12)
        first = model(batch["input"][:, :8], batch["segment"][:, :8], batch["context"][:, :8], batch["span"][:, :8],
                      cache=cache)
        rest = model(batch["input"][:, 8:], batch["segment"][:, 8:], batch["context"][:, 8:], batch["span"][:, 8:],
                     cache=cache)
    assert len(built) == 1  # the cached forwards built the SDPA bias
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-4)


def test_a_training_run_follows_the_sdpa_loss_curve(packed, tmp_path):
    """train.attention=flex through the training loop: the same losses step by step, validation (the flex kernel,
    no gradients) included."""
    def run(attention):
        cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, schedule="constant", warmup_steps=0, log_every=1,
                          valid_every=2, valid_batches=1, save_every=100, device="cpu", attention=attention)
        model = build_model(tiny_config(VOCAB), seed=0)
        result = train(model, PackedReader(PackedDataset(packed[0]), 4, seed=0), cfg, tmp_path / attention,
                       valid=PackedReader(PackedDataset(packed[1]), 4, shuffle=False), progress=False)
        assert model.attention_kernel == attention
        return [r["loss"] for r in result.history if "loss" in r], [r["valid_loss"] for r in result.history
                                                                    if "valid_loss" in r]

    (sdpa, sdpa_valid), (flex, flex_valid) = run("sdpa"), run("flex")
    assert len(sdpa) == 4 and len(sdpa_valid) == 2
    assert flex == pytest.approx(sdpa, abs=1e-4) and flex_valid == pytest.approx(sdpa_valid, abs=1e-4)


def test_the_recipe_key_and_its_refusals(packed, tmp_path):
    assert load_recipe(PretrainRecipe, None, ["data.train=x", "train.attention=flex"]).train.attention == "flex"
    with pytest.raises(CpmctlError, match=r"train\.attention: expected one of 'sdpa' \| 'flex', got 'xformers'"):
        load_recipe(PretrainRecipe, None, ["data.train=x", "train.attention=xformers"])
    dropout = build_model(tiny_config(VOCAB, dropout_p=0.1), seed=0)
    with pytest.raises(CpmctlError, match=r"^train\.attention: flex has no attention dropout .*dropout_p=0\.1"):
        use_attention(dropout, "flex")
    cfg = TrainConfig(steps=1, batch_size=2, device="cpu", attention="flex")
    with pytest.raises(CpmctlError, match="train.attention"):
        train(dropout, PackedReader(PackedDataset(packed[0]), 2), cfg, tmp_path / "run", progress=False)
    with pytest.raises(CpmctlError, match="train.attention"):
        use_attention(torch.nn.Linear(2, 2), "flex")
    use_attention(torch.nn.Linear(2, 2), "sdpa")  # the default asks nothing of the model
