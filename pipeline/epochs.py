"""The epoch plan (pure): which ids each (rank, worker) reads, and what an epoch counted.

Epochs, ranks and workers (deterministic for ``(seed, epoch, rank)`` and the worker count):

- The shard order is permuted with ``(seed, epoch)``, the same on every rank. The samples in
  that order are cut into ``world_size`` contiguous slices of ``N // W`` or ``N // W + 1``
  samples; rank ``r`` reads slice ``r`` only, so the ranks see disjoint ids that cover the
  dataset (shards may hold unequal counts; the ids after a short shard are in no slice).
  Each rank's slice is cut again, equally, among its DataLoader workers (a slice border may
  fall inside a tar: both sides stream it and keep their own ids).
- An **epoch** is ``batches_per_rank = N // (W · B)`` batches on every rank, so no rank
  waits for another at the end. The at most ``B`` samples a rank has beyond that are left
  out this epoch (the shuffle picks which) and read anyway, so the epoch's counts are exact.
  If corrupt images leave a rank short, it reads its slice again (a second *pass*, fresh
  crops) until its batches are full.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from salient.pipeline.manifest import ShardInfo

__all__ = ["EpochStats", "Segment", "batches_per_rank", "epoch_segments", "mix_seed"]


class Segment(NamedTuple):
    """Ids ``[start, stop)`` of one tar shard that one worker reads."""

    shard: int
    start: int
    stop: int


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (seed, epoch, rank, …)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: ``N // (W · B)`` (the same on every rank)."""
    return num_samples // (world_size * batch_size)


def _share(total: int, part: int, parts: int) -> tuple[int, int]:
    """Part ``part`` of ``parts`` near-equal contiguous pieces of ``range(total)``."""
    return total * part // parts, total * (part + 1) // parts


def epoch_segments(
    shards: list[ShardInfo],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int = 0,
    num_workers: int = 1,
) -> list[Segment]:
    """The id ranges one (rank, worker) reads in ``epoch``, in reading order.

    The shard order is a permutation seeded by ``(seed, epoch)``; the ids in that order are
    split into ``world_size`` contiguous slices, and a rank's slice into ``num_workers``.
    """
    order = np.random.default_rng(mix_seed(seed, epoch)).permutation(len(shards))
    total = sum(s.count for s in shards)
    lo, hi = _share(total, rank, world_size)
    w_lo, w_hi = _share(hi - lo, worker, num_workers)
    lo, hi = lo + w_lo, lo + w_hi
    segments, position = [], 0
    for index in order:
        shard = shards[index]
        a, b = max(lo, position), min(hi, position + shard.count)
        if a < b:
            first = shard.first_id - position
            segments.append(Segment(shard.index, first + a, first + b))
        position += shard.count
    return segments


# ---------------------------------------------------------------- per-epoch counts


@dataclass
class EpochStats:
    """What one rank's epoch did. ``corrupt`` counts distinct ids whose image did not decode;
    ``corrupt_maps`` distinct ids whose map row sits in a damaged store chunk (it failed its
    checksum or did not decode: read as no map), ``damaged_chunks`` those chunks (the store's
    ``DamagedChunk``, each once); ``fallback`` counts batch samples masked at random for want
    of a valid map (damaged rows among them); ``store_reads`` is one per tar segment a worker
    read rows for."""

    epoch: int
    rank: int
    generation: str | None
    batches: int = 0
    samples: int = 0
    fallback: int = 0
    corrupt: int = 0
    corrupt_maps: int = 0
    shard_errors: int = 0
    store_reads: int = 0
    passes: int = 0
    corrupt_ids: set = field(default_factory=set)
    corrupt_map_ranges: set = field(default_factory=set)
    damaged_chunks: list = field(default_factory=list)

    def absorb(self, chunk: dict) -> list:
        """Add a worker chunk's counts; returns the damaged store chunks new to this epoch."""
        self.corrupt_ids.update(chunk["corrupt"])
        self.corrupt = len(self.corrupt_ids)
        self.corrupt_map_ranges.update(chunk["corrupt_maps"])
        self.corrupt_maps = _covered(self.corrupt_map_ranges)
        self.shard_errors += chunk["shard_errors"]
        self.store_reads += chunk["store_reads"]
        known = {(d.generation, d.array, d.chunk) for d in self.damaged_chunks}
        new = [d for d in chunk["damaged"] if (d.generation, d.array, d.chunk) not in known]
        new = list({(d.generation, d.array, d.chunk): d for d in new}.values())
        self.damaged_chunks.extend(new)
        return new

    def as_dict(self) -> dict:
        body = asdict(self)
        body["corrupt_ids"] = sorted(self.corrupt_ids)
        body["corrupt_map_ranges"] = sorted(self.corrupt_map_ranges)
        body["damaged_chunks"] = [str(d) for d in self.damaged_chunks]
        return body


def _covered(ranges: set[tuple[int, int]]) -> int:
    """How many ids the ``[start, stop)`` ranges cover together (a rank re-reading its slice in
    a second pass meets the same ranges again)."""
    total, reach = 0, None
    for start, stop in sorted(ranges):
        if reach is not None and start < reach:
            start = reach
        if stop > start:
            total += stop - start
        reach = stop if reach is None else max(reach, stop)
    return total
