"""The training loop: the optimiser, the per-step learning rate, and one epoch of steps.

Plain PyTorch, no Ray: ``salient.jobs.train.worker`` runs it inside Ray Train's workers
(DDP over gloo on CPU, nccl on GPU), and ``salient.jobs.bench.train`` times it in one
process. A step is written in the order the hardware runs it (nanoGPT's shape, MAE's
``engine_pretrain.train_one_epoch``): lr, forward, backward, clip, step, log.

Settings follow MAE (He et al. 2022, its ``main_pretrain.py``): AdamW with betas
(0.9, 0.95), weight decay 0.05 except on biases and norm weights, a learning rate set every
step (linear warmup, then half-cycle cosine to ``min_lr``). bf16 autocast on CUDA only; on
CPU the autocast context is a ``nullcontext`` and everything runs in float32.

Gradient accumulation (MAE's ``accum_iter``): one optimiser step per ``accum_iter``
batches, each batch's loss divided by ``accum_iter``, the lr set at the first batch of each
step; under DDP the gradients are all-reduced on the last batch of a step only
(``no_sync``). A step indexes the lr schedule, so an epoch has ``len(loader) // accum_iter``
steps; the batches after the epoch's last full step are trained on but their gradients are
dropped, as MAE's loop drops them (it zeroes the gradients when the next epoch starts).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from salient.trainer.family import FAMILIES, Family
from salient.trainer.schedules import WarmupCosine
from salient.trainer.specs import TrainError
from salient.trainer.steps import Progress, StepHooks, sync_if

__all__ = [
    "autocast_for",
    "build_optimizer",
    "param_checksum",
    "train_one_epoch",
]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW as MAE builds it: no decay on biases and 1-D (norm) weights; frozen params skipped."""
    groups = param_groups_weight_decay(model, weight_decay)  # MAE: optim_factory.add_weight_decay
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def autocast_for(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA when asked; a ``nullcontext`` on CPU (autocast stays off there)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def param_checksum(model: nn.Module) -> float:
    """The sum of every parameter in float64: equal on every DDP rank after each step."""
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()


def _clip(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm (when ``max_norm``); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
    return norm.item()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    batches: Iterable[dict],
    *,
    epoch: int,
    step: int,
    device: torch.device,
    bf16: bool = False,
    clip_grad: float | None = None,
    accum_iter: int = 1,
    on_step: Callable[[dict, dict], None] | None = None,
    family: Family = FAMILIES["mae"],
    hooks: StepHooks | None = None,
    steps_per_epoch: int = 0,
) -> dict:
    """Train on every batch of ``batches`` (loader batches: docs/ARCHITECTURE.md, "Loader").

    ``step`` is the global optimiser-step count before this epoch; it indexes the learning
    rate. One step per ``accum_iter`` batches (module docstring). ``family`` runs the model on
    a batch (``salient.trainer.family``; MAE's and SimMIM's by default) and ``hooks`` are its
    per-step work (schedules, an EMA update, a side optimiser; ``steps_per_epoch`` tells them
    where a step stands). ``on_step(record, batch)`` gets each step's metrics (``step``,
    ``lr``, ``loss``, ``grad_norm``, ``images``, ``img_per_s``, ``with_saliency``,
    ``generation``, and the family's own scalars) after the optimiser step, with the step's
    ``ids`` / ``has_saliency`` / ``generation`` as ``batch``. Returns this process's epoch
    totals: ``epoch``, ``steps``, ``step`` (the global count after the epoch), ``images``,
    ``loss_sum`` (per-batch losses × batch size), ``scalar_sums`` (the family's scalars, each
    × its step's images), ``with_saliency``, ``seconds``, ``generation`` (of the last batch);
    dropped batches (after the last full step) are not counted.

    Raises:
        TrainError: a loss that is not finite (lower the learning rate, check the data).
    """
    hooks = hooks or StepHooks()
    model.train()
    totals = {
        "epoch": epoch,
        "steps": 0,
        "images": 0,
        "loss_sum": 0.0,
        "scalar_sums": {},
        "with_saliency": 0,
        "generation": None,
    }
    optimizer.zero_grad(set_to_none=True)
    group: list[tuple[dict, float, dict]] = []  # (batch, loss, metrics) of the step
    start = tick = time.perf_counter()
    for batch in batches:
        progress = Progress(step, schedule.total_steps, steps_per_epoch, epoch)
        if not group:
            lr = schedule.apply(optimizer, step)  # lr (MAE: at the first batch of a step)
            hooks.before_step(optimizer, progress)
        last = len(group) + 1 == accum_iter
        side = hooks.side_step(batch, last, progress)
        with sync_if(model, last):  # DDP all-reduces in the last batch's backward only
            with autocast_for(device, bf16):
                loss, metrics = family.forward(model, batch, device)  # forward
            (loss / accum_iter if accum_iter > 1 else loss).backward()  # backward
        scalars = {**side, **{k: float(v) for k, v in metrics.items()}}
        group.append((batch, _finite(loss.item(), step + 1, epoch), scalars))
        if not last:
            continue
        grad_norm = (family.clip or _clip)(model, clip_grad)  # clip
        hooks.before_optimizer_step(progress)
        optimizer.step()  # step
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(progress)
        step += 1
        now = time.perf_counter()  # log
        record, merged = _step_record(group, step, lr, grad_norm, now - tick)
        _accumulate(totals, record, group)
        group, tick = [], now
        if on_step is not None:
            on_step(record, merged)
    return {**totals, "step": step, "seconds": time.perf_counter() - start}


def _finite(loss: float, step: int, epoch: int) -> float:
    if not math.isfinite(loss):
        raise TrainError(
            f"loss is {loss} at step {step} (epoch {epoch}); lower --lr "
            "or check the data, then --resume from the last checkpoint"
        )
    return loss


def _step_record(
    group: list[tuple[dict, float, dict]], step: int, lr: float, grad_norm: float, seconds: float
) -> tuple[dict, dict]:
    """The step's record, and its batches merged (ids, has_saliency, generation)."""
    batches = [batch for batch, _, _ in group]
    sizes = [len(batch["ids"]) for batch in batches]
    images = sum(sizes)
    has_saliency = torch.cat([torch.as_tensor(b["has_saliency"]).cpu() for b in batches])
    merged = {
        "ids": torch.cat([torch.as_tensor(b["ids"]).cpu() for b in batches]),
        "has_saliency": has_saliency,
        "generation": batches[-1]["generation"],
    }
    if len(group) == 1:
        loss = group[0][1]  # exactly the batch's loss
    else:
        loss = sum(n * value for n, (_, value, _) in zip(sizes, group)) / images
    record = {
        "step": step,
        "lr": lr,
        "loss": loss,
        "grad_norm": grad_norm,
        "images": images,
        "img_per_s": images / max(seconds, 1e-9),
        "with_saliency": int(has_saliency.sum()),
        "generation": merged["generation"],
    }
    for key in group[0][2]:  # the family's scalars, weighted by batch size like the loss
        record[key] = sum(n * scalars[key] for n, (_, _, scalars) in zip(sizes, group)) / images
    return record, merged


def _accumulate(totals: dict, record: dict, group: list[tuple[dict, float, dict]]) -> None:
    totals["steps"] += 1
    totals["images"] += record["images"]
    totals["loss_sum"] += sum(len(batch["ids"]) * loss for batch, loss, _ in group)
    totals["with_saliency"] += record["with_saliency"]
    totals["generation"] = record["generation"]
    sums = totals["scalar_sums"]
    for key in group[0][2]:  # the family's scalars: epoch means weighted like the loss
        sums[key] = sums.get(key, 0.0) + record[key] * record["images"]
