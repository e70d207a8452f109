"""``salient train``: MAE / SimMIM pretraining on Ray Train, with the periodic saliency refresh.

The driver checks everything before any work (the config, the dataset, the store and its grid,
the run directory, a ``--resume`` checkpoint's model), connects to Ray (embedded local Ray by
default, a cluster with ``--address``), plans the workers per node so a refresh fits beside
them (``salient.jobs.runtime.placement``: one line when nothing fits, a bounded wait when Ray must
make room), and runs ``salient.jobs.train.worker.train_loop_per_worker`` under Ray Train's
``TorchTrainer`` (gloo on CPU; nccl and bf16 autocast with ``gpu``).

Failures: Ray Train restarts lost workers up to ``max_failures`` times, and every attempt
resumes from the run directory's latest checkpoint. A worker that stops on one of our errors
records it in ``RUN/error.json`` first, so a restart ends at once instead of repeating it, and
the driver raises it as one line (README, Decisions, "Surviving worker loss").

The masking schedule is AMT's (its Sec. "Attention-driven masking and throwing", and its code):
random masking at ``warmup_mask_ratio`` (0.75) for the first ``warmup_epochs`` and until a
generation exists, then ``strategy``. After every ``refresh_every`` epochs past the warmup
(AMT: every 40 epochs) rank 0 launches ``run_refresh`` with the checkpoint just written as
teacher, in a Ray task beside the training (``refresh_wait`` makes training wait for it); the
loader switches to the newest published generation at the next epoch boundary.

With ``val``, rank 0 runs the k-NN probe (``salient.jobs.eval.online``) on the current encoder
every ``eval_every`` epochs and after the last one, and logs it in ``metrics.jsonl``.

Outputs in ``run_dir``: ``config.json`` (the resolved config), ``checkpoint-EEEEE.pt`` every
``save_every`` epochs with its encoder for timm in ``encoder-EEEEE/`` (the newest
``keep_checkpoints`` kept), ``metrics.jsonl`` (rank 0: start, per-epoch records over all ranks,
refresh and probe records) and ``metrics/rank-R.jsonl`` (each rank's per-step records),
``ray/`` (Ray Train's own storage). ``data`` and ``store`` may be URLs (``s3://``, ``gs://``); on a
multi-node cluster ``run_dir`` must be a local path every node shares (checkpoints stay on a
filesystem).

:class:`TrainConfig` and its checks live in ``salient.jobs.train.config``; this module
re-exports it and keeps what needs the disk, Ray or the workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from salient import urls
from salient.errors import SalientError, cleaned_up
from salient.jobs.eval.driver import check_class_lists
from salient.jobs.inspect.data import demo_hw
from salient.jobs.inspect.driver import generation_stats
from salient.jobs.refresh.driver import run_refresh
from salient.jobs.runtime.interrupt import Interrupted
from salient.jobs.runtime.placement import (
    Ask,
    cluster_nodes,
    plan_train,
    probe,
    reserve,
    wait_ready,
)
from salient.jobs.runtime.progress import plain_warnings, progress_mode
from salient.jobs.runtime.ray_env import ensure_ray
from salient.jobs.runtime.records import METRICS, read_records
from salient.jobs.train.config import TrainConfig, resolved
from salient.jobs.train.console import TrainConsole
from salient.jobs.train.failure import clear_failure, raise_failure, request_stop
from salient.jobs.train.worker import RunStopped, train_loop_per_worker
from salient.pipeline.epochs import batches_per_rank
from salient.pipeline.loader import SalientLoader, check_gpa_kind
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore, store_exists
from salient.trainer.checkpoint import latest_checkpoint, load_checkpoint
from salient.trainer.specs import TrainError
from salient.trainer.teacher_load import load_teacher

__all__ = [
    "PendingRefresh",
    "RefreshLauncher",
    "TrainConfig",
    "TrainError",
    "run_train",
    "with_box_figures",
]


# ---------------------------------------------------------------- checks before any work


def _check_run_dir(config: TrainConfig) -> str | None:
    """The checkpoint to resume from (``--resume``), or None for a fresh run; refuses mix-ups."""

    latest = latest_checkpoint(config.run_dir)
    if not config.resume:
        if latest is not None:
            raise TrainError(
                f"{config.run_dir} holds checkpoints of an earlier run ({latest.name})"
                "; pass --resume to continue it or choose another --run-dir"
            )
        return None
    if latest is None:
        raise TrainError(
            f"--resume but {config.run_dir} holds no checkpoint; drop --resume to start a new run"
        )
    ckpt = load_checkpoint(latest, config=config.as_dict())  # names a model / size that differs
    if ckpt["epoch"] >= config.epochs:
        raise TrainError(
            f"{latest} already finished epoch {ckpt['epoch']} of --epochs "
            f"{config.epochs}; raise --epochs to train further"
        )
    return str(latest)


def _check_store(config: TrainConfig, dataset) -> None:
    """The store fits the dataset and, when refreshes write to it, the model's patch grid."""
    if not config.needs_saliency:
        return

    grid = config.image_size // config.patch_size
    if not store_exists(config.store):
        if not config.refreshes:
            raise TrainError(
                f"store {config.store} does not exist and --refresh-every is 0; "
                "run `salient refresh` first or set --refresh-every"
            )
        return
    store = SaliencyStore.open(config.store, dataset=dataset)  # refuses another dataset
    if config.refreshes and store.grid != grid:
        raise TrainError(
            f"store {config.store} holds {store.grid}x{store.grid} maps but a refresh "
            f"from this model writes {grid}x{grid} (--image-size {config.image_size} "
            f"/ --patch-size {config.patch_size}); use another --store"
        )
    current = store.current()
    if not config.refreshes and current is None:
        raise TrainError(
            f"store {config.store} has no published generation and --refresh-every "
            "is 0; run `salient refresh` first or set --refresh-every"
        )
    if config.gpa_loss_weight and current is not None:
        check_gpa_kind(store, current, TrainError, "--gpa-loss-weight")


