"""The dataset side of ``salient inspect``: samples and demo boxes read back from tar shards.

:mod:`salient.jobs.inspect` pairs these with the store's maps. Each function makes one pass
over a shard and keeps only the ids and fields asked for, so statistics over a whole dataset
never hold more than one shard's boxes.

:class:`InspectError` lives here, the lowest layer of the job, so that this module and
:mod:`salient.jobs.inspect` (which re-exports it) raise the same class without an import cycle.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

from salient.errors import SalientError

__all__ = ["InspectError", "Sample", "demo_hw", "read_samples", "shard_boxes"]

_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}


class InspectError(SalientError):
    """Bad inspect input: unknown or unpublished generation, ids out of range, bad options."""


@dataclass(frozen=True)
class Sample:
    """One sample read back from its shard for a panel."""

    sample_id: int
    image: object  # PIL.Image RGB
    label: int | None
    box: tuple[float, float, float, float] | None


def demo_hw(dataset) -> tuple[int, int] | None:
    """Image (H, W) of a demo dataset (scenes are square), None for other datasets."""
    demo = dataset.manifest.demo
    return (int(demo["image_size"]),) * 2 if demo and demo.get("image_size") else None


def _shard_records(dataset, shard, wanted: set[int] | None, fields: set[str]) -> dict:
    """``{id: {field: bytes}}`` of one tar shard for the ``wanted`` ids (None: all) and
    ``fields`` (``"image"`` stands for the sample's image, whatever its extension)."""
    records: dict[int, dict[str, bytes]] = {}
    with tarfile.open(dataset.shard_url(shard)) as tar:
        for member in tar:
            key, _, name = member.name.partition(".")
            if not member.isfile() or not key.isdigit():
                continue
            if wanted is not None and int(key) not in wanted:
                continue
            if name in fields or ("image" in fields and name in _IMAGE_EXTS):
                records.setdefault(int(key), {})[name] = tar.extractfile(member).read()
    return records


def shard_boxes(dataset, shard) -> np.ndarray:
    """Object boxes of one demo shard: ``[count, 4]`` (x0, y0, x1, y1 px), NaN where absent."""
    boxes = np.full((shard.count, 4), np.nan)
    for sample_id, rec in _shard_records(dataset, shard, None, {"box.json"}).items():
        if "box.json" in rec:
            box = json.loads(rec["box.json"])
            boxes[sample_id - shard.first_id] = [box["x0"], box["y0"], box["x1"], box["y1"]]
    return boxes


def read_samples(dataset, ids: list[int]) -> dict[int, Sample]:
    """Image, label and box of each id (in the order of ``ids``), one pass over each shard
    that holds some of them.

    Raises:
        InspectError: a sample's record in its shard has no image.
    """
    from PIL import Image

    by_shard: dict[int, set[int]] = {}
    for sample_id in ids:
        by_shard.setdefault(dataset.shard_of(sample_id).index, set()).add(sample_id)
    samples = {}
    for index, wanted in sorted(by_shard.items()):
        for sample_id, rec in _shard_records(
            dataset, dataset.shards[index], wanted, {"image", "cls", "box.json"}
        ).items():
            data = next((rec[k] for k in rec if k in _IMAGE_EXTS), None)
            if data is None:
                raise InspectError(
                    f"sample {sample_id} has no image in "
                    f"{dataset.shards[index].name}; re-run `salient ingest`"
                )
            box = json.loads(rec["box.json"]) if "box.json" in rec else None
            samples[sample_id] = Sample(
                sample_id,
                Image.open(io.BytesIO(data)).convert("RGB"),
                int(rec["cls"]) if "cls" in rec else None,
                tuple(float(box[k]) for k in ("x0", "y0", "x1", "y1")) if box else None,
            )
    return {sample_id: samples[sample_id] for sample_id in ids}  # in the order asked
