"""``salient bench quality``: does attention-guided masking help? AMT against random masking.

One machine trains the same model on the same demo data with the same seed, number of epochs
and learning-rate schedule, in arms that differ only in their masks:

- ``random`` — MAE with random 75 % masking every epoch (MAE);
- ``amt`` — MAE with AMT 45 % masked / 40 % thrown after ``warmup`` epochs of random 75 %,
  its maps refreshed by the model itself every ``refresh_every`` epochs (AMT; refreshes are
  waited for, so the run is deterministic and its wall time includes them);
- ``teacher`` (``label_teacher=True``) — AMT 45/40 on the fixed maps of a label-aware teacher:
  a ViT trained here on the demo labels and put through ``salient refresh`` once. It
  separates "does attention-guided masking help when the attention is right?" from "is the
  self-teacher's attention right yet?".

For each arm: k-NN and linear top-1 on the held-out demo split (``salient eval``: CLS and
mean patch token; the random arm's initial encoder is the shared baseline, since every arm
starts from the same init), the box lift and hit share of maps computed from its final
checkpoint (a refresh, ``cls_attn``), its time (``wall_s``: the whole ``run_train``;
``train_s``: from the first epoch's start to the last one's end, refreshes waited for
included, Ray Train's start-up not); for ``amt``, the box lift of every generation it trained
on. And the amt arm's accuracy at the time the random arm took (``train_s``): the checkpoint
of the last amt epoch that ended by then (all of them when amt was faster, marked
``amt_finished_first``: it then had time left).

Default: 2,000 demo scenes (held out: 500), MAE-Tiny, 64 px crops, 8 px patches, 8 epochs,
sized from ``make demo``'s timings (~25 s an epoch on a quiet 2-core machine) to end well
within 30 minutes there (BENCHMARKS.md has the measured run); ``epochs``, ``n``,
``image_size`` scale it up.
``quick``: the micro model on 96 scenes for a smoke run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from salient.jobs.bench.label_teacher import train_label_teacher
from salient.jobs.eval.driver import EvalConfig, run_eval
from salient.jobs.inspect.driver import generation_stats
from salient.jobs.refresh.driver import RefreshConfig, run_refresh
from salient.jobs.train.driver import TrainConfig, run_train
from salient.pipeline.ingest import ingest_demo
from salient.trainer.checkpoint import checkpoint_path

__all__ = ["bench_quality", "equal_time_epoch"]


@dataclass(frozen=True)
class _Setup:
    model: str
    n: int
    val_n: int
    scene_size: int
    image_size: int
    patch_size: int
    epochs: int
    warmup: int
    refresh_every: int
    batch_size: int
    shard_size: int
    workers: int
    gpu: bool


def _setup(device: str, quick: bool, epochs, n, image_size) -> _Setup:
    if quick:
        setup = _Setup("mae-micro", 96, 48, 64, 32, 8, 2, 1, 1, 8, 32, 2, False)
    elif device.startswith("cuda"):
        setup = _Setup("mae-base", 20000, 5000, 256, 224, 16, 40, 8, 8, 128, 1000, 1, True)
    else:
        setup = _Setup("mae-tiny", 2000, 500, 192, 64, 8, 8, 2, 2, 64, 500, 2, False)
    overrides = {"epochs": epochs, "n": n, "image_size": image_size}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    return replace(setup, val_n=max(16, setup.n // 4), warmup=min(setup.warmup, setup.epochs - 1))


# ---------------------------------------------------------------- data and arms


def _ingest(root: Path, setup: _Setup) -> tuple[str, str]:
    for split, n in (("train", setup.n), ("val", setup.val_n)):
        ingest_demo(
            root / split,
            n=n,
            seed=0,
            shard_size=setup.shard_size,
            image_size=setup.scene_size,
            split=split,
        )
    return str(root / "train"), str(root / "val")


def _train_config(root: Path, setup: _Setup, data: str, arm: str):
    """One arm's TrainConfig: everything but the masks is shared."""

    shared = dict(
        data=data,
        model=setup.model,
        epochs=setup.epochs,
        lr_warmup_epochs=setup.warmup,  # one lr schedule for every arm
        workers=setup.workers,
        gpu=setup.gpu,
        run_dir=str(root / arm / "run"),
        batch_size=setup.batch_size,
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        seed=0,
        loader_workers=1,
        refresh_batch_size=128,
        keep_checkpoints=0,  # every epoch's checkpoint: the equal-time probe picks one
        keep_generations=0,  # every generation: their box lifts are reported
    )
    if arm == "random":
        return TrainConfig(strategy="random", mask_ratio=0.75, throw_ratio=0.0, **shared)
    store = str(root / arm / "s.zarr")
    masks = dict(strategy="amt", mask_ratio=0.45, throw_ratio=0.40, store=store)  # AMT Sec. 4
    if arm == "amt":
        return TrainConfig(
            warmup_epochs=setup.warmup,
            refresh_every=setup.refresh_every,
            refresh_wait=True,
            **masks,
            **shared,
        )
    return TrainConfig(warmup_epochs=setup.warmup, refresh_every=0, **masks, **shared)


