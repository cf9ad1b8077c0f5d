"""Hard-concrete (L0) gates, the masks of one pruning stage, and the Lagrangian that drives them to a target size.

A hard-concrete gate (Louizos et al. 2018) with parameter log_alpha samples
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   u ~ U(0, 1)
    z = clamp(s * (r - l) + l, 0, 1)                         (stretch limits l = -0.1, r = 1.1)
so z is exactly 0 or 1 with positive probability and differentiable in log_alpha in between;
P(z != 0) = sigmoid(log_alpha - beta * log(-l / r)) (= sigmoid(log_alpha + 1.5986) for beta 2/3).

Unlike the original (BMCook), the sampled gate is NOT detached: it multiplies the sub-block / head / channel output
inside the model, so the LM loss gradient reaches log_alpha.

Structure types and their gates (one Lagrangian pair per type):
- attention: one scalar per attention sub-block that exists in the source (TransformerBlock.attention_gate);
- ffn: one scalar per FFN sub-block (TransformerBlock.ffn_gate);
- heads: ONE (num_heads,) gate vector shared by every layer (Attention.head_gate). The checkpoint format has one
  position-bias table shared by all layers, with a column per head index; a shared head mask keeps the same head
  indices in every layer, so that table can be sliced exactly (docs/prune.md explains the choice);
- channels: a (dim_ff,) gate vector per FFN layer (FeedForward.channel_gate); each layer keeps the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cpmctl.model.ant import CPMAnt
from cpmctl.model.config import CPMAntConfig

BETA = 2.0 / 3.0
LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1
_EPS = 1e-6


class HardConcrete(nn.Module):
    """A tensor of independent hard-concrete gates."""

    def __init__(self, shape: tuple[int, ...], init_mean: float = 3.0, init_std: float = 0.01,
                 generator: torch.Generator | None = None):
        super().__init__()
        # Drawn from the caller's seeded generator: two identical prune commands start from the same gates.
        init = torch.randn(shape, generator=generator) * init_std + init_mean
        self.log_alpha = nn.Parameter(init)
        # The noise u of the current optimizer step; set by `resample`, reused by every micro-batch of the step.
        self.register_buffer("noise", torch.full(shape, 0.5), persistent=False)

    def resample(self, generator: torch.Generator) -> None:
        u = torch.rand(self.log_alpha.shape, generator=generator)
        self.noise = u.clamp(_EPS, 1 - _EPS).to(self.log_alpha.device)

    def sample(self) -> torch.Tensor:
        """z for the current noise; differentiable in log_alpha."""
        u = self.noise
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)

    def median(self) -> torch.Tensor:
        """The deterministic gate: z at u = 1/2."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z != 0): the expected count of kept structures is its sum."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_LOW / LIMIT_HIGH))


