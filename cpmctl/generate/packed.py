"""The dense linears of a CPU generation in oneDNN's packed weight layout.

On the CPU, torch.mm runs a linear through the BLAS (MKL): fine for one row (a matrix-vector product near the
memory bandwidth) and slow for the few rows of a batched decode step, where its small-M kernels reach about half of
what reading the weight allows (bench/generate.py; docs/generate.md). oneDNN's inner-product primitive on a weight
reordered once into its blocked layout (`mkldnn._reorder_linear_weight`) streams the weight at the bandwidth for 1
to 16 rows and is about twice as fast as MKL for the prompt pass as well. The packed weight has the same bytes as
the dense one and replaces it; the tied output head gets a packed copy of the embedding matrix (the lookup keeps
the dense rows), which costs vocab x dim_model more weight bytes.

The sums run in another order than the BLAS's, so logits differ from the unpacked model in the last bits (greedy
ids equal on the bench model and in the tests); a row's result does not depend on the other rows of the batch.
Generation packs by default where it applies (a resident fp32 or bf16 model on the CPU, no adapter, no int8 / int4
linears); CPMCTL_CPU_LINEAR=blas keeps torch.mm.
"""

from __future__ import annotations

import os
import types

import torch
from torch import nn

ROWS_HINT = 8  # oneDNN blocks for this many rows: in fp32 as fast as a pack for 1 or 64 rows at 1, 8 and 33 rows
# (measured once); for bf16 a pack for 1 row was ~20% faster at 1-8 rows in one noisy run: not tuned per dtype
ENV = "CPMCTL_CPU_LINEAR"


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def packing_applies(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether generation on `device` in `dtype` packs its linears (CPMCTL_CPU_LINEAR=blas: never)."""
    choice = os.environ.get(ENV, "onednn")
    if choice not in ("onednn", "blas"):
        from cpmctl import CpmctlError

        raise CpmctlError(f"{ENV} must be 'onednn' or 'blas', got {choice!r}")
    return (choice == "onednn" and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.bfloat16) and _ops_available())


class PackedLinear(nn.Module):
    """A bias-free linear whose weight is held in oneDNN's packed layout (an opaque mkldnn tensor, not a buffer:
    the module has no state dict; it exists only for inference)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)

    @property
    def packed_weight_bytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, None, "none", [], "")
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=onednn packed"


def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
    """CPMAnt.logits through the module in `output_head` (bound to the model by use_output_head)."""
    return self.output_head(h)


def use_output_head(model: nn.Module, head: nn.Module) -> None:
    """Compute the logits with `head` (h -> logits, a copy of the tied head in another layout or precision); the
    embedding matrix stays for the input lookup."""
    model.output_head = head
    model.logits = types.MethodType(_head_logits, model)  # an instance attribute shadows CPMAnt.logits


def pack_linears(model: nn.Module) -> int:
    """Replace every plain bias-free nn.Linear of the blocks by a PackedLinear (dropping the dense weight) and
    compute the logits through a packed copy of the head, in place; returns the number of linears packed."""
    packed = 0
    with torch.no_grad():
        for block in model.encoder.layers:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear and child.bias is None:
                        setattr(parent, name, PackedLinear(child.weight))
                        packed += 1
        use_output_head(model, PackedLinear(model.input_embedding.weight))
    return packed
