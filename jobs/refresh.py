"""``salient refresh``: the teacher over every shard on Ray → a new generation in the store.

The driver checks everything before any work (the dataset opens, the store belongs to it and
has the teacher's grid, the teacher loads and is a ViT whose patch divides the image size),
creates the store when it is missing, then begins a generation — or resumes the unpublished
one made by the same teacher (sha256), kind and image size — and schedules only the shards it
still misses. One Ray actor per worker holds the teacher; the unit of work is one shard, which
the actor reads, decodes, maps and writes as one whole zarr chunk
(``salient.jobs.refresh_worker``; the pool that feeds and replaces the actors,
``salient.jobs.shard_pool``, is shared with ``salient eval``). When every shard is done the
driver publishes.

Failures (DESIGN.md, "Failure semantics"): a worker that dies is replaced and its shard
retried (up to ``max_retries`` times per shard); a driver that dies leaves the generation
unpublished, and rerunning the same command resumes it, redoing only missing shards. A
retried shard rewrites the same chunk, so the result is identical to an uninterrupted run.

Why plain actors and not Ray Data: a shard = a chunk = one write is the natural unit for
actors, while Ray Data's ``map_batches`` re-blocks rows by its own batch size and does not
keep order (PITFALLS.md), so the rows would have to be gathered and re-blocked per chunk
again before a write — and writing from inside a UDF could tear chunks. ``bench_refresh``
measures both on the same data (see BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from salient.errors import SalientError

__all__ = [
    "KINDS",
    "REDUCES",
    "RefreshConfig",
    "RefreshError",
    "prepare_refresh",
    "run_refresh",
    "worker_spec",
]

KINDS = ("cls_attn", "gpa", "heads")
REDUCES = ("mean", "minmax_mean")


class RefreshError(SalientError):
    """A refresh that cannot start or finish (wrong grid, no GPU, a shard that keeps failing)."""


@dataclass(frozen=True)
class RefreshConfig:
    """One refresh job. ``teacher`` is a salient checkpoint path or ``timm:NAME`` (+ ``weights``).

    ``cpus_per_worker`` is the Ray CPU reservation of one actor (fractional is fine; its torch
    threads are ``max(1, int(cpus_per_worker))``); ``gpus_per_worker > 0`` puts each actor on a
    GPU with nvjpeg decode and bf16 autocast. ``shard_delay_s`` is a testing aid: each worker
    waits that long before writing a shard.
    """

    data: str
    store: str
    teacher: str
    weights: str | None = None
    allow_random_teacher: bool = False
    kind: str = "cls_attn"
    reduce: str | None = None
    block: int = -1
    head: int | None = None
    image_size: int = 224
    batch_size: int = 64
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    address: str | None = None
    max_retries: int = 3
    shard_delay_s: float = 0.0

    def __post_init__(self):
        for name in ("data", "store", "teacher"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RefreshError(f"refresh needs --{name} (got {getattr(self, name)!r})")
        if self.kind not in KINDS:
            raise RefreshError(f"--kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.reduce is not None and self.reduce not in REDUCES:
            raise RefreshError(
                f"--reduce must be one of {', '.join(REDUCES)} (got {self.reduce!r})"
            )
        self._check_positive("image_size", "batch_size", "workers")
        if self.gpus_per_worker < 0:
            raise RefreshError(f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker})")
        if not self.cpus_per_worker > 0:
            raise RefreshError(
                f"--cpus-per-worker must be > 0 (got {self.cpus_per_worker}); "
                "fractions such as 0.5 are fine"
            )
        if self.max_retries < 0 or self.shard_delay_s < 0:
            raise RefreshError(
                "--max-retries and shard_delay_s must be >= 0 "
                f"(got {self.max_retries}, {self.shard_delay_s})"
            )

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise RefreshError(f"{flag} must be a positive integer (got {value!r})")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


# ---------------------------------------------------------------- checks before any work


def _load_teacher(config: RefreshConfig):
    """The teacher on the driver's CPU, and the resolved map spec (absolute block / head)."""
    from salient.trainer.teacher import SaliencySpec
    from salient.trainer.teacher_load import load_teacher

    teacher = load_teacher(
        config.teacher,
        weights=config.weights,
        allow_random=config.allow_random_teacher,
        image_size=config.image_size,
        device="cpu",
    )
    spec = SaliencySpec(config.kind, config.block, config.head, config.reduce)
    return teacher, spec.resolve(teacher.model)


def _open_store(config: RefreshConfig, dataset):
    """The store at ``config.store`` checked against the dataset, or None when there is none."""
    from salient.store import SaliencyStore, store_exists

    if not store_exists(config.store):
        return None
    return SaliencyStore.open(config.store, dataset=dataset)


def _check_grid(config: RefreshConfig, store, teacher) -> None:
    if store.grid != teacher.grid:
        raise RefreshError(
            f"store {config.store} holds {store.grid}x{store.grid} maps but this teacher gives "
            f"{teacher.grid}x{teacher.grid} (image size {config.image_size} / patch "
            f"{teacher.patch_size}); use --image-size {store.grid * teacher.patch_size} or "
            "a new --store"
        )


