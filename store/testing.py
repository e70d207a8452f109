"""Synthetic datasets and maps, and child-process entry points, for the store's tests and bench.

Like ``zarr.testing``: helpers for tests, not the store's API. A synthetic dataset is only
what the store reads of one (``salient.store.paths.StoredDataset``), so the store is tested
without the data pipeline above it. The entry points run in processes started with the ``spawn``
context (test modules cannot be imported there: docs/LIBRARY-NOTES.md, "Remote code lives in
the package"), so they live in the package.
Every map row is a pure function of ``(seed, shard, row)``, so any process, in any order,
writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salient.store.store import SaliencyStore

__all__ = [
    "SyntheticDataset",
    "hold_generation",
    "hold_reader",
    "open_or_create",
    "publish_generations",
    "synthetic_dataset",
    "synthetic_shard",
    "synthetic_teacher",
    "timed_write",
    "write_shards",
]


@dataclass(frozen=True)
class SyntheticShard:
    """A shard's id range, as the store reads it."""

    first_id: int
    count: int

    @property
    def stop_id(self) -> int:
        return self.first_id + self.count


@dataclass(frozen=True)
class SyntheticDataset:
    """A dataset without tar files: ``num_samples`` ids in shards of ``shard_size``."""

    root: str
    num_samples: int
    shard_size: int

    @property
    def shards(self) -> list[SyntheticShard]:
        starts = range(0, self.num_samples, self.shard_size)
        return [SyntheticShard(s, min(self.shard_size, self.num_samples - s)) for s in starts]

    @property
    def fingerprint(self) -> str:
        ranges = [[s.first_id, s.count] for s in self.shards]
        return hashlib.sha256(json.dumps(ranges).encode()).hexdigest()


def synthetic_dataset(
    num_samples: int, shard_size: int, root: str | Path = "."
) -> SyntheticDataset:
    """A dataset of ``num_samples`` ids in shards of ``shard_size`` (no tar files)."""
    return SyntheticDataset(str(root), num_samples, shard_size)


def synthetic_teacher(seed: int) -> dict:
    return {
        "path": f"synthetic-{seed}.pt",
        "sha256": f"{seed:064x}",
        "name": "synthetic",
        "epoch": seed,
        "kind": "cls_attn",
        "reduce": "mean",
        "block": -1,
        "head": None,
    }


def synthetic_shard(
    seed: int, shard: int, count: int, grid: int, heads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``maps float32 [n,G,G]`` (NaN rows where invalid), ``valid uint8 [n]`` (~5 % zeros),
    and ``head_maps [n,H,G,G]`` when ``heads``."""
    rng = np.random.default_rng([seed, shard])
    valid = (rng.random(count) > 0.05).astype(np.uint8)
    maps = rng.standard_normal((count, grid, grid), dtype=np.float32)
    maps[valid == 0] = np.nan
    head_maps = None
    if heads is not None:
        head_maps = rng.standard_normal((count, heads, grid, grid), dtype=np.float32)
        head_maps[valid == 0] = np.nan
    return maps, valid, head_maps


def _write(writer, store: SaliencyStore, shard: int, seed: int) -> None:
    start, stop = store.layout.shard_range(shard)
    maps, valid, heads = synthetic_shard(
        seed, shard, stop - start, store.grid, writer.attrs.get("heads")
    )
    writer.write_shard(shard, maps, valid, head_maps=heads)


def write_shards(
    url: str, generation: str, shards: list[int], seed: int, delay_s: float = 0.0
) -> None:
    """Child process: write ``shards`` of ``generation``, sleeping ``delay_s`` after each."""
    store = SaliencyStore.open(url)
    writer = store.resume_generation(generation)
    for shard in shards:
        _write(writer, store, shard, seed)
        time.sleep(delay_s)


def publish_generations(url: str, seeds: list[int], pause_s: float) -> None:
    """Child process (a driver): for each seed begin, write every shard and publish a
    generation, then wait ``pause_s``; finally ``gc(keep=1)`` with a one-hour grace."""
    store = SaliencyStore.open(url)
    for seed in seeds:
        writer = store.begin_generation(
            synthetic_teacher(seed), "cls_attn", image_size=store.grid * 8, patch_size=8, epoch=seed
        )
        for shard in range(store.num_shards):
            _write(writer, store, shard, seed)
        writer.publish()
        time.sleep(pause_s)
    store.gc(keep=1, grace_s=3600)


def timed_write(url: str, generation: str, shards: list[int], barrier, queue) -> None:
    """Bench child process: make the rows first, wait at ``barrier``, write them, and put
    ``(start, stop)`` (``time.monotonic``, shared by all processes) on ``queue``."""
    store = SaliencyStore.open(url)
    writer = store.resume_generation(generation)
    rows = []
    for shard in shards:
        start, stop = store.layout.shard_range(shard)
        maps, valid, _ = synthetic_shard(0, shard, stop - start, store.grid)
        rows.append((shard, maps.astype(np.float16), valid))
    barrier.wait()
    begin = time.monotonic()
    for shard, maps, valid in rows:
        writer.write_shard(shard, maps, valid)
    queue.put((begin, time.monotonic()))


def hold_generation(url: str, seed: int, shards: list[int], ready) -> None:
    """Child process (a driver that stays): begin or resume the generation of ``seed``, hold
    its lease (renewed), write ``shards``, set ``ready``, then wait to be killed."""
    store = SaliencyStore.open(url)
    writer = store.open_or_resume(
        synthetic_teacher(seed), "cls_attn", image_size=store.grid * 8, patch_size=8, epoch=seed
    )
    store.keep_alive(writer)
    for shard in shards:
        _write(writer, store, shard, seed)
    ready.set()
    time.sleep(3600)


def hold_reader(url: str, generation: str, holder: str, ready) -> None:
    """Child process (a reader that stays, e.g. a training run): hold a reader's lease on
    ``generation``, set ``ready``, then wait to be killed."""
    SaliencyStore.open(url).hold(generation, holder)
    ready.set()
    time.sleep(3600)


def open_or_create(url: str, num_samples: int, shard_size: int, grid: int, barrier, queue) -> None:
    """Child process: wait at ``barrier``, then ``SaliencyStore.open_or_create``; puts the
    store's fingerprint, or the error's text, on ``queue``."""
    dataset = synthetic_dataset(num_samples, shard_size, Path(url).parent)
    barrier.wait()
    try:
        queue.put(SaliencyStore.open_or_create(url, dataset, grid=grid).fingerprint)
    except Exception as exc:  # reported to the test, which names it
        queue.put(f"{type(exc).__name__}: {exc}")
