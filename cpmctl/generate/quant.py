"""int8 for the linear layers of the transformer blocks: weight-only (`int8`) or weights and activations
(`int8-dynamic`, `int8-dynamic-head`).

Each weight row (one output channel) gets its own scale: `w ~= q * scale[:, None]` with `q` in [-127, 127]. The
matmul runs in torch's weight-only int8 kernel `aten._weight_int8pack_mm` (CPU and CUDA): the int8 weight is read
from memory (a quarter of fp32, half of fp16), which is what bounds decoding speed. On the CPU the kernel is fast
only for bf16 activations, so activations are rounded to bf16 for the matmul and the output is cast back; the
embeddings and the tied output head stay in the model dtype. docs/memory.md reports the effect on quality.

The CPU kernel needs the input dimension to be a multiple of 16 (torch 2.13: odd multiples of 8 give wrong sums
and can crash, smaller ones garbage), so weights are stored with zero columns up to the next multiple of 16 and
inputs are zero-padded the same way (exact: zeros add nothing).

That kernel converts every int8 weight to bf16 before multiplying, so on an AVX2 CPU it is bound by arithmetic, not
by memory: reading a quarter of the bytes buys little (docs/memory.md). `int8-dynamic` (CPU only) keeps the same int8
weights and scales but also rounds the activations to 8 bits, one scale per token, computed at run time, so the
product runs in fbgemm's int8 x int8 -> int32 GEMM (`quantized::linear_dynamic`). On AVX2, fbgemm multiplies
pairs of products in int16 (vpmaddubsw), which saturates for full-range activations, so it is used with
reduce_range: activations take 7 bits (128 levels). fbgemm quantizes the whole input matrix with one (asymmetric)
scale; dividing each row by its own max |x| first, and multiplying the output row back, makes that scale per token.
`int8-dynamic-head` also computes the tied output head's logits that way (the embedding lookup stays exact: the
embedding matrix is kept as it is, beside its int8 copy).

`int4` (weight-only, group-wise, CPU and CUDA) lives in generate/int4.py; replace_linears and the support checks
here dispatch to it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from cpmctl import CpmctlError
from cpmctl.generate.int4 import ACT_DTYPE as INT4_ACT_DTYPE
from cpmctl.generate.int4 import Int4Linear, check_int4_model, check_int4_support
from cpmctl.generate.packed import use_output_head

QUANTIZE_CHOICES = ("int8", "int8-dynamic", "int8-dynamic-head", "int4")
DYNAMIC_CHOICES = ("int8-dynamic", "int8-dynamic-head")  # int8 activations too: CPU, fbgemm
KERNELS = ("int8pack", "dequant")  # dequant: int8 -> model dtype per call, then the dense matmul (GPU fallback)
K_MULTIPLE = 16


def padded_in_features(in_features: int) -> int:
    return -(-in_features // K_MULTIPLE) * K_MULTIPLE


def int8_kernel(device: torch.device | str) -> str:
    """The int8 matmul used on `device`: aten._weight_int8pack_mm, unless CPMCTL_INT8_KERNEL says otherwise."""
    kernel = os.environ.get("CPMCTL_INT8_KERNEL", "int8pack")
    return kernel if kernel in KERNELS else "int8pack"


def scale_dtype(device: torch.device | str, compute_dtype: torch.dtype, quantize: str | None = "int8") -> torch.dtype:
    """The dtype the kernel wants for activations and scales: bf16 on the CPU (its fast path), else the model's;
    int4: bf16 everywhere."""
    if quantize == "int4":
        return INT4_ACT_DTYPE
    return torch.bfloat16 if torch.device(device).type == "cpu" else compute_dtype


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scale_as: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns q (out, padded in) int8 and scale (out,) in `scale_as`.

    The scale is rounded to `scale_as` first and q is computed against the rounded scale, so storing the scale in
    bf16/fp16 costs nothing beyond the int8 rounding itself.
    """
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(scale_as)
    q = torch.div(w, scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    pad = padded_in_features(w.shape[1]) - w.shape[1]
    if pad:
        q = F.pad(q, (0, pad))
    return q.contiguous(), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    return q[:, :in_features].float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight and one scale per output channel (buffers, not parameters)."""

    def __init__(self, in_features: int, out_features: int, act_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_dtype = act_dtype  # the kernel's activation dtype (== scale dtype)
        self.kernel = int8_kernel(device if device is not None else "cpu")
        k = padded_in_features(in_features)
        self.register_buffer("weight_int8", torch.empty(out_features, k, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=act_dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, act_dtype, device=linear.weight.device)
        q, scale = quantize_weight(linear.weight.detach(), act_dtype)
        module.weight_int8, module.scale = q, scale
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (rows, in) inputs (a decode step, generate/step.py) skip the reshapes: each is a dispatch, ~85 a step.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        x2 = x2.to(self.act_dtype)
        pad = self.weight_int8.shape[1] - self.in_features
        if pad:
            x2 = F.pad(x2, (0, pad))
        if self.kernel == "dequant":
            w = self.weight_int8.to(self.act_dtype) * self.scale[:, None]
            y = F.linear(x2, w)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, act_dtype={self.act_dtype}, "
                f"kernel={self.kernel}")


def block_linear_names(block: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules inside a transformer block (the ones int8 / int4 replace)."""
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def replace_linears(block: nn.Module, act_dtype: torch.dtype, quantize_now: bool, quantize: str | None = "int8",
                    device_type: str | None = None) -> None:
    """Swap every nn.Linear of `block` for an Int8Linear (an Int4Linear with quantize="int4", packed for
    `device_type`, default the weight's device): quantized from its weight, or empty (meta) for loading."""
    for name in block_linear_names(block):
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        linear = getattr(parent, child)
        if quantize == "int4":
            new = (Int4Linear.from_linear(linear) if quantize_now else
                   Int4Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                              device_type=device_type))
        elif quantize_now:
            new = Int8Linear.from_linear(linear, act_dtype)
        else:
            new = Int8Linear(linear.in_features, linear.out_features, act_dtype, device=linear.weight.device)
        setattr(parent, child, new)


