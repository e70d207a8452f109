"""What a family adds around each optimiser step: :class:`StepHooks`, and :class:`Progress`.

Part of the family contract (``salient.trainer.family``, docs/ARCHITECTURE.md, "Trainer
families"), in its own module so a family's module can subclass the hooks while
``family.py`` imports every family to register it.

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
        discriminator's), all-reduced only when ``sync`` (the batch ends a step). It may add
        entries to ``batch`` that the family's forward reads (maps an online teacher
        computes), so they are computed once per batch. Returns its scalars."""
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


def sync_if(module: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` for a batch that does not end a step (no all-reduce); a
    ``nullcontext`` when ``sync`` or when ``module`` is not wrapped in DDP."""
    if sync or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()
