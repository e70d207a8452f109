"""The dataset side of ``salient inspect``: samples and demo boxes read back from tar shards
(through ``salient.pipeline.shards``, so a dataset on object storage works as a local one).

:mod:`salient.jobs.inspect.driver` pairs these with the store's maps. Each function makes one pass
over a shard and keeps only the ids and fields asked for, so statistics over a whole dataset
never hold more than one shard's boxes.

:class:`InspectError` lives here, the lowest layer of the job, so that this module and
:mod:`salient.jobs.inspect.driver` (which re-exports it) raise the same class without an
import cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from salient.jobs.inspect.config import InspectError
from salient.pipeline import shards

__all__ = ["Sample", "demo_hw", "read_samples", "shard_boxes"]


@dataclass(frozen=True)
class Sample:
    """One sample read back from its shard for a panel."""

    sample_id: int
    image: object  # PIL.Image RGB (None when read without images)
    label: int | None
    box: tuple[float, float, float, float] | None


def demo_hw(dataset) -> tuple[int, int] | None:
    """Image (H, W) of a demo dataset (scenes are square), None for other datasets."""
    demo = dataset.manifest.demo
    return (int(demo["image_size"]),) * 2 if demo and demo.get("image_size") else None


def shard_boxes(dataset, shard) -> np.ndarray:
    """Object boxes of one demo shard: ``[count, 4]`` (x0, y0, x1, y1 px), NaN where absent."""
    boxes = np.full((shard.count, 4), np.nan)
    ids = range(shard.first_id, shard.stop_id)
    for rec in shards.iter_samples(dataset.source(shard), ids, {"box.json"}):
        if "box.json" in rec:
            box = json.loads(rec["box.json"])
            boxes[rec["id"] - shard.first_id] = [box["x0"], box["y0"], box["x1"], box["y1"]]
    return boxes


def read_samples(dataset, ids: list[int], images: bool = True) -> dict[int, Sample]:
    """Image, label and box of each id (in the order of ``ids``), one pass over each shard
    that holds some of them, read through the dataset's sources (ids by position, labels where
    its manifest says, bytes checked). ``images=False``: label and box only (``image`` None).

    Raises:
        DatasetError: an id no sample holds (a gap after a short shard, or past the end).
        InspectError: a sample that has no readable image (``images``).
    """
    from PIL import Image

    by_shard: dict[int, set[int]] = {}
    for sample_id in ids:
        by_shard.setdefault(dataset.shard_of(sample_id).index, set()).add(sample_id)
    samples = {}
    for index, wanted in sorted(by_shard.items()):
        source = dataset.source(dataset.shards[index])
        fields = {"box.json", "cls" if source.label_key is None else "json"}
        fields |= {"image"} if images else set()
        for rec in shards.iter_samples(source, wanted, fields):
            pixels = shards.decode_image(rec.get(shards.image_field(rec), b"")) if images else None
            if images and pixels is None:
                raise InspectError(
                    f"sample {rec['id']} ({rec['__key__']}) has no readable image in "
                    f"{source.shard.name} (the manifest lists such samples as skipped); pick "
                    "another id"
                )
            box = json.loads(rec["box.json"]) if "box.json" in rec else None
            label = shards.label_of(rec, source.label_key, source.classes)
            samples[rec["id"]] = Sample(
                rec["id"],
                None if pixels is None else Image.fromarray(pixels),
                None if label < 0 else label,
                tuple(float(box[k]) for k in ("x0", "y0", "x1", "y1")) if box else None,
            )
    return {sample_id: samples[sample_id] for sample_id in ids}  # in the order asked
