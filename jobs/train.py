"""``salient train``: MAE / SimMIM pretraining on Ray Train, with the periodic saliency refresh.

The driver checks everything before any work (the config, the dataset, the store and its grid,
the run directory, a ``--resume`` checkpoint's model), connects to Ray (embedded local Ray by
default, a cluster with ``--address``), sizes the workers so a refresh fits beside them, and
runs ``salient.jobs.train_worker.train_loop_per_worker`` under Ray Train's ``TorchTrainer``
(gloo on CPU; nccl and bf16 autocast with ``gpu``).

The masking schedule is AMT's (its Sec. "Attention-driven masking and throwing", and its code):
random masking at ``warmup_mask_ratio`` (0.75) for the first ``warmup_epochs`` and until a
generation exists, then ``strategy``. After every ``refresh_every`` epochs past the warmup
(AMT: every 40 epochs) rank 0 launches ``run_refresh`` with the checkpoint just written as
teacher, in a Ray task beside the training (``refresh_wait`` makes training wait for it); the
loader switches to the newest published generation at the next epoch boundary.

With ``val``, rank 0 runs the k-NN probe (``salient.jobs.eval_online``) on the current encoder
every ``eval_every`` epochs and after the last one, and logs it in ``metrics.jsonl``.

Outputs in ``run_dir``: ``config.json`` (the resolved config), ``checkpoint-EEEEE.pt`` after
every epoch, ``metrics.jsonl`` (rank 0: per-epoch records over all ranks, refresh and probe
records) and
``metrics/rank-R.jsonl`` (each rank's per-step records), ``ray/`` (Ray Train's own storage).
On a multi-node cluster ``run_dir`` must be a path every node shares.

:class:`TrainConfig` and its checks live in ``salient.jobs.train_config``; this module
re-exports it and keeps what needs the disk, Ray or the workers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from salient.jobs.train_config import TrainConfig, resolved
from salient.trainer.loop import TrainError

__all__ = ["RefreshLauncher", "TrainConfig", "TrainError", "run_train"]


# ---------------------------------------------------------------- checks before any work


def _check_run_dir(config: TrainConfig) -> str | None:
    """The checkpoint to resume from (``--resume``), or None for a fresh run; refuses mix-ups."""
    from salient.trainer.checkpoint import latest_checkpoint, load_checkpoint

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
    from salient.store import SaliencyStore, store_exists

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
    if not config.refreshes and store.current() is None:
        raise TrainError(
            f"store {config.store} has no published generation and --refresh-every "
            "is 0; run `salient refresh` first or set --refresh-every"
        )


def _check_masking(config: TrainConfig, loader) -> None:
    """One plan of the strategy with ``strategy_options``: unknown options fail here."""
    import torch

    from salient.pipeline.masking import plan_masks

    grid = config.image_size // config.patch_size
    plan_masks(
        config.strategy,
        torch.ones(1, grid * grid),
        config.mask_ratio,
        config.throw_ratio,
        generator=torch.Generator().manual_seed(0),
        **loader.config.strategy_options,
    )


def _check_inputs(config: TrainConfig) -> str | None:
    """Every check that needs the disk; returns the checkpoint to resume from."""
    from salient.jobs.train_worker import loader_configs
    from salient.pipeline.loader import SalientLoader

    loader = SalientLoader(loader_configs(config, 0, config.workers)[1])  # DatasetError,
    _check_masking(config, loader)  # LoaderError (too few samples for the batch), MaskError
    resume_from = _check_run_dir(config)  # first: a --resume mismatch is the root cause
    _check_store(config, loader.dataset)
    if config.val:  # the k-NN probe needs both sets labelled with one class list
        from salient.jobs.eval import check_class_lists
        from salient.pipeline.manifest import open_dataset

        check_class_lists(loader.dataset, open_dataset(config.val))
    return resume_from


def _worker_resources(config: TrainConfig, cpus: float, gpus: float) -> dict[str, float]:
    """Ray resources of one train worker, leaving room for a refresh beside the workers."""
    reserve = config.refresh_workers * config.refresh_cpus if config.refreshes else 0.0
    per_worker = config.cpus_per_worker
    if per_worker is None:  # fractional CPUs on small machines, so a refresh never starves
        per_worker = math.floor(min(1.0, (cpus - reserve) / config.workers) * 100) / 100
    if per_worker <= 0 or per_worker * config.workers + reserve > cpus + 1e-6:
        raise TrainError(
            f"{config.workers} workers × {per_worker} CPUs + {reserve} for the refresh "
            f"do not fit the cluster's {cpus:g} CPUs; lower --workers or "
            "--refresh-cpus"
        )
    resources = {"CPU": per_worker}
    if config.gpu:
        share = 1.0 - config.refresh_gpus if config.refreshes else 1.0
        if gpus < config.workers * share:
            raise TrainError(
                f"--gpu with {config.workers} workers needs {config.workers * share:g} "
                f"GPUs but the Ray cluster has {gpus:g}; lower --workers or drop --gpu"
            )
        resources["GPU"] = share
    return resources


# ---------------------------------------------------------------- the refresh beside training


@dataclass(frozen=True)
class RefreshLauncher:
    """Rank 0 calls it with a checkpoint path: ``run_refresh`` from that teacher in a Ray task.

    The task holds no CPU (it waits on its actors); each refresh actor reserves
    ``cpus`` / ``gpus``, which the train workers left free. Returns the task's ObjectRef,
    whose value is ``run_refresh``'s summary.
    """

    data: str
    store: str
    kind: str
    image_size: int
    batch_size: int
    workers: int
    cpus: float
    gpus: float

    def __call__(self, teacher: str):
        import ray

        from salient.jobs.refresh import RefreshConfig

        config = RefreshConfig(
            data=self.data,
            store=self.store,
            teacher=teacher,
            kind=self.kind,
            image_size=self.image_size,
            batch_size=self.batch_size,
            workers=self.workers,
            cpus_per_worker=self.cpus,
            gpus_per_worker=self.gpus,
        )
        return ray.remote(_refresh_task).options(num_cpus=0, max_retries=0).remote(config)


def _refresh_task(config) -> dict:
    from salient.jobs.refresh import run_refresh

    return run_refresh(config, progress=False)


def _launcher(config: TrainConfig) -> RefreshLauncher | None:
    if not config.refreshes:
        return None
    return RefreshLauncher(
        data=config.data,
        store=config.store,
        kind=config.saliency_kind,
        image_size=config.image_size,
        batch_size=config.refresh_batch_size,
        workers=config.refresh_workers,
        cpus=config.refresh_cpus,
        gpus=config.refresh_gpus if config.gpu else 0.0,
    )


# ---------------------------------------------------------------- the job


def _fit(config: TrainConfig, resume_from: str | None, resources: dict, progress: bool) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(config.run_dir)
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={
            "config": config,
            "resume_from": resume_from,
            "launch_refresh": _launcher(config),
            "progress": progress,
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
            failure_config=FailureConfig(max_failures=0),
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        _reraise_user_error(exc)
        raise


def _worker_main(args: dict) -> None:
    """Each Ray Train worker: quiet Ray Train's per-report INFO line, then train.

    Ray Train logs "Reporting training result …" (per report, per rank) under a logger named
    after its source file, outside ``ray.train``, so RunConfig's log level misses it; the
    job's summary and metrics.jsonl already hold those numbers.
    """
    import logging

    from salient.jobs.train_worker import train_loop_per_worker

    try:  # a private module: if a Ray release moves it, the line simply shows again
        from ray.train.v2._internal.execution import context
    except ImportError:
        pass
    else:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    train_loop_per_worker(args)


def _reraise_user_error(exc: Exception) -> None:
    """A SalientError raised in a worker comes back wrapped by Ray: raise it as our own error."""
    from salient.errors import SalientError

    for _, failure in sorted((getattr(exc, "worker_failures", None) or {}).items()):
        while isinstance(getattr(failure, "cause", None), BaseException):  # RayTaskError
            failure = failure.cause
        if isinstance(failure, SalientError):
            raise failure from exc


def _summary(config: TrainConfig, resume_from: str | None, seconds: float) -> dict:
    from salient.trainer.checkpoint import latest_checkpoint

    records = [
        json.loads(line)
        for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
        if line
    ]
    epochs = [r for r in records if r["kind"] == "epoch"]
    last = epochs[-1] if epochs else {}
    return {
        "run_dir": str(Path(config.run_dir).resolve()),
        "model": config.model,
        "strategy": config.strategy,
        "workers": config.workers,
        "epochs_done": last.get("epochs_done", 0),
        "steps": last.get("step", 0),
        "loss": last.get("loss"),
        "img_per_s": last.get("img_per_s"),
        "generation": last.get("generation"),
        "refreshes": [r["generation"] for r in records if r["kind"] == "refresh"],
        "knn": {r["epochs_done"]: r["knn"]["cls"]["top1"] for r in records if r["kind"] == "eval"},
        "checkpoint": str(latest_checkpoint(config.run_dir)),
        "resumed_from": resume_from,
        "seconds": round(seconds, 2),
    }


def run_train(config: TrainConfig, progress: bool | None = None) -> dict:
    """Run (or ``resume``) training; returns a JSON summary of the run.

    ``progress``: rank 0's step bar; by default only on a terminal (or SALIENT_PROGRESS=1),
    so logs and CI get no bar lines.

    Summary: ``epochs_done``, ``steps`` (global optimiser steps), ``loss`` and ``img_per_s``
    of the last epoch, ``generation`` it used, ``refreshes`` (generations this run's refreshes
    published), ``knn`` (epochs done -> k-NN top-1 of the CLS token, with ``val``),
    ``checkpoint`` (the latest), ``resumed_from``, ``seconds``.

    Raises:
        TrainError, DatasetError, StoreError, CheckpointError, RayConnectError: before any
            work when the inputs do not fit together; TrainError when a worker fails with an
            error the user can fix (a diverged loss, a refresh that fails).
    """
    import time

    from salient.jobs.ray_env import ensure_ray

    start = time.perf_counter()
    config = resolved(config)
    resume_from = _check_inputs(config)
    info = ensure_ray(config.address)
    resources = _worker_resources(config, info.cpus, info.gpus)
    os.makedirs(config.run_dir, exist_ok=True)
    Path(config.run_dir, "config.json").write_text(json.dumps(config.as_dict(), indent=2))
    if progress is None:
        from salient.jobs.progress import progress_wanted

        progress = progress_wanted()
    _fit(config, resume_from, resources, progress)
    return _summary(config, resume_from, time.perf_counter() - start)
