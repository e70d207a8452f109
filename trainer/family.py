"""Trainer families: what a pretraining method adds to the shared loop, and nothing else.

A family is a model, a loss and what its batches need (docs/ARCHITECTURE.md, "Trainer
families"). The loop (``salient.trainer.loop``), checkpoints, the Ray Train launch, refresh,
eval and the console are shared: a new method is one :class:`Family` in :data:`FAMILIES`.

- ``build(**settings)`` makes the model. It carries what checkpoints and teachers read
  (``name``, ``encoder_kwargs``, ``decoder_kwargs``, ``encoder``); for a family with a
  student and an EMA teacher, ``encoder`` is the backbone that eval, export and refresh read.
- ``forward(model, batch, device)`` runs the (possibly DDP-wrapped) model on one loader
  batch and returns ``(loss, metrics)``: the scalar to minimise and the family's extra
  scalars (``loss_rec``, ``loss_g``, …), which the loop averages into each step's record.
- ``hooks(model, optimizer)`` makes the :class:`StepHooks` of one run: schedules set before a
  step, gradient edits before the optimiser step, an EMA update after it, a side optimiser
  (a discriminator's) and the state these keep in the checkpoint. ``StepHooks`` and
  ``Progress`` live in :mod:`salient.trainer.step_hooks` (re-exported here), so a family's
  own module can subclass them while this module imports it to register it.
- ``loader_fields(settings)``: the ``LoaderConfig`` fields the family's batches need beyond
  the masked-image batch (multi-crop views, per-head maps), or ``{}``.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from salient.pipeline.masking import MaskPlan
from salient.trainer.automae import (
    AutoMAEHooks,
    automae_forward,
    automae_loader_fields,
    build_automae,
)
from salient.trainer.models import build_model
from salient.trainer.step_hooks import Progress, StepHooks

__all__ = [
    "FAMILIES",
    "Family",
    "Progress",
    "StepHooks",
    "loss_targets",
    "masked_image_forward",
    "move_batch",
    "move_tensors",
]


def move_tensors(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor (also inside lists) on ``device``; other values as they are."""

    def put(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list | tuple):
            return type(value)(put(v) for v in value)
        return value

    return {key: put(value) for key, value in batch.items()}


def move_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, MaskPlan]:
    """A loader batch -> ``images [B,3,S,S]`` and its ``MaskPlan`` on ``device``."""
    put = lambda t: t.to(device, non_blocking=True)  # noqa: E731 - one use, four tensors
    plan = MaskPlan(put(batch["visible_idx"]), put(batch["mask_idx"]), put(batch["throw_idx"]))
    return put(batch["images"]), plan


def loss_targets(batch: dict, device: torch.device) -> dict:
    """The model's extra loss targets of a batch on ``device``: GPA's ``gpa_target [B, N]``
    with ``gpa_valid [B]`` (samples that have a map) when the loader made them."""
    if "gpa_target" not in batch:
        return {}
    valid = torch.as_tensor(batch["has_saliency"])
    return {
        "gpa_target": batch["gpa_target"].to(device, non_blocking=True),
        "gpa_valid": valid.to(device, non_blocking=True),
    }


def masked_image_forward(
    model: nn.Module, batch: dict, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MAE's and SimMIM's step: images and the loader's mask plan (plus GPA's target)."""
    images, plan = move_batch(batch, device)
    loss, _ = model(images, plan, **loss_targets(batch, device))
    return loss, {}


def _no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> StepHooks:
    return StepHooks()


def _no_fields(settings: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """One pretraining method's parts (module docstring)."""

    name: str
    build: Callable[..., nn.Module]
    forward: Callable[[nn.Module, dict, torch.device], tuple[torch.Tensor, dict]] = field(
        default=masked_image_forward
    )
    hooks: Callable[[nn.Module, torch.optim.Optimizer], StepHooks] = field(default=_no_hooks)
    loader_fields: Callable[[Any], dict] = field(default=_no_fields)


FAMILIES: dict[str, Family] = {
    "mae": Family("mae", build_model),
    "simmim": Family("simmim", build_model),
    "automae": Family(
        "automae", build_automae, automae_forward, AutoMAEHooks, automae_loader_fields
    ),
}