def _with_map_heads(config: TrainConfig) -> TrainConfig:
    """An AutoMAE run with its generator's input channels read from its maps, before any work:
    the store's current generation must hold per-head maps (``store``), the teacher must load
    on the model's grid (``online``). Other runs are returned as they are."""
    if config.framework != "automae":
        return config
    heads = _teacher_heads(config) if config.map_source == "online" else _store_heads(config)
    if config.generator_heads not in (None, heads):
        raise TrainError(
            f"--generator-heads {config.generator_heads} but AutoMAE's maps hold {heads} heads "
            "(from the teacher's last block); drop --generator-heads"
        )
    return replace(config, generator_heads=heads)


def _store_heads(config: TrainConfig) -> int:
    """Heads of the store's current generation (AutoMAE's store source)."""
    run_refresh_first = (
        f"run `salient refresh --kind heads --store {config.store} --teacher …` first, or use "
        "--map-source online --map-teacher …"
    )
    if not store_exists(config.store):
        raise TrainError(
            f"AutoMAE's maps: store {config.store} does not exist; {run_refresh_first}"
        )
    store = SaliencyStore.open(config.store, dataset=open_dataset(config.data))
    current = store.current()
    if current is None:
        raise TrainError(
            f"AutoMAE's maps: store {config.store} has no published generation; {run_refresh_first}"
        )
    attrs = store.bind(current).attrs
    if attrs.get("heads") is None:
        raise TrainError(
            f"AutoMAE needs per-head maps but the current generation {current} of "
            f"{config.store} holds one {attrs.get('kind')} map per image; {run_refresh_first}"
        )
    return int(attrs["heads"])


def _teacher_heads(config: TrainConfig) -> int:
    """Heads of the online source's teacher, loaded once here so a bad one fails now."""
    teacher = load_teacher(
        config.map_teacher, config.map_teacher_weights, image_size=config.image_size
    )
    grid = config.image_size // config.patch_size
    if teacher.grid != grid:
        raise TrainError(
            f"--map-teacher {config.map_teacher} gives {teacher.grid}x{teacher.grid} maps at "
            f"--image-size {config.image_size}, the model's grid is {grid}x{grid}; use a "
            f"--patch-size of {teacher.patch_size} or another teacher"
        )
    return teacher.model.blocks[-1].attn.num_heads


