"""Linears that read the same input, computed as one product: a block's project_q / k / v and its w_0 / w_1.

Generation packs each such set as one weight: int8-dynamic's fbgemm weight (quant.py; one row, q, k, v 0.50 ->
0.31 ms a layer, eight rows 0.83 -> 0.47 ms) and the CPU's oneDNN-packed fp32 / bf16 weight (packed.py): one call
where there were three or two, and fewer, larger products stream the weights faster. The numbers do not change:
each output column is the same sum over the same input in both kernels (tested bit for bit). Each linear stays a
module of its own (a GroupMember, its columns of the product), so the model's forward and the decode step call it as
before; the group computes once per input tensor (same object, same version: an input changed in place is computed
again) and lets go of it when its last member has read it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

GROUPS = (("self_att.self_attention", ("project_q", "project_k", "project_v")), ("ffn.ffn.w_in", ("w_0", "w_1")))


class LinearGroup(nn.Module):
    """The product of `linear` (the members' weights stacked by output) for `count` members reading one input."""

    def __init__(self, linear: nn.Module, count: int):
        super().__init__()
        self.linear, self.count = linear, count
        self._input, self._version, self._output, self._reads = None, -1, None, 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or x._version != self._version:
            self._input, self._version, self._output, self._reads = x, x._version, self.linear(x), 0
        output = self._output
        self._reads += 1
        if self._reads == self.count:  # every member has its columns: keep no activations between calls
            self._input, self._output = None, None
        return output


class GroupMember(nn.Module):
    """One linear of a LinearGroup: columns start..start+out_features of the group's product."""

    def __init__(self, group: LinearGroup, start: int, in_features: int, out_features: int):
        super().__init__()
        self.group, self.start = group, start
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.product(x)[..., self.start : self.start + self.out_features].contiguous()

    def extra_repr(self) -> str:
        return f"columns {self.start}..{self.start + self.out_features} of the group's product"


def group_linears(block: nn.Module, make: Callable[[list[nn.Module]], nn.Module | None]) -> int:
    """Replace each GROUPS set of linears of `block` by GroupMembers of one LinearGroup whose product is
    `make(members)` (None: leave that set as it is); returns how many linears were grouped."""
    grouped = 0
    for parent_name, names in GROUPS:
        try:
            parent = block.get_submodule(parent_name)
        except AttributeError:  # a sub-block dropped by mask_modules
            continue
        members = [getattr(parent, n) for n in names]
        linear = make(members)
        if linear is None:
            continue
        group, start = LinearGroup(linear, len(members)), 0
        for name, member in zip(names, members):
            setattr(parent, name, GroupMember(group, start, member.in_features, member.out_features))
            start += member.out_features
        grouped += len(members)
    return grouped