@dataclass
class Selection:
    """Which structures a stage keeps, and the gate value each kept one carries (folded into the weights on
    extraction). Indexed by the source model's layer numbers; entries for absent sub-blocks are False / 0."""

    attention_keep: torch.Tensor  # (num_layers,) bool
    attention_scale: torch.Tensor  # (num_layers,)
    ffn_keep: torch.Tensor  # (num_layers,) bool
    ffn_scale: torch.Tensor  # (num_layers,)
    head_keep: torch.Tensor  # (num_heads,) bool, shared by all layers
    head_scale: torch.Tensor  # (num_layers, num_heads)
    channel_keep: torch.Tensor  # (num_layers, dim_ff) bool
    channel_scale: torch.Tensor  # (num_layers, dim_ff)

    @classmethod
    def keep_all(cls, config: CPMAntConfig) -> "Selection":
        n, h, f = config.num_layers, config.num_heads, config.dim_ff
        attn = torch.tensor([config.has_attention(i) for i in range(n)])
        ffn = torch.tensor([config.has_ffn(i) for i in range(n)])
        return cls(attn, attn.float(), ffn, ffn.float(), torch.ones(h, dtype=torch.bool), torch.ones(n, h),
                   torch.ones(n, f, dtype=torch.bool), torch.ones(n, f))

    @property
    def mask_modules(self) -> list[list[bool]]:
        return [[not bool(a), not bool(f)] for a, f in zip(self.attention_keep, self.ffn_keep)]

    def kept_layers(self) -> dict[str, list[int]]:
        return {"attention": torch.nonzero(self.attention_keep).flatten().tolist(),
                "ffn": torch.nonzero(self.ffn_keep).flatten().tolist()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Selection":
        return cls(**{k: state[k] for k in cls.__dataclass_fields__})

    def apply(self, model: CPMAnt) -> None:
        """Set the model's gates to this selection: the deterministic masked model."""
        device = model.input_embedding.weight.device
        for i, block in enumerate(model.encoder.layers):
            if block.self_att is not None:
                block.attention_gate = (self.attention_scale[i] * self.attention_keep[i]).to(device)
                block.self_att.self_attention.head_gate = (self.head_scale[i] * self.head_keep).to(device)
            if block.ffn is not None:
                block.ffn_gate = (self.ffn_scale[i] * self.ffn_keep[i]).to(device)
                block.ffn.ffn.channel_gate = (self.channel_scale[i] * self.channel_keep[i]).to(device)


def clear_gates(model: CPMAnt) -> None:
    for block in model.encoder.layers:
        block.attention_gate = block.ffn_gate = None
        if block.self_att is not None:
            block.self_att.self_attention.head_gate = None
        if block.ffn is not None:
            block.ffn.ffn.channel_gate = None


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k True entries along the last dim: the k largest scores (ties broken by the lower index)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores.detach().float().cpu(), dim=-1, descending=True, stable=True).indices
        keep.scatter_(-1, order[..., :k], True)
    return keep


