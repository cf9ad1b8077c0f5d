"""Learning-rate schedules as a pure function of the step, so resuming needs nothing but the step number.

`lr` in a recipe is always the PEAK learning rate. The original's Noam schedule (BMTrain NoamLRScheduler, start
0.1, warmup 2000) rises linearly to 0.1/sqrt(2000) = 2.236e-3 and then decays as 0.1/sqrt(step); with peak
lr = 2.236e-3 and warmup_steps = 2000 `noam` below gives exactly those numbers.
Steps are numbered from 1: step s is the s-th optimizer update.
"""

from __future__ import annotations

import math

from cpmctl import CpmctlError

SCHEDULES = ("noam", "cosine", "linear", "constant")


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (1-based)."""
    if schedule not in SCHEDULES:
        raise CpmctlError(f"train.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    step = max(step, 1)
    warmup = max(warmup_steps, 0)
    if schedule == "noam":
        # Linear warmup to the peak, then inverse square root: peak * min(s / w, sqrt(w / s)).
        w = max(warmup, 1)
        return min(step / w, math.sqrt(w / step))
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape

