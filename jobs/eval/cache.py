"""The feature cache of ``salient eval``: one zarr group per (encoder, dataset, view).

``OUT/features/<digest>.zarr``, where ``digest`` hashes the cache key — the checkpoint's
sha256 and name, the dataset's fingerprint and manifest, the view (image size, crop ratio) and
the layout —
so a second eval of the same checkpoint on the same data reuses the features whatever its
probe settings. A group holds

- ``cls``, ``mean`` ``(N, D) float32``, fill NaN: the CLS token and the mean patch token;
  N is one past the dataset's last id (the ids an adopted dataset leaves unused after a short
  shard stay NaN with ``valid`` 0, so the probes drop them);
- ``labels (N,) int64`` (fill -1 = no label) and ``valid (N,) uint8`` (1 = image decoded);
- ``shards_done (num_shards,) uint8``, one chunk per marker: resume markers;

every per-sample array chunked by data shard (one shard = one chunk, written whole by the one
task that computed it, no sharding codec: the saliency store's layout, README "Shards and
chunks"). A shard's marker is written after its rows; the group attribute ``complete`` is set
by the driver alone, once every marker is, and only a complete cache is ever read. A cache
whose shards were not all written (a killed eval) resumes; one whose key or layout does not
match is deleted and redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import zarr

__all__ = ["FORMAT", "FeatureCache", "cache_url"]

FORMAT = "salient-features/1"


def cache_url(out: str | Path, key: dict) -> str:
    """Where the cache of ``key`` lives under ``out``: ``out/features/<digest>.zarr``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return str(Path(out) / "features" / f"{digest}.zarr")


def _layout(key: dict) -> dict[str, tuple[tuple, tuple, np.dtype, object]]:
    """name -> (shape, chunks, dtype, fill) of every array of a cache."""
    n, s, d = key["num_ids"], key["shard_size"], key["dim"]  # rows: one past the last id
    shards = -(-n // s)
    return {
        "cls": ((n, d), (s, d), np.dtype("float32"), np.nan),
        "mean": ((n, d), (s, d), np.dtype("float32"), np.nan),
        "labels": ((n,), (s,), np.dtype("int64"), -1),
        "valid": ((n,), (s,), np.dtype("uint8"), 0),
        "shards_done": ((shards,), (1,), np.dtype("uint8"), 0),
    }


class FeatureCache:
    """One cache group: ``write_shard`` from workers; the rest from the driver."""

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self.group = group
        self.key: dict = dict(group.attrs["key"])
        self.shard_size = self.key["shard_size"]

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, url: str) -> FeatureCache:
        return cls(url, zarr.open_group(url, mode="r+", use_consolidated=False))

    @classmethod
    def open_or_create(cls, url: str, key: dict) -> FeatureCache:
        """The cache of ``key`` at ``url``: resumed when it is one, else (re)created empty."""
        try:
            group = zarr.open_group(url, mode="r+", use_consolidated=False)
            if group.attrs.get("format") == FORMAT and dict(group.attrs.get("key", {})) == key:
                _check(group, key)
                return cls(url, group)
        except (OSError, KeyError, ValueError, TypeError, zarr.errors.BaseZarrError):
            pass  # absent or damaged: redone below
        shutil.rmtree(url, ignore_errors=True)
        return cls._create(url, key)

    @classmethod
    def _create(cls, url: str, key: dict) -> FeatureCache:
        group = zarr.open_group(url, mode="w", use_consolidated=False)
        for name, (shape, chunks, dtype, fill) in _layout(key).items():
            group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                fill_value=fill,
                **({} if name in ("cls", "mean") else {"compressors": None}),
            )
        group.attrs.update({"format": FORMAT, "key": key, "complete": False})
        return cls(url, group)

    # ---------------------------------------------------------------- writing

    def write_shard(
        self,
        shard: int,
        cls: np.ndarray,
        mean: np.ndarray,
        labels: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """The rows of data shard ``shard`` (whole chunks), then its resume marker."""
        start = shard * self.shard_size
        stop = start + len(valid)
        self.group["cls"][start:stop] = cls
        self.group["mean"][start:stop] = mean
        self.group["labels"][start:stop] = labels
        self.group["valid"][start:stop] = valid
        self.group["shards_done"][shard] = 1

    # ---------------------------------------------------------------- the driver

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def missing_shards(self) -> list[int]:
        return np.flatnonzero(self.group["shards_done"][:] == 0).tolist()

    def mark_complete(self) -> None:
        """Set ``complete`` (one attribute write) once every shard's marker is set."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"feature cache shards {missing[:5]} are not written")
        self.group.attrs["complete"] = True

    def read(self) -> dict[str, np.ndarray]:
        """Every array of a complete cache, in memory."""
        if not self.complete:
            raise RuntimeError("the feature cache is not complete; finish it before reading")
        return {name: self.group[name][:] for name in ("cls", "mean", "labels", "valid")}


def _check(group: zarr.Group, key: dict) -> None:
    """Raise KeyError / ValueError when an array is missing or of another layout."""
    for name, (shape, chunks, dtype, _) in _layout(key).items():
        array = group[name]
        if (array.shape, array.chunks, array.dtype) != (shape, chunks, dtype):
            raise ValueError(f"feature cache array {name} has another layout")
