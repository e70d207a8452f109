"""The label-aware teacher of ``salient compare``: a ViT trained on the dataset's labels.

Its attention is trained to find what tells the classes apart — on the demo set, the object —
so its CLS-attention maps say where the objects are: what a self-teacher's maps should say
once the model has learnt. It sees what refresh shows a teacher: the whole image squashed to
S×S (``salient.trainer.teacher.preprocess``), here with horizontal flips; AdamW (lr 1e-3, weight
decay 0.05), batch 64, one epoch of linear warmup then cosine, for ``epochs`` epochs or until
its held-out top-1 reaches ``target``. The images are decoded and squashed once and kept in
memory as one uint8 tensor (2,000 × 3 × 64 × 64: 25 MB; 20,000 at 224 px: 3 GB), normalised
a batch at a time on the training device (``device``: a GPU where the comparison has one), so
an epoch is forward and backward passes only. Saved as a checkpoint ``load_teacher`` reads
(``encoder_kwargs`` + ``encoder``; its classifier head is dropped on load). Where its time
goes is part of its summary: decoding (``decode_s``), training (``train_s``, and per epoch)
and the held-out probe after each epoch (``eval_s``), with the process's CPU seconds beside
the wall seconds (on a shared machine the two differ).
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from salient.jobs.eval.worker import read_shard_images
from salient.pipeline.manifest import open_dataset
from salient.trainer.models import encoder_kwargs_for
from salient.trainer.schedules import WarmupCosine
from salient.trainer.specs import MODELS
from salient.trainer.teacher import preprocess

__all__ = ["train_label_teacher"]


def _squashed(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """The refresh's view (whole image squashed to S, antialiased bilinear), kept as uint8."""
    x = nn.functional.interpolate(
        image[None].float(), size=(image_size, image_size), mode="bilinear", antialias=True
    )
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _normalised(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[b,3,S,S]`` -> the teacher's input on ``device`` (``preprocess``'s normalisation)."""
    return preprocess(x.to(device), x.shape[-1])


def _images(data: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoded, labelled image of a dataset, squashed to S×S, uint8."""

    dataset = open_dataset(data)
    xs, ys = [], []
    for shard in dataset.shards:
        view = functools.partial(_squashed, image_size=image_size)  # views, not full images
        images, labels = read_shard_images(dataset.source(shard), torch.device("cpu"), view)
        keep = [i for i, image in enumerate(images) if image is not None and labels[i] >= 0]
        xs.append(torch.stack([images[i] for i in keep]))
        ys.append(torch.as_tensor(labels[keep]))
    return torch.cat(xs), torch.cat(ys)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(
            (model(_normalised(x[i : i + 256], device)).argmax(1).cpu() == y[i : i + 256])
            .sum()
            .item()
            for i in range(0, len(x), 256)
        )
    model.train()
    return hits / len(y)


def _epoch(net, optimizer, schedule, x, y, batch_size: int, epoch: int, generator, device) -> None:
    """One epoch over ``x [n, 3, S, S]`` in a seeded order, each image flipped with p 1/2."""
    steps = math.ceil(len(x) / batch_size)
    order = torch.randperm(len(x), generator=generator)
    for step, first in enumerate(range(0, len(x), batch_size)):
        idx = order[first : first + batch_size]
        flip = torch.rand(len(idx), generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), x[idx].flip(-1), x[idx])
        schedule.apply(optimizer, epoch * steps + step)
        loss = nn.functional.cross_entropy(net(_normalised(batch, device)), y[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_label_teacher(
    data: str,
    val: str,
    path: str | os.PathLike,
    model: str,
    image_size: int,
    patch_size: int,
    epochs: int = 8,
    target: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Train the teacher (the encoder of ``model``'s size) on ``device``, save it at ``path``;
    returns its held-out top-1 after each epoch and the time each part took (module
    docstring). ``target``: stop once the held-out top-1 reaches it (None: every epoch)."""
    start, cpu = time.perf_counter(), time.process_time()
    classes = len(open_dataset(data).manifest.classes)
    (x, y), (vx, vy) = _images(data, image_size), _images(val, image_size)
    decode_s = time.perf_counter() - start
    kwargs = encoder_kwargs_for(MODELS[model], image_size, patch_size)
    torch.manual_seed(seed)
    device = torch.device(device)
    net = VisionTransformer(**{**kwargs, "num_classes": classes}).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = math.ceil(len(x) / batch_size)
    schedule = WarmupCosine(lr, epochs * steps, steps)
    generator = torch.Generator().manual_seed(seed)
    accuracy, epoch_s, eval_s = [], [], 0.0
    for epoch in range(epochs):
        tick = time.perf_counter()
        _epoch(net, optimizer, schedule, x, y, batch_size, epoch, generator, device)
        epoch_s.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        accuracy.append(round(_accuracy(net, vx, vy, device), 4))
        eval_s += time.perf_counter() - tick
        if target is not None and accuracy[-1] >= target:
            break
    done = len(accuracy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": "salient-checkpoint/1",
            "config": {"model": f"label-teacher-{model}"},
            "encoder_kwargs": kwargs,
            "encoder": {k: v.cpu() for k, v in net.state_dict().items()},
            "epoch": done,
        },
        path,
    )
    return {
        "val_top1": accuracy[-1],
        "val_top1_per_epoch": accuracy,
        "epochs": done,
        "images": len(x),
        "seconds": round(time.perf_counter() - start, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "decode_s": round(decode_s, 3),
        "train_s": round(sum(epoch_s), 3),
        "epoch_s": [round(e, 3) for e in epoch_s],
        "eval_s": round(eval_s, 3),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
