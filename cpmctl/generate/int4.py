"""int4 weight-only linears for the transformer blocks (`--quantize int4`), in torch's own int4 kernels.

Asymmetric, group-wise along the input dimension, GROUP_SIZE = 128 input columns per group: each group of a weight
row gets a scale s = (max - min) / 15 and a minimum m, and its codes are q = round((w - m) / s) in [0, 15], so
w ~= q * s + m. torch's kernels (`aten._weight_int4pack_mm_for_cpu` on the CPU, `aten._weight_int4pack_mm` on CUDA)
read a signed code: they compute (q - 8) * s + z, so the stored "zero" is z = m + 8 s. Scales and zeros are one
(in / 128, out, 2) tensor in bf16, the kernels' activation dtype: activations are rounded to bf16 for the matmul
and the output cast back (as for int8: bf16 is the CPU kernel's fast path; fp32 activations take 15x longer,
measured on AVX2). The embeddings and the tied head stay in the model dtype.

Bytes: a weight of out x in takes out * in / 2 bytes of codes + out * in / 128 * 4 of scales and zeros, 0.53 bytes a
weight against int8's ~1 (docs/memory.md).

The kernels' packed layouts differ by device (and, on the CPU, by ISA: AVX512 and AVX2 interleave rows in blocks of
64 and 32), so a block is packed for the device it runs on, never stored packed. The canonical form, `codes` (out,
in / 2) uint8 with the even column in the high nibble, is what quantize_int4 returns and what tests dequantise by
hand. Constraints (probed on torch 2.13 CPU; CUDA's from its kernel): in % 128 == 0 (whole groups; 128 is also the
CUDA kernel's k tile at INNER_K_TILES = 8), out % 16 == 0 (the CPU packing's minimum block).
"""

from __future__ import annotations

import torch
from torch import nn

from cpmctl import CpmctlError

GROUP_SIZE = 128
INNER_K_TILES = 8  # CUDA layout: k in tiles of 16 * 8 = 128 columns (one group)
OUT_MULTIPLE = 16
ACT_DTYPE = torch.bfloat16  # activations, scales and zeros on both devices


def check_int4_shape(in_features: int, out_features: int, name: str = "a linear") -> None:
    if in_features % GROUP_SIZE:
        raise CpmctlError(f"--quantize int4: {name} has {in_features} input features, not a multiple of the "
                          f"group size {GROUP_SIZE}")
    if out_features % OUT_MULTIPLE:
        raise CpmctlError(f"--quantize int4: {name} has {out_features} output features, not a multiple of "
                          f"{OUT_MULTIPLE}")


