"""The mask phase's objective and state: hard-concrete gates sampled into the model, LM loss, optional logit
distillation from the unpruned teacher, and the Lagrangian that drives the expected size to the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpmctl.model.inputs import IGNORE, TASK_NAMES
from cpmctl.model.ant import CPMAnt
from cpmctl.prune.gates import Lagrangian, StageMasks
from cpmctl.prune.recipe import PruneRecipe
from cpmctl.prune.targets import Stage
from cpmctl.train.engine import unwrap
from cpmctl.train.loop import default_param_groups


def _ce_and_metrics(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    mask = batch["target"] != IGNORE
    losses = F.cross_entropy(logits[mask].float(), batch["target"][mask], reduction="none")
    count = losses.numel()
    metrics = {"targets": float(count), "loss/ce": float(losses.detach().sum()) / max(count, 1),
               "targets/ce": float(count)}
    tasks = batch["task"][mask]
    for task_id, name in TASK_NAMES.items():
        picked = tasks == task_id
        n = int(picked.sum())
        if n:
            metrics[f"loss/{name}"] = float(losses.detach()[picked].sum()) / n
            metrics[f"targets/{name}"] = float(n)
    return losses.sum() / max(count, 1), mask, metrics


def lm_objective(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])
    loss, _, metrics = _ce_and_metrics(logits, batch)
    return loss, metrics


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the vocabulary at temperature T, times T^2 (so its gradient
    scale does not shrink with T; Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean() * t * t


class MaskPhase:
    """The mask phase's state and callbacks: the gates, the Lagrangian, the step counter and the teacher.

    `on_step` draws the hard-concrete noise of a step from a generator seeded by (seed, step), so a resumed run
    samples exactly the gates an uninterrupted one would; `loss` feeds the sampled gates into the model and adds
    distillation and the Lagrangian penalty. state_dict/load_state_dict make it the loop's `extra_state`."""

    def __init__(self, stage: Stage, config, recipe: PruneRecipe, teacher: CPMAnt | None):
        self.kinds = stage.kinds
        self.targets = stage.target_counts()
        # The gates' initial log_alpha come from (recipe seed, stage): reruns and resumed runs start alike.
        self.masks = StageMasks(config, self.kinds, recipe.gates.init_mean, recipe.gates.init_std,
                                seed=recipe.seed * 1_000_003 + stage.index)
        totals = self.masks.totals()
        fractions = {k: self.targets[k] / totals[k] for k in self.kinds}
        warmup = round(recipe.gates.target_warmup * recipe.mask.steps)
        self.lagrangian = Lagrangian(self.kinds, fractions, warmup)
        self.teacher, self.distill, self.seed, self.step = teacher, recipe.distill, recipe.seed, 0
        self.limit = recipe.gates.log_alpha_limit

    def to(self, device) -> "MaskPhase":
        self.masks.to(device)
        self.lagrangian.to(device)
        return self

    def param_groups(self, model: CPMAnt, recipe: PruneRecipe) -> list[dict]:
        """Weights as in pretraining; gates and multipliers at their own constant lr, no decay, not clipped;
        the multipliers by gradient ascent."""
        weights = default_param_groups(model, recipe.mask)
        own = {"weight_decay": 0.0, "scheduled": False, "clip": False, "betas": (recipe.gates.beta1, 0.999)}
        return weights + [
            {"params": list(self.masks.parameters()), "lr": recipe.gates.lr, **own},
            {"params": list(self.lagrangian.parameters()), "lr": recipe.gates.lambda_lr, "maximize": True, **own},
        ]

    def on_step(self, step: int, model: CPMAnt) -> None:
        self.step = step
        self.masks.clamp_(self.limit)  # after the previous step's update
        self.masks.resample(torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.masks.apply(unwrap(model))  # the gates go into the user's module (inside a DDP wrapper)
        logits = model(batch["input"], batch["segment"], batch["context"], batch["span"])
        ce, mask, metrics = _ce_and_metrics(logits, batch)
        task_loss = ce
        if self.teacher is not None and self.distill.weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input"], batch["segment"], batch["context"], batch["span"])
            kd = distillation_kl(logits[mask], teacher_logits[mask], self.distill.temperature)
            task_loss = (1 - self.distill.weight) * ce + self.distill.weight * kd
            metrics["kd"] = float(kd.detach())
        penalty, lag_metrics = self.lagrangian(self.masks.expected_fractions(), self.step)
        metrics.update(lag_metrics, lagrangian=float(penalty.detach()))
        return task_loss + penalty, metrics

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "lagrangian": self.lagrangian.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.step = int(state["step"])


def distilled_objective(teacher: CPMAnt, distill):
    """Recovery with distillation (`distill.recovery`): the mask phase's task loss, (1 - w) CE + w T^2 KL, without
    gates or penalty; the same for every selection method, so the methods are compared under equal treatment."""

    def loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        args = (batch["input"], batch["segment"], batch["context"], batch["span"])
        logits = model(*args)
        ce, mask, metrics = _ce_and_metrics(logits, batch)
        with torch.no_grad():
            teacher_logits = teacher(*args)
        kd = distillation_kl(logits[mask], teacher_logits[mask], distill.temperature)
        metrics["kd"] = float(kd.detach())
        return (1 - distill.weight) * ce + distill.weight * kd, metrics

    return loss
