"""iBOT's loss: DINO's distillation of the [CLS] token plus the masked patches' distillation.

Written after iBOT's ``main_ibot.py`` ``iBOTLoss`` (AttMask's ``main_attmask.py`` holds the same
class); docs/ARCHITECTURE.md, "Trainer families". With ``G`` global views, ``V`` views in all
(globals first, then the local ones) and ``B`` images:

- **[CLS]** (λ1): for every teacher global view q and every student view v ≠ q, the
  cross-entropy ``−Σ_k t_q log s_v`` averaged over the images; the mean of the ``G·V − G``
  pairs (:func:`cls_distillation`).
- **Patches** (λ2): for each global view, the teacher's patch distribution on the *unmasked*
  view against the student's on the *masked* one, only at the masked positions: each image's
  mean over its masked patches (0 when none is masked), averaged over the ``G·B`` images
  (:func:`masked_patch_distillation`; iBOT ``loss2.sum / mask.sum.clamp(min=1)``, then
  ``.mean()`` over the batch, then over the views).
- The teacher's outputs are centred and sharpened: ``softmax((t − c) / τ_t)``; the student's
  ``log_softmax(s / τ_s)``. The centres follow the teacher with momentum 0.9, all-reduced over
  the ranks (:class:`Centers`); τ_t warms up linearly over the first epochs
  (:func:`teacher_temperature`).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Centers",
    "cls_distillation",
    "masked_patch_distillation",
    "student_log_probs",
    "teacher_targets",
    "teacher_temperature",
]


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """The teacher's temperature in ``epoch``: ``np.linspace(warmup, final, warmup_epochs)``
    for the first ``warmup_epochs`` epochs, then ``final`` (iBOT ``iBOTLoss.__init__``:
    ``teacher_temp_schedule``, indexed by epoch; the same law for the patch temperature)."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup, final, warmup_epochs)[epoch])
    return float(final)


def cls_distillation(teacher_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """DINO's [CLS] loss: ``teacher_probs [G, B, K]`` (centred, sharpened) against
    ``student_log_probs [V, B, K]`` whose first G views are the same global views; the mean
    over the pairs q ≠ v of the images' mean cross-entropy. A scalar."""
    globals_, batch = teacher_probs.shape[:2]
    views = student_log_probs.shape[0]
    # [G, V]: pair (q, v)'s cross-entropy summed over the images, one matrix product
    cross = -torch.einsum("qbk,vbk->qv", teacher_probs, student_log_probs) / batch
    same = torch.eye(globals_, views, dtype=torch.bool, device=cross.device)  # v == q
    return cross[~same].mean()


def masked_patch_distillation(
    teacher_probs: Tensor, student_log_probs: Tensor, rows: Tensor, num_rows: int
) -> Tensor:
    """iBOT's patch loss from the masked tokens only: ``teacher_probs [R, K]`` and
    ``student_log_probs [R, K]`` at the R masked positions, ``rows [R]`` the image-view row
    (``0 .. num_rows − 1``) each belongs to. Each row's mean cross-entropy over its masked
    tokens (0 for a row without any), averaged over all ``num_rows`` rows. A scalar."""
    cross = -(teacher_probs * student_log_probs).sum(-1)  # [R]
    per_row = cross.new_zeros(num_rows).index_add(0, rows, cross)  # [G·B]
    count = torch.bincount(rows, minlength=num_rows).clamp_min(1)  # iBOT: clamp(min=1.0)
    return (per_row / count).mean()


class Centers(nn.Module):
    """The teacher's centres for [CLS] and patch outputs: buffers ``cls [1, K]``, ``patch
    [1, K]`` (iBOT ``iBOTLoss``: ``center``, ``center2``), in the model's state dict."""

    def __init__(self, dim: int, momentum: float = 0.9, patch_momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum, self.patch_momentum = float(momentum), float(patch_momentum)
        self.register_buffer("cls", torch.zeros(1, dim))
        self.register_buffer("patch", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_cls: Tensor, teacher_patch_mean: Tensor) -> None:
        """``c ← m·c + (1 − m)·mean``: the batch mean of the teacher's raw [CLS] outputs
        ``[R, K]`` and of each image-view's mean patch output ``[R, K]``, over every rank
        (iBOT ``update_center``: ``dist.all_reduce`` of the sums, divided by R × world)."""
        sums = torch.stack([teacher_cls.float().sum(0), teacher_patch_mean.float().sum(0)])
        count = teacher_cls.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # one all-reduce for both centres
            count *= dist.get_world_size()
        means = sums / count  # [2, K]
        self.cls.mul_(self.momentum).add_(means[0], alpha=1.0 - self.momentum)
        self.patch.mul_(self.patch_momentum).add_(means[1], alpha=1.0 - self.patch_momentum)


def teacher_targets(logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """The teacher's centred, sharpened distribution ``softmax((t − c) / τ_t)``, fp32."""
    return F.softmax((logits.float() - center) / temperature, dim=-1)


def student_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """The student's ``log_softmax(s / τ_s)``, fp32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)
