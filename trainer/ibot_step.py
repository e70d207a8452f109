"""iBOT's step in the shared loop: a multi-crop batch's forward, the step hooks, clipping.

The parts of the ``"ibot"`` family (``salient.trainer.family``) around the model of
``salient.trainer.ibot`` (docs/ARCHITECTURE.md, "Trainer families", iBOT): weight decay and
EMA momentum on per-step cosines, the teacher temperatures per epoch, the last layer frozen
during the first epochs (:class:`IBOTHooks`); gradients clipped per parameter
(:func:`clip_per_parameter`); the loader's multi-crop fields (:func:`ibot_loader_fields`).
Values and their sources: ``IBOTSettings``.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from salient.pipeline.epochs import mix_seed
from salient.pipeline.loader_config import MultiCrop
from salient.pipeline.masking import NEEDS_SALIENCY
from salient.trainer.checkpoint import unwrap_model
from salient.trainer.schedules import half_cosine
from salient.trainer.specs import IBOTSettings
from salient.trainer.steps import Progress, StepHooks

__all__ = [
    "IBOTHooks",
    "clip_per_parameter",
    "ibot_forward",
    "ibot_hooks",
    "ibot_loader_fields",
    "ibot_settings",
]

_DROP_PATH_STREAM = 1  # mix_seed(batch seed, 1): not the stream the batch's masks draw from


def ibot_forward(
    model: nn.Module, batch: dict, device: torch.device
) -> tuple[Tensor, dict[str, Tensor]]:
    """One multi-crop batch (``pipeline.views``) through the (possibly DDP-wrapped) model.

    The student's drop path draws from torch's global generator; it is seeded from the
    batch's own seed first (the loader's, a function of seed, epoch, rank and batch), so a
    resumed run draws what the uninterrupted one drew and steps the same."""
    put = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    torch.manual_seed(mix_seed(int(batch["mask_seed"]), _DROP_PATH_STREAM))
    return model(
        put(batch["global_images"]),
        put(batch.get("local_images")),
        put(batch.get("masks")),
        int(batch["mask_seed"]),
    )


class IBOTHooks(StepHooks):
    """iBOT's per-step schedules (``main_ibot.py`` ``train_one_epoch``): weight decay on a
    cosine from ``weight_decay`` to ``weight_decay_end`` on the decayed group, the teacher's
    temperatures of the epoch, the last layer's gradients cancelled while ``epoch <
    freeze_last_layer`` (``utils.cancel_gradients_last_layer``), then the EMA update with
    momentum on a cosine from ``momentum_teacher`` to 1 (``utils.cosine_scheduler``, per
    step)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = unwrap_model(model)

    def before_step(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        s = self.model.settings
        decay = half_cosine(s.weight_decay, s.weight_decay_end, progress.fraction)
        # The groups are looked up at each step: a resume's optimizer.load_state_dict
        # replaces them. iBOT get_params_groups: biases and 1-D (norm) weights not decayed.
        for group in optimizer.param_groups:
            if any(p.ndim > 1 for p in group["params"]):
                group["weight_decay"] = decay
        self.model.set_epoch(progress.epoch)

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.model.settings.freeze_last_layer:
            for param in self.model.student["head"].last_layer.parameters():
                param.grad = None

    def after_step(self, progress: Progress) -> None:
        s = self.model.settings
        self.model.update_teacher(half_cosine(s.momentum_teacher, 1.0, progress.fraction))


def ibot_settings(run: Any) -> dict:
    """``build_ibot``'s keywords from a run's settings (a ``TrainConfig``, or a checkpoint's
    config read as attributes): the model and its sizes, and every :class:`IBOTSettings`
    field the run sets under the same name (the iBOT flags, ``weight_decay``, ``strategy``,
    ``mask_ratio``, ``strategy_options``, ``saliency_source``, the local crops); an older run
    that lacks one gets iBOT's default. The same keywords give the loader's fields
    (:func:`ibot_loader_fields`)."""
    held = {
        f.name: getattr(run, f.name)
        for f in fields(IBOTSettings)
        if getattr(run, f.name, None) is not None
    }
    if "strategy_options" in held:
        held["strategy_options"] = dict(held["strategy_options"])
    return {"name": run.model, "image_size": run.image_size, "patch_size": run.patch_size, **held}


def ibot_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> IBOTHooks:
    return IBOTHooks(model, optimizer)


def clip_per_parameter(model: nn.Module, max_norm: float | None) -> float:
    """DINO's and iBOT's ``utils.clip_gradients``: each parameter's gradient scaled down to norm
    ``max_norm`` on its own (not the global norm torch clips). Returns the global norm before
    clipping, for the step's record. No host sync but the one of that number."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = [g.detach().norm(2) for g in grads]
    if max_norm:
        for grad, norm in zip(grads, norms):
            grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))  # 1.0: unchanged, exactly
    return torch.stack(norms).norm(2).item()


def ibot_loader_fields(settings: Any) -> dict:
    """The ``LoaderConfig`` fields of iBOT's batches: multi-crop ``views`` (``MultiCrop``'s
    defaults unless ``settings`` sets ``local_crops``, ``local_size`` or ``local_scale``);
    masks are left to the step (``masks_online``) when ``saliency_source`` is ``"online"``
    (the default) and the strategy reads maps. ``settings``: a mapping or an object."""
    read = settings.get if isinstance(settings, Mapping) else lambda k, d: getattr(settings, k, d)
    fields = {k: read(k, None) for k in ("local_crops", "local_size", "local_scale")}
    online = read("saliency_source", "online") == "online"
    strategy = read("strategy", IBOTSettings.strategy)
    masks_online = online and strategy in NEEDS_SALIENCY
    views = MultiCrop(
        **{k: tuple(v) if k == "local_scale" else v for k, v in fields.items() if v is not None},
        masks_online=masks_online,
    )
    return {"views": views}
