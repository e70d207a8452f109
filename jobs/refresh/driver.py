"""``salient refresh``: the teacher over every shard on Ray → a new generation in the store.

The driver checks everything before any work (the dataset opens, the store belongs to it and
has the teacher's grid, the teacher loads and is a ViT whose patch divides the image size),
creates the store when it is missing, then begins a generation — or resumes the unpublished
one made by the same teacher (sha256), kind and image size — and schedules only the shards it
still misses. One Ray actor per worker holds the teacher; the unit of work is one shard, which
the actor reads, decodes, maps and writes as one whole zarr chunk
(``salient.jobs.refresh.worker``; the pool that feeds and replaces the actors,
``salient.jobs.runtime.shard_pool``, is shared with ``salient eval``). When every shard is done the
driver publishes.

Failures (docs/ARCHITECTURE.md, "Failure semantics"): a worker that dies is replaced and its shard
retried (up to ``max_retries`` times per shard); a driver that dies leaves the generation
unpublished, and rerunning the same command resumes it, redoing only missing shards. A
retried shard rewrites the same chunk, so the result is identical to an uninterrupted run.

Placement (``salient.jobs.runtime.placement``): the actors' resources are checked per node, then
reserved in a Ray placement group (spread over the nodes) within ``placement_timeout_s``, and
each actor — and its replacement after a death, on whichever node Ray moves the bundle to —
runs in its own bundle; an actor that Ray cannot place in time ends the job with one line.
The driver holds the generation's lease while it runs (``salient.store.lease``): a second
driver with the same teacher refuses in one line, or with ``wait_for_other`` waits and uses
the other's generation.

Why plain actors and not Ray Data: a shard = a chunk = one write is the natural unit for
actors, while Ray Data's ``map_batches`` re-blocks rows by its own batch size and does not
keep order (docs/LIBRARY-NOTES.md, "Ray Data batches ignore chunk borders"), so the rows would
have to be gathered and re-blocked per chunk again before a write — and writing from inside a
UDF could tear chunks. ``bench_refresh`` measures both on the same data (see BENCHMARKS.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from salient import urls
from salient.jobs.refresh.config import RefreshConfig, RefreshError
from salient.jobs.refresh.worker import RefreshWorker, WorkerSpec
from salient.jobs.runtime.interrupt import Interrupted
from salient.jobs.runtime.progress import progress_lines, progress_mode, progress_wanted
from salient.jobs.runtime.ray_env import ensure_ray
from salient.jobs.runtime.shard_pool import ActorInputs, run_shards, started_pool
from salient.pipeline.manifest import open_dataset
from salient.store import GenerationBusyError, GenerationWriter, SaliencyStore, store_exists
from salient.trainer.teacher import SaliencySpec
from salient.trainer.teacher_load import load_teacher

__all__ = [
    "PreparedRefresh",
    "prepare_refresh",
    "run_refresh",
    "worker_spec",
]


# ---------------------------------------------------------------- checks before any work


def _load_teacher(config: RefreshConfig):
    """The teacher on the driver's CPU, and the resolved map spec (absolute block / head)."""

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
    """The store at ``config.store`` checked against the dataset, or None when there is none
    (StoreDamagedError when only its generations are left)."""

    if not store_exists(config.store):
        return None
    return SaliencyStore.open(config.store, dataset=dataset)


_POLL_S = 2.0  # how often a driver waiting for another one looks again


def _begin(
    config: RefreshConfig, store, begin: Callable[[], GenerationWriter]
) -> tuple[GenerationWriter | None, str | None]:
    """``(begin(), None)`` (the store's ``open_or_resume``); when another live driver writes
    the same maps, refuse (GenerationBusyError) or, with ``wait_for_other``, wait until it
    publishes (``(None, its generation's name)``) or stops (then resume its generation)."""
    while True:
        try:
            return begin(), None
        except GenerationBusyError as busy:
            if not config.wait_for_other:
                raise
            name = busy.generation
        if progress_mode() != "off":  # a waiting driver is not a hung one
            print(
                f"salient refresh: waiting for generation {name}, which another refresh is "
                "writing with the same teacher; its maps are used once it publishes",
                file=sys.stderr,
                flush=True,
            )
        while store.writer_state(name)[0] == "live":
            time.sleep(_POLL_S)
        if any(g["name"] == name and g["status"] == "published" for g in store.generations()):
            return None, name