def _check_batches(config: TrainConfig, dataset) -> None:
    """A full batch on every worker and, with accumulation, a full optimiser step per epoch;
    the messages name the flag to change (the loader's own check names its fields)."""
    n, b, w = dataset.num_samples, config.batch_size, config.workers
    have = batches_per_rank(n, w, b)
    if have < 1:
        raise TrainError(
            f"--batch-size {b} on each of --workers {w} needs {b * w} images but "
            f"{config.data} holds {n}; lower --batch-size to {n // w} or less"
        )
    accum = config.accum_steps
    if have >= accum:
        return
    if config.effective_batch is not None:  # a recipe's, or the user's: name what sets it
        raise TrainError(
            f"--effective-batch {config.effective_batch} needs {accum} batches of {b} per "
            f"worker and epoch, but {n} images give each of {w} workers {have}; use "
            f"--effective-batch {have * b * w} or less (a multiple of {b * w})"
        )
    raise TrainError(
        f"--accum-iter {accum} needs {accum} batches per worker and epoch, but {n} images "
        f"give each of {w} workers {have} of --batch-size {b}; use --accum-iter {have} or less"
    )


def _check_inputs(config: TrainConfig) -> tuple[str | None, int]:
    """Every check that needs the disk; returns the checkpoint to resume from and the
    steps of an epoch."""

    _check_batches(config, open_dataset(config.data))  # DatasetError
    loader = SalientLoader(config.loader_config(0, config.workers))
    resume_from = _check_run_dir(config)  # first: a --resume mismatch is the root cause
    _check_store(config, loader.dataset)
    if config.val:  # the k-NN probe needs both sets labelled with one class list
        check_class_lists(loader.dataset, open_dataset(config.val))
    return resume_from, len(loader)


def _plan(config: TrainConfig) -> dict:
    """Ray resources of one train worker, planned per node beside the refresh; Ray places
    them within ``placement_timeout_s`` or the job stops with what is missing."""

    refresh = _launcher(config, "")  # only its ask: the group is named when the run starts
    plan = plan_train(
        cluster_nodes(),
        config.workers,
        config.cpus_per_worker,
        config.worker_gpus,
        None if refresh is None else refresh.ask(),
    )
    flags = "--workers or --cpus-per-worker" + (" (or drop --gpu)" if config.gpu else "")
    probe(Ask("train worker", config.workers, plan.worker, flags), config.placement_timeout_s)
    return plan.worker


# ---------------------------------------------------------------- the refresh beside training


@dataclass(frozen=True)
class RefreshLauncher:
    """Rank 0's refreshes: ``reserve()`` the actors' placement group once the train workers
    run, then ``launcher(teacher, group)`` starts ``run_refresh`` with
    ``config.refresh_config(teacher)`` in a Ray task, its actors in the group's bundles, and
    returns a :class:`PendingRefresh`.

    The task holds no CPU (it waits on its actors). The group is named, so a restarted rank 0
    finds it again; the driver removes it when the run ends.
    """

    config: TrainConfig
    group: str = "salient-refresh"

    def ask(self) -> Ask:
        c, flags = self.config, "--refresh-workers, --refresh-cpus or --refresh-gpus"
        return Ask.of("refresh actor", c.refresh_actors, c.refresh_cpus, c.refresh_gpu_share, flags)

    def reserve(self):
        """The run's refresh placement group, ready (PlacementError after the timeout)."""
        from ray.util import get_placement_group  # Ray's environment is set by the driver first

        timeout = self.config.placement_timeout_s
        try:
            group = get_placement_group(self.group)
        except ValueError:  # not reserved yet: this is the run's first start
            return reserve(self.ask(), timeout, self.group, " beside the train workers")
        wait_ready(group, self.ask(), timeout)
        return group

    def __call__(self, teacher: str, group) -> PendingRefresh:
        import ray

        # A task lost with its node is run again by Ray: the refresh resumes its generation.
        task = ray.remote(_refresh_task).options(num_cpus=0, max_retries=2)
        config = self.config.refresh_config(teacher)
        return PendingRefresh(task.remote(config, group, urls.carry()))  # this worker's options


@dataclass(frozen=True)
class PendingRefresh:
    """A refresh running as a Ray task: ``done()`` without waiting, ``result()`` its summary
    (raises the refresh's error)."""

    ref: Any

    def done(self) -> bool:
        import ray

        return bool(ray.wait([self.ref], timeout=0)[0])

    def result(self) -> dict:
        import ray

        return ray.get(self.ref)


