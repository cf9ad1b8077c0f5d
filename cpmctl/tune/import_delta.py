"""Import an original CPM-Live / OpenDelta LoRA delta checkpoint into a peft adapter directory.

OpenDelta's LoraModel inserts a *parallel* module named `lora` beside each target: the backbone module's forward is
wrapped so that its output becomes `module(x) + lora(x)`, with `lora(x) = (x @ lora_A.T @ lora_B.T) * alpha / r`
(lora_A: (r, in), lora_B: (out, r)). CPM-Live's Linear divides by sqrt(in) inside its own forward, so the delta is
added AFTER that factor: original output = (x @ W.T) / sqrt(in) + s * B A x. Our folded linear computes
x @ (W / sqrt(in)).T, the same first term, so lora_A and lora_B carry over unchanged, with the same scaling.

The delta file is the state dict saved with OpenDelta's `set_state_dict=True` (only the delta keys), e.g.
`encoder.layers.0.self_att.self_attention.project_q.lora.lora_A`. OpenDelta does not store alpha; its default,
which CPM-Live's tune scripts used, is 16 (scaling 2 at r 8).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cpmctl import CpmctlError
from cpmctl.model.config import CPMAntConfig
from cpmctl.model.lora import ADAPTER_KEY_PREFIX, LoraSettings, adapter_meta, write_adapter

OPENDELTA_DEFAULT_ALPHA = 16.0
_DELTA_KEY = re.compile(
    r"^(?:.*\.)?(?P<module>encoder\.layers\.\d+\."
    r"(?:self_att\.self_attention\.(?P<attn>project_q|project_k|project_v|attention_out)"
    r"|ffn\.ffn\.(?P<ffn>w_in\.w_0|w_in\.w_1|w_out)))\.lora\.lora_(?P<ab>[AB])$"
)
# The first OpenDelta releases gave LowRankLinear an unused nn.Linear `lin`; its weights are not part of the delta.
_UNUSED_KEY = re.compile(r"\.lora\.lin\.(weight|bias)$")


def read_delta(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CpmctlError(f"delta checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged or non-torch file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise CpmctlError(f"{path}: cannot read delta checkpoint ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CpmctlError(f"{path}: not a state dict of tensors")
    return state


def convert_delta(state: dict[str, torch.Tensor],
                  source: str = "delta") -> tuple[dict[str, torch.Tensor], LoraSettings, int]:
    """OpenDelta keys -> adapter keys (`base_model.model.cpmant.<module>.lora_A.weight`, as peft names them on
    CpmAntForCausalLM). Returns (state, settings-without-alpha, number of ignored non-LoRA keys)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    targets: set[str] = set()
    ignored = 0
    for key, tensor in state.items():
        m = _DELTA_KEY.match(key)
        if m is None:
            ignored += 1 if not _UNUSED_KEY.search(key) else 0
            continue
        if tensor.dim() != 2:
            raise CpmctlError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected a matrix")
        targets.add(m["attn"] or m["ffn"].rpartition(".")[2])
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise CpmctlError(
            f"{source}: no OpenDelta LoRA keys (expected keys like "
            "encoder.layers.0.self_att.self_attention.project_q.lora.lora_A)"
        )
    ranks = set()
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise CpmctlError(f"{source}: {module}.lora.lora_{missing} is missing (lora_A and lora_B come in pairs)")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise CpmctlError(
                f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank"
            )
        ranks.add(a.shape[0])
        out[f"{ADAPTER_KEY_PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        out[f"{ADAPTER_KEY_PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
    if len(ranks) != 1:
        raise CpmctlError(f"{source}: LoRA ranks differ between modules ({sorted(ranks)}); one rank is supported")
    settings = LoraSettings(r=ranks.pop(), targets=sorted(targets))
    return out, settings, ignored


def check_delta_fits(state: dict[str, torch.Tensor], config: CPMAntConfig, source: str) -> None:
    """The delta's matrices must match the base model's linear shapes."""
    from cpmctl.model.ant import build_model

    model = build_model(config, device="meta")
    for key, t in state.items():
        module_name = key[len(ADAPTER_KEY_PREFIX):].rsplit(".", 2)[0]
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CpmctlError(f"{source}: {module_name} does not exist in the base model") from None
        want = (t.shape[0], linear.in_features) if ".lora_A." in key else (linear.out_features, t.shape[1])
        if tuple(t.shape) != want:
            raise CpmctlError(f"{source}: {module_name} delta has shape {tuple(t.shape)}, the base model needs {want}")


def import_delta(path: str | Path, out: str | Path, alpha: float = OPENDELTA_DEFAULT_ALPHA,
                 base_config: CPMAntConfig | None = None, base_model: str | None = None, force: bool = False) -> dict:
    """Convert an OpenDelta LoRA delta file into an adapter directory; returns a summary."""
    from cpmctl.outputs import claim

    output = claim(out, "tune import-delta", force=force, inputs=[path])
    state, settings, ignored = convert_delta(read_delta(path), str(path))
    settings.alpha = float(alpha)
    settings.validate()
    if base_config is not None:
        check_delta_fits(state, base_config, str(path))
    meta = adapter_meta(base_config, source=str(path), imported_from="opendelta")
    write_adapter(out, state, settings, meta, base_model, output=output)
    return {
        "out": str(out),
        "modules": len(state) // 2,
        "r": settings.r,
        "alpha": settings.alpha,
        "scaling": settings.scaling,
        "targets": settings.targets,
        "parameters": sum(t.numel() for t in state.values()),
        "ignored_keys": ignored,
    }
