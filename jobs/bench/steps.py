"""The step rate every training bench measures, written once: the real step
(``salient.trainer.loop.train_one_epoch``: lr, forward, backward, optimiser, the family's
hooks) over ``warmup + steps`` batches, timed by the step records after the warm-up."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from salient.trainer.family import FAMILIES, Family
from salient.trainer.loop import train_one_epoch
from salient.trainer.schedules import WarmupCosine

__all__ = ["step_rate"]


def step_rate(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict],
    *,
    lr: float,
    warmup: int,
    steps: int,
    batch_size: int,
    device: torch.device,
    family: Family = FAMILIES["mae"],
    hooks=None,
    clip_grad: float | None = None,
) -> float:
    """Images per second of ``steps`` steps after ``warmup`` untimed ones (bf16 on CUDA)."""
    seconds: list[float] = []
    total = warmup + steps
    train_one_epoch(
        model,
        optimizer,
        WarmupCosine(lr, total),
        itertools.islice(batches, total),
        epoch=0,
        step=0,
        device=device,
        bf16=True,
        clip_grad=clip_grad,
        on_step=lambda record, _: seconds.append(record["images"] / record["img_per_s"]),
        family=family,
        hooks=hooks,
        steps_per_epoch=total,
    )
    timed = seconds[warmup:]
    return batch_size * len(timed) / sum(timed)