def check_quantize_name(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise CpmctlError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got '{quantize}'")


def is_dynamic(quantize: str | None) -> bool:
    return quantize in DYNAMIC_CHOICES


def check_int8_support(device: torch.device | str, compute_dtype: torch.dtype) -> None:
    """Fail with a clear message where torch has no int8 weight kernel for this device (probed, not assumed)."""
    device = torch.device(device)
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise CpmctlError(f"--quantize int8: this torch ({torch.__version__}) has no int8 weight kernel")
    if device.type not in ("cpu", "cuda"):
        raise CpmctlError(f"--quantize int8 is not supported on device '{device}' (cpu and cuda are)")
    act = scale_dtype(device, compute_dtype)
    try:
        x = torch.zeros(1, K_MULTIPLE, dtype=act, device=device)
        q = torch.zeros(1, K_MULTIPLE, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(1, dtype=act, device=device))
    except (RuntimeError, NotImplementedError) as e:
        raise CpmctlError(
            f"--quantize int8 is not supported on {device} with {act} activations ({str(e).splitlines()[0][:120]})"
        ) from None


def check_quantize_support(quantize: str, device: torch.device | str, compute_dtype: torch.dtype) -> None:
    """The kernel check of `quantize` on `device`: int4's or int8's."""
    if quantize == "int4":
        check_int4_support(device)
    else:
        check_int8_support(device, compute_dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Quantize the block linears of a fully loaded (resident) model in place (`quantize`: a QUANTIZE_CHOICES)."""
    check_quantize_name(quantize)
    device = model.input_embedding.weight.device
    dtype = model.input_embedding.weight.dtype
    if is_dynamic(quantize):
        check_dynamic_support(quantize, device)
    check_quantize_support(quantize, device, dtype)
    if quantize == "int4":
        check_int4_model(model.config)
    act = scale_dtype(device, dtype, quantize)
    for block in model.encoder.layers:
        replace_linears(block, act, quantize_now=True, quantize=quantize)
    return use_int8_activations(model, quantize) if is_dynamic(quantize) else model


# ----- int8 activations (int8-dynamic) --------------------------------------------------------------------------
ACT_REDUCE_RANGE = True  # 7-bit activations: AVX2's int16 pair sums saturate with 8 (measured: half the true sum)


@contextlib.contextmanager
def _fbgemm_engine():
    """The quantized engine used for prepacking (a process-wide setting in torch), restored afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class DynamicInt8Linear(nn.Module):
    """A bias-free linear with an int8 weight (per output channel) and int8 activations (per token, at run time).

    The weight is fbgemm's packed copy of `q` (an opaque object, so the module has no weight buffer); `scale` (fp32)
    is kept for reference and accounting.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        scale = scale.float()
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated (pytorch#184982)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q.cpu(), scale.double().cpu(), torch.zeros(self.out_features, dtype=torch.long), 0)
        with _fbgemm_engine():
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("scale", scale.cpu())

    @classmethod
    def from_int8(cls, module: Int8Linear) -> "DynamicInt8Linear":
        """The same int8 weight and scales as a weight-only Int8Linear (its padding columns dropped)."""
        return cls(module.weight_int8[:, : module.in_features], module.scale)

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "DynamicInt8Linear":
        q, scale = quantize_weight(w, torch.float32)
        return cls(q[:, : w.shape[1]], scale)

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes of the packed int8 weight (not a buffer, so not in .buffers(); the scales are)."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 (rows, in) inputs (a decode step, generate/step.py) skip the reshapes and casts: each is a dispatch.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        # One token: fbgemm's per-tensor scale is already per token (not dividing saves ~50 us a call; the price: torch
        # floors activation scales at 6.1e-5, so a lone token with max |x| < 4e-3 is rounded on that coarser grid).
        if x2.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, ACT_REDUCE_RANGE)
        else:
            peak = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
            y = torch.ops.quantized.linear_dynamic(x2 / peak, self.packed, ACT_REDUCE_RANGE).mul_(peak)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=fbgemm linear_dynamic"


def use_int8_head(model: nn.Module, activations: bool = True) -> None:
    """Compute the logits with an int8 copy of the tied head; the embedding matrix stays for the input lookup.
    `activations=False`: the weight-only kernel instead (bench/generate.py measures it; it is no faster)."""
    weight = model.input_embedding.weight.detach()
    if activations:
        head = DynamicInt8Linear.from_weight(weight)
    else:
        act = scale_dtype(weight.device, weight.dtype)
        head = Int8Linear(weight.shape[1], weight.shape[0], act, device=weight.device)
        head.weight_int8, head.scale = quantize_weight(weight, act)
    use_output_head(model, head)


def check_dynamic_support(quantize: str, device: torch.device | str, streamed: bool = False) -> None:
    """int8 activations run on the CPU, in fbgemm, with every block resident (packed weights do not stream)."""
    device = torch.device(device)
    if device.type != "cpu":
        raise CpmctlError(f"--quantize {quantize} runs on the CPU only (fbgemm); use --quantize int8 on {device}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise CpmctlError(f"--quantize {quantize}: this torch ({torch.__version__}) has no fbgemm engine")
    if streamed:
        raise CpmctlError(f"--quantize {quantize} needs every block resident: raise --memory-limit or use "
                          "--quantize int8")


class DynamicInt8Group(nn.Module):
    """Linears that read the same input (a block's project_q/k/v, its w_0/w_1) packed as one fbgemm weight: one call
    where there were three or two (measured, one row: q, k, v 0.50 -> 0.31 ms a layer; eight rows 0.83 -> 0.47 ms).
    The numbers do not change: the weight scales are per output channel, the activation scale is per row of the
    shared input, and the int32 sums are exact. Each linear stays a module of its own (a GroupMember, its columns of
    the product); the group computes once per input tensor (same object, same version: an input changed in place
    is computed again) and lets go of it when its last member has read it."""

    def __init__(self, members: list[Int8Linear]):
        super().__init__()
        self.linear = DynamicInt8Linear(torch.cat([m.weight_int8[:, : m.in_features] for m in members]),
                                        torch.cat([m.scale for m in members]))
        self.count = len(members)
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
    """One linear of a DynamicInt8Group: columns start..start+out_features of the group's product."""

    def __init__(self, group: DynamicInt8Group, start: int, in_features: int, out_features: int):
        super().__init__()
        self.group, self.start = group, start
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.product(x)[..., self.start : self.start + self.out_features].contiguous()

    def extra_repr(self) -> str:
        return f"columns {self.start}..{self.start + self.out_features} of the group's product"


GROUPS = (("self_att.self_attention", ("project_q", "project_k", "project_v")), ("ffn.ffn.w_in", ("w_0", "w_1")))


def _group_linears(block: nn.Module) -> None:
    """Replace each GROUPS set of weight-only Int8Linears of `block` by GroupMembers of one DynamicInt8Group."""
    for parent_name, names in GROUPS:
        try:
            parent = block.get_submodule(parent_name)
        except AttributeError:  # a sub-block dropped by mask_modules
            continue
        members = [getattr(parent, n) for n in names]
        if not all(isinstance(m, Int8Linear) and not m.weight_int8.is_meta for m in members):
            continue
        group, start = DynamicInt8Group(members), 0
        for name, member in zip(names, members):
            setattr(parent, name, GroupMember(group, start, member.in_features, member.out_features))
            start += member.out_features


@torch.no_grad()
def use_int8_activations(model: nn.Module, quantize: str, group: bool = True) -> nn.Module:
    """Turn the weight-only Int8Linears of a loaded int8 model (resident blocks) into DynamicInt8Linears in place,
    with the same int8 weights and scales (q, k, v and w_0, w_1 as DynamicInt8Groups unless `group` is False: the
    same numbers); with int8-dynamic-head, the tied head too."""
    check_dynamic_support(quantize, model.input_embedding.weight.device)
    for block in model.encoder.layers:
        if group:
            _group_linears(block)
        for name, module in list(block.named_modules()):
            if isinstance(module, Int8Linear):
                if module.weight_int8.is_meta:
                    raise CpmctlError(f"--quantize {quantize} needs every block resident")
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child,
                        DynamicInt8Linear.from_int8(module))
    if quantize == "int8-dynamic-head":
        use_int8_head(model)
    return model