def _check_grid(config: RefreshConfig, store, teacher) -> None:
    if store.grid != teacher.grid:
        raise RefreshError(
            f"store {config.store} holds {store.grid}x{store.grid} maps but this teacher gives "
            f"{teacher.grid}x{teacher.grid} (image size {config.image_size} / patch "
            f"{teacher.patch_size}); use --image-size {store.grid * teacher.patch_size} or "
            "a new --store"
        )


@dataclass(frozen=True)
class PreparedRefresh:
    """A checked refresh: the dataset, the teacher, the resolved map spec and the writer of
    its generation; or, when ``wait_for_other`` waited for another driver writing the same
    maps, no writer and the generation that driver published (``joined``)."""

    dataset: Any
    teacher: Any
    spec: SaliencySpec
    writer: GenerationWriter | None
    joined: str | None = None


def prepare_refresh(config: RefreshConfig) -> PreparedRefresh:
    """Check everything, create the store when missing, begin or resume the generation;
    nothing is written before every check has passed."""

    dataset = open_dataset(config.data)
    store = _open_store(config, dataset)
    teacher, spec = _load_teacher(config)
    if store is None:  # another driver creating it at the same moment: both open it
        store = SaliencyStore.open_or_create(config.store, dataset, grid=teacher.grid)
    _check_grid(config, store, teacher)
    heads = teacher.model.blocks[0].attn.num_heads if spec.kind == "heads" else None
    writer, joined = _begin(
        config,
        store,
        lambda: store.open_or_resume(
            {**teacher.meta, **spec.as_meta()},
            spec.kind,
            image_size=config.image_size,
            patch_size=teacher.patch_size,
            epoch=teacher.meta.get("epoch"),
            heads=heads,
        ),
    )
    return PreparedRefresh(dataset, teacher, spec, writer, joined)


# ---------------------------------------------------------------- the actors


@dataclass
class _Tally:
    images: int = 0
    invalid: int = 0
    computed: int = 0
    retries: int = 0
    nodes: set = field(default_factory=set)
    start: float = field(default_factory=time.perf_counter)  # the shards' computation began
    end: float | None = None  # ... and its last shard ended

    @property
    def img_per_s(self) -> float:
        """Images per second of the computation: what the bar, the lines and the summary say."""
        seconds = (self.end or time.perf_counter()) - self.start
        return round(self.images / seconds, 1) if seconds > 0 else 0.0


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(  # the rate shown is the summary's img/s (_Tally.img_per_s), not shards/s
        total=total,
        initial=initial,
        desc="salient refresh",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} shards "
        "[{elapsed}<{remaining}]{postfix}",
        disable=not (enabled and progress_wanted()),
        dynamic_ncols=True,
    )


class _Report:
    """Progress lines without a terminal: shards done of all, img/s, the generation."""

    def __init__(self, total: int, done: int, generation: str, enabled: bool) -> None:
        self.total, self.done, self.generation = total, done, generation
        self.lines = progress_lines("refresh", enabled)

    def shard_done(self, tally: _Tally) -> None:
        self.done += 1
        if self.lines is not None:
            report = self.lines.line if self.done == self.total else self.lines.update
            report(
                shard=f"{self.done}/{self.total}",
                img_per_s=tally.img_per_s,
                generation=self.generation,
            )


def _run_shards(
    config: RefreshConfig,
    dataset,
    pool,
    todo: list[int],
    bar,
    on_shard_done: Callable[[dict], None] | None,
    report: _Report,
) -> _Tally:
    """Keep every actor fed with shards until all are written; retry a dead actor's shards."""

    tally = _Tally()

    def done(result: dict) -> None:
        tally.end = time.perf_counter()  # the last shard's end is the computation's
        _count(result, tally, bar)
        report.shard_done(tally)
        if on_shard_done is not None:
            on_shard_done(result)

    tasks = [(index, (index, dataset.source(dataset.shards[index]))) for index in todo]
    tally.retries = run_shards(pool, tasks, config.max_retries, done, _give_up)
    return tally


def _give_up(shard: int, attempts: int, exc: Exception) -> RefreshError:
    return RefreshError(
        f"shard {shard} failed {attempts} times, last because its "
        f"worker died ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
        "fix the cause and rerun the same command to resume"
    )


def _count(result: dict, tally: _Tally, bar) -> None:
    tally.images += result["images"]
    tally.invalid += result["invalid"]
    tally.computed += 1
    tally.nodes.add(result.get("node"))
    bar.update(1)
    bar.set_postfix_str(f"{tally.img_per_s:.1f} img/s")


# ---------------------------------------------------------------- the job


