"""A label-aware teacher for ``salient bench quality``: a ViT trained on the demo labels.

Its attention is trained to find the object (the only thing that tells the classes apart), so
its CLS-attention maps say where the objects are — what a self-teacher's maps should say
once the model has learnt. It sees what refresh shows a teacher: the whole image squashed to
S×S (``salient.trainer.teacher.preprocess``), here with horizontal flips; AdamW, cosine
schedule, until its held-out top-1 reaches ``target`` or ``epochs`` run out. Saved as a
checkpoint ``load_teacher`` reads (``encoder_kwargs`` + ``encoder``; its classifier head is
dropped on load).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from salient.jobs.eval.worker import read_shard_images
from salient.pipeline.manifest import open_dataset
from salient.trainer.loop import WarmupCosine
from salient.trainer.models import MODELS, encoder_kwargs_for
from salient.trainer.teacher import preprocess

__all__ = ["train_label_teacher"]


def _images(data: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoded, labelled image of a dataset, squashed to S×S and normalised."""

    dataset = open_dataset(data)
    xs, ys = [], []
    for shard in dataset.shards:
        images, labels = read_shard_images(dataset.source(shard), torch.device("cpu"))
        keep = [i for i, image in enumerate(images) if image is not None and labels[i] >= 0]
        xs.append(preprocess([images[i] for i in keep], image_size))
        ys.append(torch.as_tensor(labels[keep]))
    return torch.cat(xs), torch.cat(ys)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(
            (model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum().item()
            for i in range(0, len(x), 256)
        )
    model.train()
    return hits / len(y)


def train_label_teacher(
    data: str,
    val: str,
    path: str | os.PathLike,
    model: str,
    image_size: int,
    patch_size: int,
    epochs: int = 60,
    target: float = 0.97,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Train the teacher, save it at ``path``; returns its held-out top-1, epochs and seconds."""
    from timm.models.vision_transformer import VisionTransformer

    start = time.perf_counter()
    classes = len(open_dataset(data).manifest.classes)
    (x, y), (vx, vy) = _images(data, image_size), _images(val, image_size)
    kwargs = encoder_kwargs_for(MODELS[model], image_size, patch_size)
    torch.manual_seed(seed)
    net = VisionTransformer(**{**kwargs, "num_classes": classes})
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = math.ceil(len(x) / batch_size)
    schedule = WarmupCosine(lr, epochs * steps, 2 * steps)
    generator = torch.Generator().manual_seed(seed)
    accuracy, done = 0.0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for step, first in enumerate(range(0, len(x), batch_size)):
            idx = order[first : first + batch_size]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), x[idx].flip(-1), x[idx])
            schedule.apply(optimizer, epoch * steps + step)
            loss = nn.functional.cross_entropy(net(batch), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        done, accuracy = epoch + 1, _accuracy(net, vx, vy)
        if accuracy >= target:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": "salient-checkpoint/1",
            "config": {"model": f"label-teacher-{model}"},
            "encoder_kwargs": kwargs,
            "encoder": net.state_dict(),
            "epoch": done,
        },
        path,
    )
    return {
        "val_top1": round(accuracy, 4),
        "epochs": done,
        "seconds": round(time.perf_counter() - start, 1),
    }
