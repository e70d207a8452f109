"""What one eval worker runs: read a shard, decode it, take MAE's evaluation view, encode, write.

``salient.jobs.eval.driver`` runs :class:`FeatureWorker` as Ray actors through
``salient.jobs.runtime.shard_pool`` (the pool refresh uses); shards are read and decoded by
``salient.pipeline.shards`` (as refresh and the loader read them). The unit of work is one
shard of the training or the held-out dataset, whose features are written as one whole zarr
chunk of the feature cache (``salient.jobs.eval.cache``). The same functions compute
features in-process for the probe during training (``salient.jobs.eval.online``).

The evaluation view is MAE's (``main_linprobe.py``, from DeiT): resize the shorter side to
``int(S / crop_ratio)`` (bicubic, antialiased), then a centre crop of ``S × S`` — 256 → 224 at
S = 224 with ``salient.jobs.eval.config.EVAL_CROP_RATIO`` (0.875). ``crop_ratio = 1`` resizes the
shorter side to S and crops the centre square.
Features, from the encoder's final norm (timm ``forward_features``): the CLS token, and the
mean of the patch tokens (register tokens excluded).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from salient import urls
from salient.jobs.eval.cache import FeatureCache
from salient.jobs.runtime.progress import plain_warnings, process_heartbeat
from salient.jobs.runtime.shard_pool import ActorInputs
from salient.pipeline import shards
from salient.pipeline.manifest import ShardSource

__all__ = [
    "FeatureSpec",
    "FeatureWorker",
    "encode",
    "eval_batch",
    "eval_crop",
    "read_shard_images",
    "shard_features",
]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything a feature worker needs besides the model; picklable."""

    inputs: ActorInputs
    crop_ratio: float


# ---------------------------------------------------------------- reading


def read_shard_images(
    source: ShardSource,
    device: torch.device,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor | None], np.ndarray]:
    """One shard's images decoded on ``device`` (``uint8 [3,H,W]``, None = unreadable; or each
    image's ``view``, taken as soon as it is decoded, so a shard is held as views, never as
    full-size images) and its labels ``[count]`` (-1 = none; from ``cls`` or the ``json`` key
    the manifest names), in one pass over the tar, read through the dataset's ``source`` (ids
    by position, bytes checked against the manifest).

    Read and decoded by ``salient.pipeline.shards``, the layer refresh and the loader use (PIL,
    or nvjpeg on a GPU worker): the probe sees the pixels the teacher sees.
    """

    first_id, count = source.shard.first_id, source.shard.count
    records: list[tuple[str, bytes] | None] = [None] * count
    labels = np.full(count, -1, dtype=np.int64)
    ids = range(first_id, first_id + count)
    fields = {"image", "cls" if source.label_key is None else "json"}
    damaged = shards.warn_damaged(source.url, "its unread samples are left out")
    for sample in shards.iter_samples(source, ids, fields, damaged):
        offset = sample["id"] - first_id
        field = shards.image_field(sample)
        if field is not None:
            records[offset] = (field, sample[field])
        labels[offset] = shards.label_of(sample, source.label_key, source.classes)
    return shards.decode_images(records, device, view), labels


# ---------------------------------------------------------------- the view and the features


def eval_crop(image: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """MAE's evaluation crop of one ``uint8 [3,H,W]`` image -> ``uint8 [3,S,S]`` (the view of
    :func:`read_shard_images`)."""
    size = spec.inputs.image_size
    shorter = int(size / spec.crop_ratio)  # 224 / 0.875 = 256
    image = F.resize(image, [shorter], InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(image, [size, size])


def eval_batch(crops: list[torch.Tensor], spec: FeatureSpec) -> torch.Tensor:
    """Evaluation crops (:func:`eval_crop`) -> the encoder's input ``[B,3,S,S]`` float,
    normalised."""
    x = torch.stack(crops).float() / 255  # [B,3,S,S] in [0, 1]
    mean = torch.tensor(spec.inputs.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.inputs.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; off on CPU, so CPU features are exact fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def encode(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B,3,S,S]`` -> ``(cls [B,D], mean [B,D])`` float32: the CLS token and the mean patch
    token after the encoder's final norm (timm ``forward_features``)."""
    with _autocast(x.device):
        tokens = model.forward_features(x)  # [B, prefix + N, D], normed
    cls = tokens[:, 0]
    patches = tokens[:, model.num_prefix_tokens :]  # [B, N, D]
    return cls.float(), patches.float().mean(1)


def shard_features(
    model, crops: list[torch.Tensor | None], spec: FeatureSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cls [n,D], mean [n,D]) float32`` (NaN rows where the image is unreadable) and
    ``valid [n] uint8`` for one shard's evaluation crops (:func:`read_shard_images` with
    :func:`eval_crop` as its view), in batches of ``spec.inputs.batch_size``."""
    n, dim = len(crops), model.embed_dim
    cls = np.full((n, dim), np.nan, dtype=np.float32)
    mean = np.full((n, dim), np.nan, dtype=np.float32)
    valid = np.zeros(n, dtype=np.uint8)
    for start in range(0, n, spec.inputs.batch_size):
        rows = [
            start + i
            for i, crop in enumerate(crops[start : start + spec.inputs.batch_size])
            if crop is not None
        ]
        if not rows:
            continue
        batch_cls, batch_mean = encode(model, eval_batch([crops[r] for r in rows], spec))
        cls[rows], mean[rows] = batch_cls.cpu().numpy(), batch_mean.cpu().numpy()
        valid[rows] = 1
    return cls, mean, valid


# ---------------------------------------------------------------- the actor


class FeatureWorker:
    """Holds the encoder (loaded once); computes and caches one shard's features per call.

    ``caches`` maps a split name ("train", "val") to its feature cache URL; ``model`` is the
    encoder as the driver loaded it (Ray ships it through the object store).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: FeatureSpec,
        caches: dict[str, str],
        storage=None,
    ):
        urls.adopt(storage)  # the driver's --storage-option values, before any read
        plain_warnings("eval")  # printed through Ray on the driver's console
        process_heartbeat("eval")  # a line while a read waits on storage
        torch.set_num_threads(spec.inputs.threads)
        self.spec = spec
        self.view = functools.partial(eval_crop, spec=spec)  # a shard held as crops
        self.device = torch.device(spec.inputs.device)
        self.model = model.to(self.device).eval()
        self.caches = {split: FeatureCache.open(url) for split, url in caches.items()}

    def compute_shard(self, split: str, shard: int, source: ShardSource) -> dict:
        """Read, decode, encode and cache shard ``shard`` of ``split``; returns its counts."""
        start = time.perf_counter()
        count = source.shard.count
        crops, labels = read_shard_images(source, self.device, self.view)
        cls, mean, valid = shard_features(self.model, crops, self.spec)
        self.caches[split].write_shard(shard, cls, mean, labels, valid)
        return {
            "split": split,
            "shard": shard,
            "images": count,
            "invalid": int(count - valid.sum()),
            "seconds": time.perf_counter() - start,
            "pid": os.getpid(),
        }