def worker_spec(config: RefreshConfig, teacher, spec, generation: str):
    """What every worker needs besides the model (``spec``: the resolved SaliencySpec)."""

    return WorkerSpec(
        store=urls.normalise(config.store),  # actors may run in another directory
        generation=generation,
        kind=spec.kind,
        reduce=spec.reduce,
        block=spec.block,
        head=spec.head,
        inputs=ActorInputs.of(
            teacher,
            config.image_size,
            config.batch_size,
            config.gpus_per_worker,
            config.cpus_per_worker,
        ),
        shard_delay_s=config.shard_delay_s,
        hold_while=config.hold_while,
        prefetch=config.prefetch,
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
    placement,
) -> _Tally:
    ensure_ray(config.address)  # before Ray is imported: it reads its auth mode then
    import ray

    # the storage options travel along with the teacher
    args = (ray.put(teacher.model), worker_spec(config, teacher, spec, writer.name), urls.carry())
    ask, timeout_s = config.ask(), config.placement_timeout_s
    total, done = len(dataset.shards), len(dataset.shards) - len(todo)
    report = _Report(total, done, writer.name, progress)
    with (
        started_pool(RefreshWorker, args, ask, timeout_s, placement) as pool,
        _progress(total, done, progress) as bar,
    ):
        return _run_shards(config, dataset, pool, todo, bar, on_shard_done, report)


def run_refresh(
    config: RefreshConfig,
    progress: bool = True,
    on_shard_done: Callable[[dict], None] | None = None,
    placement=None,
) -> dict:
    """Run the refresh job; returns the JSON summary.

    Summary: ``images`` / ``invalid`` computed by this run, ``seconds`` (checks to publish),
    ``img_per_s`` (while the actors computed: the rate its progress showed), ``generation``
    (published), ``shards_computed``, ``shards_skipped`` (done by
    an earlier, interrupted run), ``retries`` (shards re-run after a worker died), ``nodes``
    (Ray nodes whose actors wrote shards), ``joined``
    (another driver wrote the generation; ``wait_for_other`` waited for it).
    ``on_shard_done(result)`` is called on the driver after each shard is written.
    ``placement``: a ready Ray placement group whose bundles hold the actors (training
    reserves one for its refreshes); by default the job reserves its own.

    Raises:
        DatasetError, StoreError, TeacherError, RefreshError, PlacementError: before any
            work when the inputs do not fit together or the actors fit on no node;
            GenerationBusyError when another live driver writes the same maps;
            RefreshError when a shard keeps failing.
    """
    start = time.perf_counter()
    prepared = prepare_refresh(config)
    dataset, teacher, spec, writer = (
        prepared.dataset,
        prepared.teacher,
        prepared.spec,
        prepared.writer,
    )
    if writer is None:  # another driver published the same maps while this one waited
        seconds = time.perf_counter() - start
        shards = len(dataset.shards)
        return _summary(config, _Tally(), seconds, prepared.joined, shards, 0, joined=True)
    todo = writer.missing_shards()
    # On any error the lease is released (the generation is free at once for the next
    # driver, on any host); a release that fails too (a full disk, an endpoint gone) is a
    # note on the first error, which stays the job's one line.
    try:
        with writer.store.keep_alive(writer) as lease:
            tally = (
                _compute(
                    config, dataset, teacher, spec, writer, todo, progress, on_shard_done, placement
                )
                if todo
                else _Tally()
            )
            lease.stop()  # no renewal may race the publish's attribute writes
            writer.publish()
    except KeyboardInterrupt:  # the lease is released on the way out (a note if that fails)
        done = len(dataset.shards) - len(writer.missing_shards())
        raise Interrupted(
            f"{done} of {len(dataset.shards)} shards of {writer.name}, unpublished (the same "
            "command computes only the others)"
        ) from None
    skipped = len(dataset.shards) - len(todo)
    return _summary(
        config, tally, time.perf_counter() - start, writer.name, skipped, tally.computed
    )


def _summary(
    config: RefreshConfig,
    tally: _Tally,
    seconds: float,
    generation: str,
    skipped: int,
    computed: int,
    joined: bool = False,
) -> dict:
    return {
        "images": tally.images,
        "invalid": tally.invalid,
        "seconds": round(seconds, 3),
        "img_per_s": tally.img_per_s,  # while computing, as the bar said; seconds: all
        "generation": generation,
        "shards_computed": computed,
        "shards_skipped": skipped,
        "retries": tally.retries,
        "nodes": len(tally.nodes),
        "joined": joined,
        "store": config.store,
        "kind": config.kind,
    }