def _refresh_task(config, group, storage) -> dict:
    urls.adopt(storage)
    return with_box_figures(config, run_refresh(config, progress=False, placement=group))


def with_box_figures(config, summary: dict) -> dict:
    """A refresh's summary, plus on a dataset with object boxes (the demo's) how much of its
    maps' mass falls on them: ``box`` (``salient inspect``'s figures; ``lift_mean`` 1 = no
    better than uniform). Computed in the refresh's task, beside training, not on rank 0."""
    if demo_hw(open_dataset(config.data)) is None:
        return summary
    stats = generation_stats(config.store, config.data, [summary["generation"]])
    return {**summary, "box": stats[summary["generation"]]["box"]}


def _launcher(config: TrainConfig, group: str) -> RefreshLauncher | None:
    return RefreshLauncher(config, group) if config.refreshes else None


# ---------------------------------------------------------------- the job


def _fit(config: TrainConfig, resume_from: str | None, resources: dict, run_id: str) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(config.run_dir)
    group = f"salient-refresh-{run_id}"
    # Ray Train waits this long for its workers per try (passed on to its controller)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(config.placement_timeout_s)
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={
            "config": config,
            "resume_from": resume_from,
            "launch_refresh": _launcher(config, group),
            "run_id": run_id,
            # Pickled with their values for the workers; Ray Train's run state shows only
            # str(), which StorageOptions redacts (README, Decisions).
            "storage": urls.carry(),
        },
        torch_config=TorchConfig(backend="nccl" if config.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=resources
        ),
        # Ray Train's console INFO lines (one per report, per rank) repeat what the summary and
        # metrics.jsonl hold; they stay in the Ray session's log files.
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(
                max_failures=config.max_failures, controller_failure_limit=config.max_failures
            ),
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        ),
    )
    clear_failure(run_dir)  # one left by an earlier run that stopped on an error
    # with Ray gone, giving the group back fails too: a note, never the error shown
    with cleaned_up(lambda: _remove_group(group), "giving back the refresh group"):
        try:
            _off_the_main_thread(trainer.fit)
        except KeyboardInterrupt:
            raise _interrupted(config) from None
        except Exception as exc:
            raise_failure(run_dir, exc, config)
            raise
    raise_failure(run_dir, None, config)


def _off_the_main_thread(fit) -> None:
    """``fit()`` in a daemon thread, waited for here. On the main thread Ray Train's ``fit``
    installs its own SIGINT handler, a "graceful" abort that took 12 s and ended in exit code
    1; off it, Ctrl-C reaches this wait as ``KeyboardInterrupt`` at once, and the job ends
    (the embedded Ray stops with the process; a cluster ends the driver's actors). Checkpoints
    are written whole or not at all, so nothing torn is left."""
    outcome: dict = {}

    def target() -> None:
        try:
            fit()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="salient-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]


def _interrupted(config: TrainConfig) -> Interrupted:
    """Stop the workers at their next step; what is left: the latest checkpoint, and the
    command that resumes from it."""
    request_stop(config.run_dir)
    latest = latest_checkpoint(config.run_dir)
    run_config = shlex.quote(str(Path(config.run_dir) / "config.json"))
    if latest is None:
        return Interrupted(
            f"no checkpoint yet (the first follows epoch {min(config.save_every, config.epochs)})",
            f"salient train --config {run_config}",
        )
    epoch = int(latest.stem.split("-")[1])
    return Interrupted(
        f"{latest} (epoch {epoch} of {config.epochs}) and the run's metrics",
        f"salient train --config {run_config} --resume",
    )


def _remove_group(name: str) -> None:
    """Give back the refreshes' placement group (rank 0 reserved it) when the run ends."""
    import ray
    from ray.util import get_placement_group

    with contextlib.suppress(ValueError):  # never reserved: the run made no refresh
        ray.util.remove_placement_group(get_placement_group(name))