def _train(config) -> dict:
    """Run one arm; its summary, wall time and the wall time at each epoch's end."""

    start = time.time()
    summary = run_train(config, progress=False)
    wall = time.time() - start
    records = [
        json.loads(line)
        for line in (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
        if line
    ]
    epochs = [r for r in records if r["kind"] == "epoch"]
    refreshes = [r for r in records if r["kind"] == "refresh"]
    # The clock starts when the first epoch does: Ray Train's start-up (~20 s, longer for the
    # first run in a process) is not the masking's cost; the refreshes waited for are.
    first_start = epochs[0]["time"] - epochs[0]["seconds"]
    epoch_end_s = [round(r["time"] - first_start, 1) for r in epochs]
    return {
        "summary": summary,
        "wall_s": round(wall, 1),
        "epoch_end_s": epoch_end_s,
        "train_s": epoch_end_s[-1],
        "refresh_s": round(sum(r.get("seconds", 0.0) for r in refreshes), 1),
        "loss": [round(r["loss"], 5) for r in epochs],
    }


def equal_time_epoch(epoch_end_s: list[float], budget_s: float) -> tuple[int, bool]:
    """The number of epochs a run had finished within ``budget_s`` seconds of its start (at
    least 1), and whether it finished every epoch within it."""
    done = sum(1 for t in epoch_end_s if t <= budget_s)
    return max(done, 1), done == len(epoch_end_s)


# ---------------------------------------------------------------- measuring an arm


def _probe(root: Path, setup: _Setup, data: str, val: str, checkpoint: str, baseline=False):
    result = run_eval(
        EvalConfig(
            checkpoint=checkpoint,
            data=data,
            val=val,
            out=str(root / "eval"),
            baseline=baseline,
            image_size=setup.image_size,
            batch_size=128,
            workers=setup.workers,
            gpus_per_worker=1.0 if setup.gpu else 0.0,
        )
    )

    def top1(r: dict) -> dict:
        return {
            f"{probe}_{kind}": round(r[probe][kind]["top1"], 4)
            for probe in ("knn", "linear")
            for kind in ("cls", "mean")
        }

    return top1(result), (top1(result["baseline"]) if baseline else None), result["chance"]


def _box(stats: dict) -> dict:
    box = stats.get("box") or {}
    return {"lift": _round(box.get("lift_mean")), "hit_share": _round(box.get("hit_share"))}


def _round(value, digits: int = 4):
    return None if value is None else round(value, digits)


def _final_maps(root: Path, setup: _Setup, data: str, arm: str, checkpoint: str) -> dict:
    """Box lift and hit share of the CLS-attention maps of ``checkpoint``'s encoder."""

    store = str(root / arm / "final.zarr")
    run_refresh(
        RefreshConfig(
            data=data,
            store=store,
            teacher=checkpoint,
            image_size=setup.image_size,
            batch_size=128,
            workers=setup.workers,
            gpus_per_worker=1.0 if setup.gpu else 0.0,
        ),
        progress=False,
    )
    return _box(next(iter(generation_stats(store, data).values())))


def _measure(root, setup, data, val, arm: str, run: dict) -> dict:
    checkpoint = run["summary"]["checkpoint"]
    top1, baseline, chance = _probe(root, setup, data, val, checkpoint, arm == "random")
    out = {
        **top1,
        "final_maps": _final_maps(root, setup, data, arm, checkpoint),
        "wall_s": run["wall_s"],
        "train_s": run["train_s"],
        "refresh_s": run["refresh_s"],
        "loss": run["loss"],
    }
    if arm != "random":
        store = str(root / arm / "s.zarr")
        out["generations"] = {
            name: _box(stats) for name, stats in generation_stats(store, data).items()
        }
    return out, baseline, chance


# ---------------------------------------------------------------- the label-aware teacher


def _label_teacher(root: Path, setup: _Setup, data: str, val: str) -> dict:
    """A ViT trained on the demo labels (whole image squashed to S×S, as refresh shows it),
    saved as a checkpoint refresh loads, and its maps refreshed once into the arm's store."""

    path = root / "teacher" / "checkpoint-label.pt"
    teacher = train_label_teacher(data, val, path, setup.model, setup.image_size, setup.patch_size)
    run_refresh(
        RefreshConfig(
            data=data,
            store=str(root / "teacher" / "s.zarr"),
            teacher=str(path),
            image_size=setup.image_size,
            batch_size=128,
            workers=setup.workers,
        ),
        progress=False,
    )
    return teacher


# ---------------------------------------------------------------- the bench


def bench_quality(
    quick: bool = False,
    device: str = "cpu",
    epochs: int | None = None,
    n: int | None = None,
    image_size: int | None = None,
    label_teacher: bool = False,
    keep: str | None = None,
) -> dict:
    """Train the arms, probe them, map them; returns the figures (module docstring).

    ``keep``: a directory to keep the runs in (by default a temporary one, removed after).
    """
    setup = _setup(device, quick, epochs, n, image_size)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="salient-bench-quality-"))
    start = time.perf_counter()
    try:
        data, val = _ingest(root, setup)
        arms = ["random", "amt"] + (["teacher"] if label_teacher else [])
        teacher = _label_teacher(root, setup, data, val) if label_teacher else None
        runs = {arm: _train(_train_config(root, setup, data, arm)) for arm in arms}
        results, baseline, chance = {}, None, None
        for arm in arms:
            results[arm], init, chance = _measure(root, setup, data, val, arm, runs[arm])
            baseline = baseline or init
        results["amt_at_random_wall_time"] = _equal_time(root, setup, data, val, runs)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "setup": {**setup.__dict__, "refresh_wait": True},
        "chance": chance,
        "random_init": baseline,
        "arms": results,
        "label_teacher": teacher,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _equal_time(root, setup, data, val, runs: dict) -> dict:
    """The amt arm's probes at the checkpoint of the last epoch it ended within random's wall
    time."""

    amt, budget = runs["amt"], runs["random"]["train_s"]
    epoch, finished = equal_time_epoch(amt["epoch_end_s"], budget)
    checkpoint = str(checkpoint_path(Path(amt["summary"]["run_dir"]), epoch))
    top1, _, _ = _probe(root, setup, data, val, checkpoint)
    return {"epochs_done": epoch, "budget_s": budget, "amt_finished_first": finished, **top1}
