"""What a family's training step is made of: where the step stands, and the hooks around it.

``Progress`` (the step about to run, in the run's steps and epochs) and ``StepHooks`` (the
per-step work a family adds around the optimiser step) are the step half of the family
contract (docs/ARCHITECTURE.md, "Trainer families"); ``salient.trainer.family`` re-exports
them beside the ``Family`` registry. They live here so a family module can subclass
``StepHooks`` without importing the registry that imports it.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Progress", "StepHooks", "sync_if"]


@dataclass(frozen=True)
class Progress:
    """Where an optimiser step stands in the run: ``step`` is the global step about to run."""

    step: int
    total_steps: int
    steps_per_epoch: int
    epoch: int

    @property
    def fraction(self) -> float:
        """The share of the run's steps done before this one, in [0, 1]."""
        return min(self.step / max(self.total_steps, 1), 1.0)


class StepHooks:
    """Per-step work a family adds around the optimiser step. The base does nothing, so the
    masked-image families (MAE, SimMIM) train exactly as the plain loop."""

    def before_step(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        """At a step's first batch, after the lr is set (schedules of weight decay, …)."""

    def side_step(self, batch: dict, sync: bool, progress: Progress) -> dict[str, float]:
        """Before the model's forward on each batch: a side network's own update (a
        discriminator's), all-reduced only when ``sync``. Returns its scalars."""
        return {}

    def before_optimizer_step(self, progress: Progress) -> None:
        """After backward and clipping, before the optimiser steps (freezing a layer's grads)."""

    def after_step(self, progress: Progress) -> None:
        """After the optimiser step (an EMA teacher's update)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the hooks (a side optimiser's state); plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values on resume."""


def sync_if(model: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` for a batch that does not end a step (no all-reduce); a plain module
    (or ``sync``) runs as it is. The loop wraps the model's backward in it, and a family's
    side network (a discriminator) its own."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()
