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
  (a discriminator's) and the state these keep in the checkpoint.
- ``loader_fields(settings)``: the ``LoaderConfig`` fields the family's batches need beyond
  the masked-image batch (multi-crop views, per-head maps), or ``{}``.
- ``settings(run) -> dict``: ``build``'s keywords from a run's settings (``TrainConfig``).
- ``clip(model, max_norm) -> norm``: how the loop clips gradients at ``--clip-grad``
  (None: the global norm, torch's ``clip_grad_norm_``; iBOT clips each parameter on its own);
  returns the norm before clipping for the step's record.

``Progress`` and ``StepHooks`` are defined in ``salient.trainer.steps`` (so a family module
can subclass them without importing this registry).

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
    automae_settings,
    build_automae,
)
from salient.trainer.ibot import build_ibot
from salient.trainer.ibot_step import (
    clip_per_parameter,
    ibot_forward,
    ibot_hooks,
    ibot_loader_fields,
    ibot_settings,
)
from salient.trainer.models import build_model
from salient.trainer.specs import FAMILY_NAMES
from salient.trainer.steps import StepHooks

__all__ = [
    "FAMILIES",
    "Family",
    "loss_targets",
    "masked_image_forward",
    "masked_image_settings",
    "move_batch",
]


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


def masked_image_settings(run: Any) -> dict:
    """MAE's and SimMIM's ``build`` keywords from a run's settings (a ``TrainConfig``, or a
    checkpoint's config, where an older run may lack the optional ones: their defaults)."""
    return {
        "name": run.model,
        "image_size": run.image_size,
        "patch_size": run.patch_size,
        "norm_pix_loss": getattr(run, "norm_pix_loss", False),
        "gpa_loss_weight": getattr(run, "gpa_loss_weight", 0.0),
    }


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
    clip: Callable[[nn.Module, float | None], float] | None = None  # None: the global norm
    settings: Callable[[Any], dict] = field(default=masked_image_settings)


FAMILIES: dict[str, Family] = {
    "mae": Family("mae", build_model),
    "simmim": Family("simmim", build_model),
    "ibot": Family(
        "ibot",
        build_ibot,
        forward=ibot_forward,
        hooks=ibot_hooks,
        loader_fields=ibot_loader_fields,
        clip=clip_per_parameter,
        settings=ibot_settings,
    ),
    "automae": Family(
        "automae",
        build_automae,
        forward=automae_forward,
        hooks=AutoMAEHooks,
        loader_fields=automae_loader_fields,
        settings=automae_settings,
    ),
}
if tuple(FAMILIES) != FAMILY_NAMES:  # the names a flag accepts are declared without torch
    raise ImportError(f"FAMILIES {tuple(FAMILIES)} must match specs.FAMILY_NAMES {FAMILY_NAMES}")
