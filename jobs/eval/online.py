"""The k-NN probe during training: ``salient train --val VAL --eval-every K``.

Rank 0 runs it right after writing the checkpoint of an epoch that is due (every ``K`` epochs,
and after the last one): the features of every image of the training set (the k-NN memory)
and of the held-out set, from the current encoder in eval mode, in-process on rank 0's device
with the functions ``salient eval`` uses (same shard reading and decoding, same view, same
features, same probe), then DINO's weighted k-NN on the CLS token and on the mean patch
token. The other ranks wait at the next epoch's first collective for as long as that takes —
the forward passes of both sets, no training — so the probe is meant for the small sets
whose probe costs seconds; larger sets are evaluated from the checkpoints with ``salient
eval`` on Ray instead (README, Decisions).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from salient.jobs.eval.config import EVAL_CROP_RATIO
from salient.jobs.eval.worker import FeatureSpec, eval_crop, read_shard_images, shard_features
from salient.jobs.runtime.shard_pool import ActorInputs
from salient.pipeline.manifest import open_dataset
from salient.trainer.probes import KNN_K, KNN_TEMPERATURE, knn_probe

__all__ = ["OnlineProbe"]


@dataclass(frozen=True)
class OnlineProbe:
    """What rank 0 needs to probe the encoder; picklable, built from a ``TrainConfig``."""

    data: str
    val: str
    every: int
    epochs: int
    image_size: int
    batch_size: int

    @classmethod
    def for_config(cls, config) -> OnlineProbe | None:
        """The probe of a train config, or None when it has no ``val``."""
        if not config.val:
            return None
        return cls(
            data=config.data,
            val=config.val,
            every=config.eval_every,
            epochs=config.epochs,
            image_size=config.image_size,
            batch_size=max(config.batch_size, 64),
        )

    def due(self, epochs_done: int) -> bool:
        """Every ``every`` epochs (0: never on the way) and after the last epoch."""
        return epochs_done == self.epochs or (self.every > 0 and epochs_done % self.every == 0)

    def run(self, encoder: torch.nn.Module, device: torch.device, epochs_done: int) -> dict:
        """The probe's ``metrics.jsonl`` record for ``encoder`` (a timm ViT, left as found)."""

        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            train, val = (self._features(encoder, url, device) for url in (self.data, self.val))
        finally:
            encoder.train(was_training)
        classes = len(open_dataset(self.data).manifest.classes)
        knn = {
            kind: knn_probe(train[kind], train["labels"], val[kind], val["labels"], classes)
            for kind in ("cls", "mean")
        }
        return {
            "kind": "eval",
            "epochs_done": epochs_done,
            "knn": knn,
            "k": KNN_K,
            "temperature": KNN_TEMPERATURE,
            "images": {"train": len(train["labels"]), "val": len(val["labels"])},
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _features(self, encoder, url: str, device: torch.device) -> dict:
        """Features of every usable image (decoded and labelled) of the dataset at ``url``."""
        inputs = ActorInputs(
            self.image_size,
            self.batch_size,
            IMAGENET_DEFAULT_MEAN,  # the loader's normalisation (pipeline.loader)
            IMAGENET_DEFAULT_STD,
            device=str(device),
        )
        spec = FeatureSpec(inputs, EVAL_CROP_RATIO)
        dataset = open_dataset(url)
        parts: dict[str, list] = {"cls": [], "mean": [], "labels": []}
        for shard in dataset.shards:
            view = functools.partial(eval_crop, spec=spec)  # a shard held as crops
            crops, labels = read_shard_images(dataset.source(shard), device, view)
            cls, mean, valid = shard_features(encoder, crops, spec)
            keep = (valid == 1) & (labels >= 0)
            for name, rows in (("cls", cls), ("mean", mean), ("labels", labels)):
                parts[name].append(rows[keep])
        return {name: torch.from_numpy(np.concatenate(rows)) for name, rows in parts.items()}
