"""What every Ray Train worker runs: the epochs of one DDP training run (``salient train``).

``salient.jobs.train.driver`` hands :func:`train_loop_per_worker` to Ray Train's ``TorchTrainer``
(the function lives in the package so Ray workers can import it: docs/LIBRARY-NOTES.md, "Remote
code lives in the package"). Ray has set up the process group (gloo on CPU, nccl on GPU)
before it runs.

At start every rank restores the run directory's latest checkpoint (rank 0 picks it, all agree):
a ``--resume`` and a restart by Ray Train after a lost worker are the same path, so a restarted
run ends with the same steps as an uninterrupted one. Rank 0 reserves the refreshes' placement
group once the workers run (``RefreshLauncher.reserve``). A worker that stops on one of our
errors records it for the driver (``salient.jobs.train.failure``); the workers of a restart
find it and return at once.

Per epoch, on every rank: rank 0 chooses the generation the epoch reads (``--maps``: the
newest of the run's own, or the store's current one; ``salient.jobs.train.maps``), holds a
reader lease on it so gc cannot remove it, and broadcasts it (the broadcast is also the
barrier that keeps every rank behind rank 0's end-of-epoch work, so a refresh it waited for is
seen by all); the epoch's masking follows AMT's schedule (random at the warmup ratio until the
warmup is over and a generation exists, then the strategy); one epoch is trained
(``salient.trainer.loop``) and its totals summed over ranks, with what it lost (corrupt
images, damaged map chunks) and whose maps it read (``teacher``). Rank 0 then
writes the checkpoint when due (``save_every``, with its encoder exported for timm, the oldest
beyond ``keep_checkpoints`` deleted) and the epoch record and, when the schedule says so,
launches a refresh from that checkpoint; after each refresh publishes, it collects the store's
old generations (``keep_generations``). After a restore, rank 0 resumes the refresh the run
left unpublished, or abandons it when its teacher checkpoint is gone, and says which. When
due, rank 0 also runs the k-NN probe (``--val``, ``salient.jobs.eval.online``). Batches are
moved with ``ray.train.torch.get_device()``: ``prepare_data_loader`` cannot wrap the loader
(docs/LIBRARY-NOTES.md, "Ray Train needs no prepare_data_loader here").

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from salient.errors import SalientError
from salient.jobs.eval.online import OnlineProbe
from salient.jobs.runtime.progress import process_heartbeat
from salient.jobs.runtime.ray_env import user_error
from salient.jobs.runtime.records import METRICS, STEPS, read_records
from salient.jobs.train.config import TrainConfig
from salient.jobs.train.failure import failure_recorded, record_failure, stop_requested
from salient.jobs.train.maps import MapsBinding, left_in_flight, open_store, unpublished_teachers
from salient.jobs.train.tensorboard import TensorBoardSink
from salient.pipeline.epochs import mix_seed
from salient.pipeline.loader import SalientLoader
from salient.store import SaliencyStore
from salient.trainer.checkpoint import (
    checkpoint_path,
    export_encoder,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    unwrap_model,
)
from salient.trainer.family import FAMILIES
from salient.trainer.loop import build_optimizer, param_checksum, train_one_epoch

__all__ = ["RunStopped", "draw_seed", "refresh_due", "train_loop_per_worker", "uses_warmup_masking"]


def uses_warmup_masking(config: TrainConfig, epoch: int, generation: str | None) -> bool:
    """AMT's schedule: a saliency strategy masks at random, at ``warmup_mask_ratio`` (0.75 in
    AMT's code) and without throwing, during the warmup epochs and while no generation exists
    (not iBOT's: ``TrainConfig.random_warmup``)."""
    return config.random_warmup and (epoch < config.warmup_epochs or generation is None)


def refresh_due(config: TrainConfig, epochs_done: int) -> bool:
    """Whether a refresh follows the checkpoint of ``epochs_done`` epochs: every
    ``refresh_every`` epochs from the end of the warmup (AMT: 40, 80, …), never after the last
    epoch (nothing would use it) nor before one (a refresh needs a trained checkpoint)."""
    start = max(config.warmup_epochs, 1)
    return (
        config.refreshes
        and start <= epochs_done < config.epochs
        and (epochs_done - start) % config.refresh_every == 0
    )


class RunStopped(Exception):
    """The driver was stopped (Ctrl-C): this worker stops too, at the end of a step."""


# ---------------------------------------------------------------- logging


class _Log:
    """JSONL metrics: every rank's steps in ``metrics/rank-R.jsonl``; rank 0's epochs and
    refreshes in ``metrics.jsonl`` (``salient.jobs.runtime.records``). Appends, so a resumed run
    continues the same files. Rank 0 also writes every scalar to TensorBoard (``tb``)."""

    def __init__(self, run_dir: Path, rank: int, tb: TensorBoardSink | None = None) -> None:
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        # Open for the whole run (closed in ``close``): one append per step, line-buffered so
        # the driver's console (and a restart) sees each step as soon as it is done.
        steps = run_dir / STEPS.format(rank=rank)
        self._steps = open(steps, "a", buffering=1)  # noqa: SIM115
        self._events = open(run_dir / METRICS, "a") if rank == 0 else None  # noqa: SIM115
        self._tb = tb

    def step(self, record: dict) -> None:
        self._steps.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add(record)

    def event(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self._events.write(json.dumps(record) + "\n")
        self._events.flush()
        if self._tb is not None:
            self._tb.add(record)

    def close(self) -> None:
        self._steps.close()
        if self._events is not None:
            self._events.close()
        if self._tb is not None:
            self._tb.close()


# ---------------------------------------------------------------- the refresh (rank 0)


class _Refresher:
    """At most one refresh in flight, started by ``launch(checkpoint_path, group)`` (a Ray task
    whose actors run in the placement group ``launch.reserve()`` gave, once per start), which
    returns a pending refresh (``done()``, ``result()``: ``salient.jobs.train.driver``).

    ``finish`` waits for it, logs its summary and collects old generations. A refresh that
    failed raises there, so the run stops with the refresh's error; the checkpoints stay and
    ``--resume`` continues.
    """

    def __init__(self, launch, wait: bool, log: _Log, keep_generations: int) -> None:
        self._launch, self._wait, self._log = launch, wait, log
        self._keep = keep_generations
        self._pending: tuple[Any, dict] | None = None
        self._group = launch.reserve() if launch is not None else None

    @property
    def teacher(self) -> str | None:
        """The checkpoint the refresh in flight reads (it must not be pruned)."""
        return None if self._pending is None else self._pending[1]["teacher"]

    def start(self, teacher: Path, epochs_done: int) -> None:
        self.finish()  # the previous one first, so the schedule stays in order
        about = {"teacher": str(teacher), "epochs_done": epochs_done}
        self._log.event({"kind": "refresh_start", **about})
        self._pending = (self._launch(str(teacher), self._group), about)
        if self._wait:
            self.finish()

    def poll(self) -> None:
        """Log a refresh that has finished meanwhile (raises if it failed)."""
        if self._pending is not None and self._pending[0].done():
            self.finish()

    def finish(self) -> None:
        if self._pending is not None:
            pending, about = self._pending
            self._pending = None
            summary = pending.result()  # run_refresh's summary; its "kind" is the map kind
            collected = self._collect(summary["store"])
            self._log.event(
                {
                    **about,
                    **summary,
                    "map_kind": summary.get("kind"),
                    "kind": "refresh",
                    "collected": collected,
                }
            )

    def _collect(self, url: str) -> list[str]:
        """Old generations removed after a publish (README, Decisions, "Bounded disk")."""
        if not self._keep:
            return []

        return SaliencyStore.open(url).gc(keep=self._keep)


def _published_from(store, teacher: Path) -> bool:
    """Whether ``store`` holds a published generation made from the checkpoint ``teacher``."""
    return store is not None and any(
        g.get("status") == "published" and (g.get("teacher") or {}).get("path") == str(teacher)
        for g in store.generations()
    )


# ---------------------------------------------------------------- pieces of a worker


@dataclass
class _State:
    """Where the run stands: completed epochs, global optimiser steps, generation last used."""

    epochs_done: int = 0
    step: int = 0
    generation: str | None = None


def _build(config: TrainConfig, device: torch.device, steps_per_epoch: int):
    """The family's model under DDP (identically initialised on every rank), AdamW, the lr
    schedule, and the family's step hooks."""
    family = FAMILIES[config.framework]
    torch.manual_seed(config.seed)
    model = family.build(**family.settings(config)).to(device)
    optimizer = build_optimizer(model, config.base_lr, config.weight_decay, config.betas)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    schedule = config.lr_schedule(steps_per_epoch)
    return family, ddp, optimizer, schedule, family.hooks(ddp, optimizer)


def _sum_over_ranks(totals: dict, device: torch.device) -> dict:
    """Epoch figures over all ranks; the epoch lasts as long as its slowest rank. The family's
    scalars (``loss_rec``, ``loss_g``, …) are their means over every rank's images."""
    names = sorted(totals["scalar_sums"])  # the family's: the same names on every rank
    sums = torch.tensor(
        [
            totals["images"],
            totals["loss_sum"],
            totals["with_saliency"],
            *(totals["scalar_sums"][name] for name in names),
        ],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(sums)
    seconds = torch.tensor([totals["seconds"]], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    images, loss_sum, with_saliency, *scalars = sums.tolist()
    return {
        "images": int(images),
        "loss": loss_sum / max(images, 1),
        **{name: total / max(images, 1) for name, total in zip(names, scalars)},
        "saliency_share": with_saliency / max(images, 1),
        "img_per_s": images / max(seconds.item(), 1e-9),
        "seconds": seconds.item(),
    }


def draw_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's global generator for ``epoch`` on ``rank``. The draws a family makes
    inside its step from it (AutoMAE's masking and Gumbel noise and pseudo-masks; iBOT seeds
    its drop path per batch itself) differ per rank, as the official ``seed + rank`` (AutoMAE
    main_pretrain.py), and restart with each epoch, so a resumed run draws what an
    uninterrupted one does; the model was built before, from ``seed`` alone, identical on
    every rank."""
    return mix_seed(seed, rank, epoch)


def _agree(value: Any, rank: int) -> Any:
    """Rank 0's ``value`` on every rank (a collective: every rank waits for rank 0 here)."""
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _lost_over_ranks(stats, device: torch.device) -> dict:
    """What the epoch lost, over all ranks (each reads its own ids): samples masked at random
    for want of a map (``fallback``), ids whose image did not decode or whose sample the tar
    did not yield (``corrupt``), ids whose map row sits in a damaged store chunk
    (``corrupt_maps``), and those chunks, each once (``damaged_chunks``)."""
    counts = torch.tensor(
        [stats.fallback, stats.corrupt, stats.corrupt_maps], dtype=torch.int64, device=device
    )
    dist.all_reduce(counts)
    chunks: list = [None] * dist.get_world_size()
    dist.all_gather_object(chunks, [str(d) for d in stats.damaged_chunks])
    fallback, corrupt, corrupt_maps = counts.tolist()
    return {
        "fallback": fallback,
        "corrupt": corrupt,
        "corrupt_maps": corrupt_maps,
        "damaged_chunks": sorted({line for rank in chunks for line in rank}),
    }


def _about(generation: dict) -> dict:
    """The fields of a ``refresh_resumed`` / ``refresh_abandoned`` event."""
    return {
        "generation": generation["generation"],
        "teacher": generation["teacher"],
        "shards_done": generation["shards_done"],
        "shards": generation["shards"],
    }


# ---------------------------------------------------------------- the worker


class _Worker:
    """One rank of the run: its loaders, the DDP model and optimiser, the run's state.

    ``rank`` of ``world`` on ``device`` in an initialised process group; ``report(record)``
    hands each epoch's figures to the launcher (Ray Train's ``report``; a test passes its
    own, so a one-process gloo group runs the schedule without Ray).
    """

    def __init__(
        self,
        args: dict,
        rank: int,
        world: int,
        device: torch.device,
        report: Callable[[dict], None],
    ) -> None:
        self.config: TrainConfig = args["config"]
        self.rank, self.device, self.report = rank, device, report
        self.warmup_loader, self.loader = (
            SalientLoader(self.config.loader_config(rank, world, str(device), warmup))
            for warmup in (True, False)
        )
        self.steps_per_epoch = len(self.loader) // self.config.accum_steps
        self.family, self.model, self.optimizer, self.schedule, self.hooks = _build(
            self.config, self.device, self.steps_per_epoch
        )
        # a --resume and a restart after a lost worker alike: the latest checkpoint, on all ranks
        latest = latest_checkpoint(self.config.run_dir) if self.rank == 0 else None
        self.restored = _agree(None if latest is None else str(latest), self.rank)
        self.state = self._restore(self.restored)
        tb = None
        if self.rank == 0:
            tb = TensorBoardSink(self.config.run_dir, self.steps_per_epoch, self.state.step)
        self.log = _Log(Path(self.config.run_dir), self.rank, tb)
        self.run_id = args.get("run_id")
        launch = args["launch_refresh"] if self.rank == 0 else None
        self.refresher = _Refresher(
            launch, self.config.refresh_wait, self.log, self.config.keep_generations
        )
        self.probe = OnlineProbe.for_config(self.config) if self.rank == 0 else None
        self.maps = MapsBinding(self.config, self.log.event) if self.rank == 0 else None

    def _restore(self, path: str | None) -> _State:
        if path is None:
            return _State()
        ckpt = load_checkpoint(
            path, self.model, self.optimizer, self.schedule, config=self.config.as_dict()
        )
        self.hooks.load_state_dict(ckpt.get("hooks") or {})
        return _State(ckpt["epoch"], ckpt["step"], ckpt["generation"])

    def run(self) -> None:
        config = self.config
        if self.rank == 0:
            self._log_start()
            if self.restored is not None:
                self._resume_refresh()
        for epoch in range(self.state.epochs_done, config.epochs):
            record = self._train_epoch(epoch)
            if self.rank == 0:
                self._end_of_epoch(record)
            self.report({k: v for k, v in record.items() if k != "kind"})
            if config.stop_after_epochs == self.state.epochs_done:
                return  # as if killed right after this checkpoint: no refresh, no wait
        if self.rank == 0:
            self.refresher.finish()  # a refresh still running publishes before the run ends

    def _train_epoch(self, epoch: int) -> dict:
        """Train ``epoch`` on this rank; returns the epoch record (figures over all ranks)."""
        bound = _agree(self._bind(epoch) if self.rank == 0 else None, self.rank)
        current = None if bound is None else bound["generation"]
        warmup = uses_warmup_masking(self.config, epoch, current)
        loader = self.warmup_loader if warmup else self.loader
        if self.rank == 0 and bound is not None and loader.reads_maps:
            self.maps.tell(bound)  # one line when the maps are another teacher's
        torch.manual_seed(draw_seed(self.config.seed, self.rank, epoch))
        totals = train_one_epoch(
            self.model,
            self.optimizer,
            self.schedule,
            loader.epoch(epoch, generation=current),
            epoch=epoch,
            step=self.state.step,
            device=self.device,
            bf16=self.config.gpu,
            clip_grad=self.config.clip_grad or None,
            accum_iter=self.config.accum_steps,
            on_step=self._step_logger(epoch),
            family=self.family,
            hooks=self.hooks,
            steps_per_epoch=self.steps_per_epoch,
        )
        masking = loader.config
        self.state = _State(epoch + 1, totals["step"], loader.stats.generation)
        return {
            "kind": "epoch",
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "step": totals["step"],
            "strategy": masking.strategy,
            "mask_ratio": masking.mask_ratio,
            "throw_ratio": masking.throw_ratio,
            "generation": loader.stats.generation,
            "lr": self.optimizer.param_groups[0]["lr"],
            **_sum_over_ranks(totals, self.device),
            **self._maps(),
            **_lost_over_ranks(loader.stats, self.device),
            "teacher": bound["teacher"] if loader.stats.generation is not None else None,
        }

    def _maps(self) -> dict:
        """Where the epoch's maps came from (``TrainConfig.maps_from``): with iBOT's online source
        the loader reads no map, so no share of samples with one is measured."""
        maps = self.config.maps_from
        return {"maps": maps, "saliency_share": None} if maps == "online" else {"maps": maps}

    def _bind(self, epoch: int) -> dict | None:
        """Rank 0: the generation ``epoch`` reads (held by a reader lease), or None when the
        epoch reads no maps (a warmup epoch; a loader without maps) or there is none to read
        (``salient.jobs.train.maps``)."""
        warmup = self.config.random_warmup and epoch < self.config.warmup_epochs
        if not self.loader.reads_maps or warmup:
            self.maps.close()
            return None
        return self.maps.choose()

    def _step_logger(self, epoch: int) -> Callable[[dict, dict], None]:
        def on_step(record: dict, batch: dict) -> None:
            if stop_requested(self.config.run_dir):  # the driver was stopped by Ctrl-C
                raise RunStopped(f"stopped by the driver at step {record['step']}")
            record = {"kind": "step", "epoch": epoch, "rank": self.rank, **record}
            if self.config.log_details:
                record["ids"] = batch["ids"].tolist()
                record["checksum"] = param_checksum(self.model)
                record["pid"] = os.getpid()
            self.log.step(record)
            if self.config.step_delay_s:
                time.sleep(self.config.step_delay_s)  # a testing aid: the window to kill us in

        return on_step

    def _end_of_epoch(self, record: dict) -> None:
        """Rank 0: the checkpoint when due, the epoch record, the refresh the schedule asks
        for, then the old checkpoints pruned."""
        config, state = self.config, self.state
        refresh = (
            refresh_due(config, state.epochs_done) and config.stop_after_epochs != state.epochs_done
        )
        path = None
        if refresh or config.checkpoint_due(state.epochs_done):
            path = self._save()
        self.log.event({**record, "checkpoint": None if path is None else str(path)})
        if refresh:
            self.refresher.start(path, state.epochs_done)
        else:
            self.refresher.poll()
        if path is not None:  # never the teacher of a refresh in flight or unpublished
            protect = [self.refresher.teacher] if self.refresher.teacher else []
            protect += unpublished_teachers(open_store(config.store), config.run_dir)
            prune_checkpoints(config.run_dir, config.keep_checkpoints, protect)
        if self.probe is not None and self.probe.due(state.epochs_done):
            # After a refresh starts, so the two overlap; the other ranks wait at the next
            # collective meanwhile (README, Decisions: the probe during training).
            encoder = unwrap_model(self.model).encoder
            self.log.event(self.probe.run(encoder, self.device, state.epochs_done))

    def _save(self) -> Path:
        """The checkpoint of the epochs done, and its encoder exported for timm."""
        config, state = self.config, self.state
        path = save_checkpoint(
            checkpoint_path(config.run_dir, state.epochs_done),
            self.model,
            self.optimizer,
            self.schedule,
            state.epochs_done,
            state.step,
            state.generation,
            config.as_dict(),
            self.hooks.state_dict(),
        )
        export_encoder(path)
        return path

    def _log_start(self) -> None:
        """Rank 0: a start record; ``restart`` when this run of the driver started before."""
        earlier = read_records(Path(self.config.run_dir) / METRICS)
        restart = any(r["kind"] == "start" and r.get("run") == self.run_id for r in earlier)
        self.log.event(
            {
                "kind": "start",
                "run": self.run_id,
                "from": self.restored,
                "epochs_done": self.state.epochs_done,
                "restart": restart,
            }
        )

    def _resume_refresh(self) -> None:
        """After a restore: resume the refresh the run left unpublished (the newest whose
        teacher checkpoint exists) and abandon the others, each logged and said; then
        relaunch the refresh due after the restored checkpoint if it never published
        (``refresh_rerun``: the run stopped before it began a generation)."""
        store = open_store(self.config.store) if self.config.refreshes else None
        left = left_in_flight(store, self.config.run_dir)
        resumable = [g for g in left if g["teacher_exists"] or g["live"]]
        resumed = resumable[-1] if resumable else None
        for gen in left:
            if gen is resumed or gen["live"]:
                continue
            why = "its teacher is gone" if not gen["teacher_exists"] else "a newer one resumes"
            store.resume_generation(gen["generation"]).abandon()
            self.log.event({"kind": "refresh_abandoned", **_about(gen), "reason": why})
        if resumed is not None:
            self.log.event({"kind": "refresh_resumed", **_about(resumed)})
            self.refresher.start(Path(resumed["teacher"]), resumed["epochs_done"])
        teacher = checkpoint_path(self.config.run_dir, self.state.epochs_done)
        if (
            refresh_due(self.config, self.state.epochs_done)
            and not _published_from(open_store(self.config.store), teacher)
            and (resumed is None or Path(resumed["teacher"]) != teacher)
        ):  # killed before that refresh began its generation: nothing to resume, run it
            done = self.state.epochs_done
            self.log.event({"kind": "refresh_rerun", "teacher": str(teacher), "epochs_done": done})
            self.refresher.start(teacher, self.state.epochs_done)

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()  # the reader lease: gc may collect the generation from now on
        self.log.close()


def train_loop_per_worker(args: dict) -> None:
    """Ray Train's per-worker function. ``args``: ``config`` (a ``TrainConfig``),
    ``resume_from`` (the checkpoint the driver checked, or None), ``launch_refresh`` (a
    ``RefreshLauncher`` or None), ``run_id`` (the driver's run, to tell a restart from a
    start). Workers draw no progress: the driver's console follows rank 0's logs.

    Our errors are recorded before they are raised, and a restart after one returns at once
    (``salient.jobs.train.failure``).
    """

    run_dir = args["config"].run_dir
    if failure_recorded(run_dir) or stop_requested(run_dir):
        return  # an earlier attempt stopped on an error a restart would only repeat, or Ctrl-C
    import ray.train.torch  # lazily, as everywhere: Ray's environment is set before its import

    worker = None
    process_heartbeat("train")  # a line while this rank waits on storage
    try:
        device = ray.train.torch.get_device()
        world = (dist.get_rank(), dist.get_world_size())
        worker = _Worker(args, *world, device, ray.train.report)
        worker.run()
    except SalientError as exc:  # also a RayTaskError wrapping one (a failed refresh)
        record_failure(run_dir, user_error(exc) or exc)
        raise
    finally:
        if worker is not None:
            worker.close()