class StageMasks(nn.Module):
    """The gates of one stage on one model: only the structure types the stage prunes get gates."""

    def __init__(self, config: CPMAntConfig, kinds: list[str], init_mean: float = 3.0, init_std: float = 0.01,
                 seed: int = 0):
        super().__init__()
        self.config = config
        self.kinds = list(kinds)
        self.attention_layers = [i for i in range(config.num_layers) if config.has_attention(i)]
        self.ffn_layers = [i for i in range(config.num_layers) if config.has_ffn(i)]
        sizes = {
            "attention": (len(self.attention_layers),),
            "ffn": (len(self.ffn_layers),),
            "heads": (config.num_heads,),
            "channels": (len(self.ffn_layers), config.dim_ff),
        }
        generator = torch.Generator().manual_seed(seed)
        self.gates = nn.ModuleDict({k: HardConcrete(sizes[k], init_mean, init_std, generator) for k in self.kinds})

    @torch.no_grad()
    def init_from_scores(self, scores: dict[str, torch.Tensor], mean: float, spread: float) -> None:
        """log_alpha = mean + spread * r, r the importance's centred rank in [-1, 1] (per layer for channels):
        the gates start in the importance order, at a scale that does not depend on the scores' units."""
        for kind, gate in self.gates.items():
            score = scores[kind].detach().float().cpu().reshape(gate.log_alpha.shape)
            n = score.shape[-1]
            order = torch.sort(score, dim=-1, stable=True).indices  # ascending: rank 0 = least important
            ranks = torch.empty_like(score).scatter_(-1, order, torch.arange(n, dtype=torch.float32).expand_as(score))
            centred = ranks / max(n - 1, 1) * 2 - 1
            gate.log_alpha.copy_((mean + spread * centred).to(gate.log_alpha.device))

    def resample(self, generator: torch.Generator) -> None:
        for gate in self.gates.values():
            gate.resample(generator)

    @torch.no_grad()
    def clamp_(self, limit: float) -> None:
        for gate in self.gates.values():
            gate.log_alpha.clamp_(-limit, limit)

    def apply(self, model: CPMAnt, deterministic: bool = False) -> None:
        """Feed the gates into the model (sampled z, or the median in deterministic mode); the attributes hold
        non-leaf tensors, so the LM loss backpropagates into log_alpha."""
        values = {k: (g.median() if deterministic else g.sample()) for k, g in self.gates.items()}
        layers = model.encoder.layers
        if "attention" in values:
            for j, i in enumerate(self.attention_layers):
                layers[i].attention_gate = values["attention"][j]
        if "ffn" in values:
            for j, i in enumerate(self.ffn_layers):
                layers[i].ffn_gate = values["ffn"][j]
        if "heads" in values:
            for i in self.attention_layers:
                layers[i].self_att.self_attention.head_gate = values["heads"]
        if "channels" in values:
            for j, i in enumerate(self.ffn_layers):
                layers[i].ffn.ffn.channel_gate = values["channels"][j]

    def expected_fractions(self) -> dict[str, torch.Tensor]:
        """Expected kept fraction per structure type: a scalar for attention / ffn / heads, one value per layer
        for channels (each layer must reach the per-layer count)."""
        out = {}
        for kind, gate in self.gates.items():
            p = gate.prob_nonzero()
            out[kind] = p.mean(dim=-1) if kind == "channels" else p.mean().reshape(1)
        return out

    def totals(self) -> dict[str, int]:
        """How many structures of each gated type the source has (heads / channels: per layer)."""
        return {"attention": len(self.attention_layers), "ffn": len(self.ffn_layers),
                "heads": self.config.num_heads, "channels": self.config.dim_ff}

    @torch.no_grad()
    def select(self, targets: dict[str, int]) -> Selection:
        """Exact top-k per structure type by log_alpha; kept structures carry their median gate value."""
        sel = Selection.keep_all(self.config)
        for kind, gate in self.gates.items():
            k, value = targets[kind], gate.median().detach().cpu()
            keep = top_k_mask(gate.log_alpha, k)
            if kind == "attention":
                sel.attention_keep[self.attention_layers] = keep
                sel.attention_scale[self.attention_layers] = value * keep
            elif kind == "ffn":
                sel.ffn_keep[self.ffn_layers] = keep
                sel.ffn_scale[self.ffn_layers] = value * keep
            elif kind == "heads":
                sel.head_keep = keep
                sel.head_scale = (value * keep).expand_as(sel.head_scale).clone()
            else:
                sel.channel_keep[self.ffn_layers] = keep
                sel.channel_scale[self.ffn_layers] = value * keep
        return sel


class Lagrangian(nn.Module):
    """One multiplier pair (lambda_1, lambda_2) per structure type (Sheared-LLaMA):
        penalty = sum_types mean_groups( l1 * (s - t) + l2 * (s - t)^2 )
    with s the expected kept fraction and t the target fraction, warmed up linearly from 1 (nothing pruned) to
    the final target over the first `warmup_steps`. The model and gates minimise it; the lambdas maximise it
    (gradient ascent), which pushes the expected size onto the target. For channels every layer is a group, so
    the quadratic term drives each layer to the same count."""

    def __init__(self, kinds: list[str], targets: dict[str, float], warmup_steps: int):
        super().__init__()
        self.kinds = list(kinds)
        self.final = {k: float(targets[k]) for k in self.kinds}
        self.warmup_steps = max(1, int(warmup_steps))
        self.lambdas = nn.Parameter(torch.zeros(len(self.kinds), 2))

    def target(self, kind: str, step: int) -> float:
        progress = min(1.0, step / self.warmup_steps)
        return 1.0 - (1.0 - self.final[kind]) * progress

    def forward(self, expected: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        total = self.lambdas.new_zeros(())
        metrics = {}
        for n, kind in enumerate(self.kinds):
            gap = expected[kind] - self.target(kind, step)
            total = total + (self.lambdas[n, 0] * gap + self.lambdas[n, 1] * gap.pow(2)).mean()
            metrics[f"expected_{kind}"] = float(expected[kind].detach().mean())
            metrics[f"target_{kind}"] = self.target(kind, step)
        return total, metrics
