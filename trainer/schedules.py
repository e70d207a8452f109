"""Schedules of a run's step: MAE's warm-up-cosine learning rate, DINO's half cosines.

Plain arithmetic, importable without torch (a config checks its learning-rate schedule before
torch loads: docs/ARCHITECTURE.md, "Start-up").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["WarmupCosine", "half_cosine"]


def half_cosine(start: float, end: float, fraction: float) -> float:
    """A half cosine from ``start`` (fraction 0) to ``end`` (fraction 1): MAE's and DINO's
    schedules (MAE ``util/lr_sched.py``; DINO / iBOT ``utils.cosine_scheduler``)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


class WarmupCosine:
    """Learning rate of step ``s``: linear warmup to ``base_lr``, then cosine down to ``min_lr``.

    MAE's ``util/lr_sched.adjust_learning_rate`` (applied every iteration), indexed by step
    instead of fractional epoch. Warmup step ``s`` gets ``base · (s + 1) / W``: MAE's starts
    one step earlier (0 at step 0, ``base · (W − 1) / W`` at the last), iBOT's
    ``cosine_scheduler`` spaces ``linspace(0, base, W)``; here no step trains at rate 0 and the
    last warmup step reaches ``base`` (a difference of one step in ``W``). Past
    ``total_steps`` (a resumed run given more epochs) the rate stays at ``min_lr``.
    ``state_dict`` makes it a checkpointable scheduler.
    """

    def __init__(
        self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
    ) -> None:
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        return half_cosine(self.base_lr, self.min_lr, min((step - self.warmup_steps) / span, 1.0))

    def total(self) -> float:
        """The sum of the rates of steps ``0 … total_steps − 1``: the warmup's arithmetic
        series plus the half-cosine's mean, ``(base + min) / 2``, over the rest. AdamW moves a
        weight by about the rate or less per step, so this bounds how far any weight moves."""
        warmup = min(self.warmup_steps, self.total_steps)  # steps 0 … warmup − 1 warm up
        rising = self.base_lr * warmup * (warmup + 1) / (2 * max(self.warmup_steps, 1))
        return rising + (self.base_lr + self.min_lr) / 2 * (self.total_steps - warmup)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's rate for ``step``; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float | int]:
        return {
            "base_lr": self.base_lr,
            "min_lr": self.min_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["base_lr"], state["total_steps"], state["warmup_steps"], state["min_lr"]
        )