def _worker_main(args: dict) -> None:
    """Each Ray Train worker: quiet Ray Train's per-report INFO line, then train.

    Ray Train logs "Reporting training result …" (per report, per rank) under a logger named
    after its source file, outside ``ray.train``, so RunConfig's log level misses it; the
    job's summary and metrics.jsonl already hold those numbers.
    """
    urls.adopt(args["storage"])  # the driver's --storage-option values, before any read
    plain_warnings("train")  # printed through Ray on the driver's console
    # the driver's console names each damaged map chunk from the epoch records: the loader's
    # own warning would only repeat it, with Ray's prefix and a source line
    warnings.filterwarnings("ignore", message="damaged map chunk", category=UserWarning)
    try:  # a private module: if a Ray release moves it, the line simply shows again
        from ray.train.v2._internal.execution import context
    except ImportError:
        pass
    else:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    try:
        train_loop_per_worker(args)
    except (SalientError, RunStopped, KeyboardInterrupt):
        # a user's error (a changed shard, a full disk), or Ctrl-C (the driver's stop request,
        # or the terminal's SIGINT reaching this worker in its process group): the driver
        # prints its one line, and Ray Train's "Error in training function:" traceback, logged
        # as this raise leaves the function, would only bury it (it printed above the Ctrl-C
        # line when the worker stopped before the driver's line); a bug's traceback still shows
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
        raise


def _summary(config: TrainConfig, resume_from: str | None, seconds: float, run_id: str) -> dict:
    records = read_records(Path(config.run_dir) / METRICS)
    epochs = [r for r in records if r["kind"] == "epoch"]
    last = epochs[-1] if epochs else {}
    return {
        "run_dir": str(Path(config.run_dir).resolve()),
        "model": config.model,
        "family": config.framework,
        "strategy": config.strategy,
        "workers": config.workers,
        "epochs_done": last.get("epochs_done", 0),
        "steps": last.get("step", 0),
        "loss": last.get("loss"),
        **{k: v for k, v in last.items() if k.startswith("loss_")},  # the family's losses
        "img_per_s": last.get("img_per_s"),
        "generation": last.get("generation"),
        "refreshes": [r["generation"] for r in records if r["kind"] == "refresh"],
        "knn": {r["epochs_done"]: r["knn"]["cls"]["top1"] for r in records if r["kind"] == "eval"},
        "checkpoint": str(latest_checkpoint(config.run_dir)),
        "resumed_from": resume_from,
        "restarts": max(
            0, sum(r["kind"] == "start" and r.get("run") == run_id for r in records) - 1
        ),
        "seconds": round(seconds, 2),
    }


def run_train(config: TrainConfig, progress: bool | None = None) -> dict:
    """Run (or ``resume``) training; returns a JSON summary of the run.

    ``progress``: False shows nothing; by default one bar over the run's steps on a terminal
    (or with SALIENT_PROGRESS=1) and, without one, a line every few seconds, both drawn by the
    driver from rank 0's logs (``salient.jobs.train.console``).

    Summary: ``epochs_done``, ``steps`` (global optimiser steps), ``loss`` and ``img_per_s``
    of the last epoch, ``generation`` it used, ``refreshes`` (generations this run's refreshes
    published), ``knn`` (epochs done -> k-NN top-1 of the CLS token, with ``val``),
    ``checkpoint`` (the latest), ``resumed_from``, ``restarts`` (after lost
    workers), ``seconds``.

    Raises:
        TrainError, DatasetError, StoreError, CheckpointError, RayConnectError,
            PlacementError: before any work when the inputs do not fit together or the
            workers fit on no node; any of our errors raised in a worker (a diverged loss, a
            refresh that fails), as itself; TrainError when workers were lost more often
            than ``max_failures``.
    """
    start = time.perf_counter()
    config = resolved(config)
    resume_from, steps = _check_inputs(config)
    config = _with_map_heads(config)
    for note in config.schedule_warnings(steps // config.accum_steps):
        warnings.warn(note, stacklevel=2)
    ensure_ray(config.address)
    resources = _plan(config)
    os.makedirs(config.run_dir, exist_ok=True)
    Path(config.run_dir, "config.json").write_text(json.dumps(config.as_dict(), indent=2))
    mode = progress_mode() if progress is not False else "off"
    run_id = uuid.uuid4().hex[:12]
    with TrainConsole(config, steps, mode):
        _fit(config, resume_from, resources, run_id)
    return _summary(config, resume_from, time.perf_counter() - start, run_id)