def packed_shape(out_features: int, in_features: int, device_type: str) -> tuple[tuple, torch.dtype]:
    """(shape, dtype) of a weight packed for `device_type`'s kernel: out * in / 2 bytes either way."""
    if device_type == "cuda":
        return (out_features // 8, in_features // (INNER_K_TILES * 16), 32, INNER_K_TILES // 2), torch.int32
    return (out_features, in_features // 2), torch.uint8


@torch.no_grad()
def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in / 2) uint8, even column in the high nibble; scales_zeros (in / 128, out, 2) bf16).

    The scale and minimum are rounded to bf16 first and the codes computed against the rounded values (as int8
    does with its scale), so storing them in bf16 costs nothing beyond the 4-bit rounding itself (and the zero's
    own rounding: z = m + 8 s is a third bf16 value)."""
    out_features, in_features = w.shape
    check_int4_shape(in_features, out_features)
    groups = w.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low = groups.amin(dim=2)
    scale = ((groups.amax(dim=2) - low) / 15).clamp(min=1e-12).to(ACT_DTYPE)
    zero = (low.to(ACT_DTYPE).float() + 8 * scale.float()).to(ACT_DTYPE)
    # Codes against the stored zero (not the exact minimum): (q - 8) * s + z is what the kernel computes.
    t = groups - (zero.float() - 8 * scale.float())[..., None]
    t.div_(scale.float()[..., None]).round_().clamp_(0, 15)
    q = t.to(torch.uint8).reshape(out_features, in_features)
    del t
    codes = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes.contiguous(), scales_zeros


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) int32 codes in [0, 15]."""
    return torch.stack([codes >> 4, codes & 15], dim=-1).reshape(codes.shape[0], -1).to(torch.int32)


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the kernels compute with: (q - 8) * s + z, group by group."""
    q = unpack_codes(codes).float()
    out_features, in_features = q.shape
    scale = scales_zeros[..., 0].float().t()[..., None]  # (out, groups, 1)
    zero = scales_zeros[..., 1].float().t()[..., None]
    return ((q.reshape(out_features, -1, GROUP_SIZE) - 8) * scale + zero).reshape(out_features, in_features)


def pack_int4(codes: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The canonical codes in `device`'s kernel layout, on `device` (CUDA packs on the GPU, from the uint8 codes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(codes.to(device), INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(codes.cpu()), INNER_K_TILES)


class Int4Linear(nn.Module):
    """A bias-free linear with a packed int4 weight and per-group scales and zeros (buffers, not parameters).
    `device_type` fixes the packed layout: a meta-device module (a layout, a streamed block) needs it told."""

    def __init__(self, in_features: int, out_features: int, device=None, device_type: str | None = None):
        super().__init__()
        check_int4_shape(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.device_type = device_type or torch.device(device if device is not None else "cpu").type
        shape, dtype = packed_shape(out_features, in_features, self.device_type)
        self.register_buffer("weight_int4", torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // GROUP_SIZE, out_features, 2,
                                                         dtype=ACT_DTYPE, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        device = linear.weight.device
        module = cls(linear.in_features, linear.out_features, device=device)
        codes, scales_zeros = quantize_int4(linear.weight.detach())
        module.weight_int4, module.scales_zeros = pack_int4(codes, device), scales_zeros.to(device)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        x2 = x2.to(ACT_DTYPE).contiguous()
        if self.device_type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight_int4, GROUP_SIZE, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, GROUP_SIZE, self.scales_zeros)
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}, "
                f"packed for {self.device_type}")


def check_int4_support(device: torch.device | str) -> None:
    """Fail with one line where torch has no int4 kernel for `device` (probed on a tiny weight, not assumed)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise CpmctlError(f"--quantize int4 is not supported on device '{device}' (cpu and cuda are)")
    op = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, op):
        raise CpmctlError(f"--quantize int4: this torch ({torch.__version__}) has no int4 kernel for {device.type}")
    try:  # a fixed weight: the probe must not draw from the global RNG
        linear = nn.Linear(GROUP_SIZE, OUT_MULTIPLE, bias=False, device="meta")
        linear.weight = nn.Parameter(torch.linspace(-1, 1, OUT_MULTIPLE * GROUP_SIZE, device=device)
                                     .reshape(OUT_MULTIPLE, GROUP_SIZE), requires_grad=False)
        Int4Linear.from_linear(linear)(torch.zeros(1, GROUP_SIZE, device=device))
    except (RuntimeError, NotImplementedError) as e:
        raise CpmctlError(
            f"--quantize int4 is not supported on {device} ({str(e).splitlines()[0][:120]})") from None


def check_int4_model(config) -> None:
    """Every block linear's shape fits the kernels (dim_model, heads x dim_head and dim_ff are each some linear's
    input, and multiples of 128 are multiples of 16): named by its dimension, before any weight is read."""
    inner = config.num_heads * config.dim_head
    for name, size in (("dim_model", config.dim_model), ("num_heads x dim_head", inner), ("dim_ff", config.dim_ff)):
        if size % GROUP_SIZE:
            raise CpmctlError(f"--quantize int4 needs {name} ({size}) to be a multiple of the group size {GROUP_SIZE}")