def prepare_refresh(config: RefreshConfig):
    """Check everything, create the store when missing, begin or resume the generation.

    Returns ``(dataset, teacher, saliency_spec, writer)``; nothing is written before every
    check has passed.
    """
    from salient.pipeline.manifest import open_dataset
    from salient.store import SaliencyStore

    dataset = open_dataset(config.data)
    store = _open_store(config, dataset)
    teacher, spec = _load_teacher(config)
    if store is None:
        store = SaliencyStore.create(config.store, dataset, grid=teacher.grid)
    _check_grid(config, store, teacher)
    heads = teacher.model.blocks[0].attn.num_heads if spec.kind == "heads" else None
    writer = store.open_or_resume(
        {**teacher.meta, **spec.as_meta()},
        spec.kind,
        image_size=config.image_size,
        patch_size=teacher.patch_size,
        epoch=teacher.meta.get("epoch"),
        heads=heads,
    )
    return dataset, teacher, spec, writer


# ---------------------------------------------------------------- the actors


@dataclass
class _Tally:
    images: int = 0
    invalid: int = 0
    computed: int = 0
    retries: int = 0


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    from salient.jobs.progress import progress_wanted

    return tqdm(
        total=total,
        initial=initial,
        unit=" shard",
        desc="refresh",
        disable=not (enabled and progress_wanted()),
        dynamic_ncols=True,
    )


def _run_shards(
    config: RefreshConfig,
    dataset,
    pool,
    todo: list[int],
    bar,
    on_shard_done: Callable[[dict], None] | None,
) -> _Tally:
    """Keep every actor fed with shards until all are written; retry a dead actor's shards."""
    from salient.jobs.shard_pool import run_shards

    tally, start = _Tally(), time.perf_counter()

    def done(result: dict) -> None:
        _count(result, tally, bar, start)
        if on_shard_done is not None:
            on_shard_done(result)

    tasks = []
    for index in todo:
        shard = dataset.shards[index]
        tasks.append((index, (index, dataset.shard_url(shard), shard.first_id, shard.count)))
    tally.retries = run_shards(pool, tasks, config.max_retries, done, _give_up)
    return tally


def _give_up(shard: int, attempts: int, exc: Exception) -> RefreshError:
    return RefreshError(
        f"shard {shard} failed {attempts} times, last because its "
        f"worker died ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
        "fix the cause and rerun the same command to resume"
    )


def _count(result: dict, tally: _Tally, bar, start: float) -> None:
    tally.images += result["images"]
    tally.invalid += result["invalid"]
    tally.computed += 1
    bar.update(1)
    bar.set_postfix(img_s=f"{tally.images / max(time.perf_counter() - start, 1e-9):.0f}")


# ---------------------------------------------------------------- the job


def worker_spec(config: RefreshConfig, teacher, spec, generation: str):
    """What every worker needs besides the model (``spec``: the resolved SaliencySpec)."""
    from salient.jobs.refresh_worker import WorkerSpec

    return WorkerSpec(
        store=config.store,
        generation=generation,
        kind=spec.kind,
        reduce=spec.reduce,
        block=spec.block,
        head=spec.head,
        image_size=config.image_size,
        batch_size=config.batch_size,
        mean=teacher.mean,
        std=teacher.std,
        device=config.device,
        threads=max(1, int(config.cpus_per_worker)),
        shard_delay_s=config.shard_delay_s,
    )


def _compute(
    config: RefreshConfig,
    dataset,
    teacher,
    spec,
    writer,
    todo: list[int],
    progress: bool,
    on_shard_done,
) -> _Tally:
    import ray

    from salient.jobs.ray_env import ensure_ray
    from salient.jobs.refresh_worker import RefreshWorker
    from salient.jobs.shard_pool import ShardPool, check_resources

    info = ensure_ray(config.address)
    check_resources(
        config.cpus_per_worker, config.gpus_per_worker, info.cpus, info.gpus, RefreshError
    )
    pool = ShardPool(
        RefreshWorker,
        (ray.put(teacher.model), worker_spec(config, teacher, spec, writer.name)),
        config.workers,
        config.cpus_per_worker,
        config.gpus_per_worker,
    )
    try:
        with _progress(len(dataset.shards), len(dataset.shards) - len(todo), progress) as bar:
            return _run_shards(config, dataset, pool, todo, bar, on_shard_done)
    finally:
        pool.shutdown()


def run_refresh(
    config: RefreshConfig,
    progress: bool = True,
    on_shard_done: Callable[[dict], None] | None = None,
) -> dict:
    """Run the refresh job; returns the JSON summary.

    Summary: ``images`` / ``invalid`` computed by this run, ``seconds`` (checks to publish),
    ``img_per_s``, ``generation`` (published), ``shards_computed``, ``shards_skipped`` (done by
    an earlier, interrupted run), ``retries`` (shards re-run after a worker died).
    ``on_shard_done(result)`` is called on the driver after each shard is written.

    Raises:
        DatasetError, StoreError, TeacherError, RefreshError: before any work when the
            inputs do not fit together; RefreshError when a shard keeps failing.
    """
    start = time.perf_counter()
    dataset, teacher, spec, writer = prepare_refresh(config)
    todo = writer.missing_shards()
    tally = (
        _compute(config, dataset, teacher, spec, writer, todo, progress, on_shard_done)
        if todo
        else _Tally()
    )
    writer.publish()
    seconds = time.perf_counter() - start
    return {
        "images": tally.images,
        "invalid": tally.invalid,
        "seconds": round(seconds, 3),
        "img_per_s": round(tally.images / seconds, 1) if seconds else math.nan,
        "generation": writer.name,
        "shards_computed": tally.computed,
        "shards_skipped": len(dataset.shards) - len(todo),
        "retries": tally.retries,
        "store": config.store,
        "kind": config.kind,
    }
