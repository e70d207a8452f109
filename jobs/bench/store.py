"""``salient bench store``: write and read speed of the saliency store, as JSON.

Rows are 14x14 float16 maps (random values: the worst case for compression) plus the valid
flag, in shards of 1,000 ids, in a fresh store under a temporary directory (``path``: its
parent; default the system temp dir). Measured:

- ``rows_per_s_1_writer`` / ``rows_per_s_4_writers``: rows written per second by one process
  and by 4 processes (spawned; each writes whole shards, rows made before the clock starts;
  the time runs from the first start to the last finish). Publishing is not included.
- ``*_read_ms``: latency of a bound reader's ``read_shard`` (1,000 rows), ``read_ids`` (256
  random ids, one read per chunk touched) and one row, as median and 90th percentile.

Targets: >= 200,000 rows/s written; a shard's rows in <= 5 ms.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from salient.store import SaliencyStore
from salient.store.testing import synthetic_dataset, synthetic_shard, timed_write

__all__ = ["bench_store"]

GRID = 14
SHARD = 1000
WRITERS = 4
TARGET_ROWS_PER_S = 200_000
TARGET_SHARD_MS = 5.0


def _teacher() -> dict:
    return {"path": None, "sha256": "random", "name": "bench", "epoch": None}


def _begin(store):
    return store.begin_generation(_teacher(), "cls_attn", image_size=GRID * 16, patch_size=16)


def _write_one(store) -> float:
    """Rows/s of one in-process writer."""

    writer = _begin(store)
    rows = []
    for shard in range(store.num_shards):
        start, stop = store.layout.shard_range(shard)
        maps, valid, _ = synthetic_shard(0, shard, stop - start, GRID)
        rows.append((shard, maps.astype(np.float16), valid))
    begin = time.perf_counter()
    for shard, maps, valid in rows:
        writer.write_shard(shard, maps, valid)
    seconds = time.perf_counter() - begin
    writer.publish()
    return store.num_samples / seconds


def _write_many(store, workers: int) -> float:
    """Rows/s of ``workers`` writer processes, each writing every ``workers``-th shard."""

    ctx = multiprocessing.get_context("spawn")
    writer = _begin(store)
    barrier, queue = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=timed_write,
            args=(
                store.url,
                writer.name,
                list(range(k, store.num_shards, workers)),
                barrier,
                queue,
            ),
        )
        for k in range(workers)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=300)
    spans = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join()
    writer.publish()
    return store.num_samples / (max(s[1] for s in spans) - min(s[0] for s in spans))


def _latency_ms(read, args: list) -> tuple[float, float]:
    """Median and 90th percentile of ``read(*a)`` over ``args``, in ms (one warm-up call)."""
    read(*args[0])
    times = []
    for a in args:
        begin = time.perf_counter()
        read(*a)
        times.append((time.perf_counter() - begin) * 1e3)
    return round(float(np.median(times)), 3), round(float(np.percentile(times, 90)), 3)


def _reads(store, repeats: int) -> dict:
    reader = store.bind()
    rng = np.random.default_rng(0)
    n = store.num_samples
    figures = {}
    cases = {
        "shard": (
            reader.read_shard,
            [(int(s),) for s in rng.integers(0, store.num_shards, repeats)],
        ),
        "ids_256": (
            reader.read_ids,
            [(rng.choice(n, 256, replace=False),) for _ in range(repeats)],
        ),
        "one_row": (reader.read_range, [(int(i), int(i) + 1) for i in rng.integers(0, n, repeats)]),
    }
    for name, (read, args) in cases.items():
        figures[f"{name}_read_ms"], figures[f"{name}_read_ms_p90"] = _latency_ms(read, args)
    return figures


def bench_store(quick: bool = False, path: str | None = None) -> dict:
    """Write and read figures of the store (see the module docstring); ``quick``: 20,000 rows."""
    import zarr

    rows, repeats = (20_000, 10) if quick else (200_000, 50)
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=path) as tmp:
        store = SaliencyStore.create(
            Path(tmp) / "saliency.zarr", synthetic_dataset(rows, SHARD, tmp), grid=GRID
        )
        one = _write_one(store)
        many = _write_many(store, WRITERS)
        reads = _reads(store, repeats)
    return {
        "rows": rows,
        "grid": GRID,
        "shard_size": SHARD,
        "dtype": "float16",
        "zarr": zarr.__version__,
        "rows_per_s_1_writer": round(one),
        f"rows_per_s_{WRITERS}_writers": round(many),
        **reads,
        "targets": {"rows_per_s": TARGET_ROWS_PER_S, "shard_read_ms": TARGET_SHARD_MS},
        "meets_targets": min(one, many) >= TARGET_ROWS_PER_S
        and reads["shard_read_ms"] <= TARGET_SHARD_MS,
    }
