"""The train worker without Ray: one rank in a gloo process group, its refreshes run in this
process by the refresh job's own pieces (prepare, the refresh actor's class, publish).

What Ray Train and Ray tasks add (placement, restarts, DDP over several processes) is covered
in test_train.py and test_cluster.py; here, in seconds, the schedule itself: which epochs warm
up, when a refresh starts and from which checkpoint, which generation each epoch binds, and
which checkpoints survive pruning (never the teacher of a refresh in flight).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from salient.jobs.refresh.driver import prepare_refresh, worker_spec
from salient.jobs.refresh.worker import RefreshWorker
from salient.jobs.train.config import TrainConfig
from salient.jobs.train.driver import with_box_figures
from salient.jobs.train.worker import _Worker, refresh_due
from salient.store import SaliencyStore


@dataclass
class _Done:
    summary: dict

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        return self.summary


class InProcessRefresh:
    """A refresh launcher that runs the run's refresh here, shard by shard, without Ray."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.teachers = config, []

    def reserve(self):
        return None

    def __call__(self, teacher: str, group) -> _Done:
        refresh = self.config.refresh_config(teacher)
        prepared = prepare_refresh(refresh)
        spec = worker_spec(refresh, prepared.teacher, prepared.spec, prepared.writer.name)
        actor = RefreshWorker(prepared.teacher.model, spec)
        for shard in prepared.dataset.shards:
            actor.compute_shard(shard.index, prepared.dataset.source(shard))
        prepared.writer.publish()
        self.teachers.append(Path(teacher).name)
        summary = {"store": refresh.store, "generation": prepared.writer.name, "kind": "cls_attn"}
        return _Done(with_box_figures(refresh, summary))  # as the refresh's Ray task does


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_follows_amts_schedule_refreshes_and_prunes(demo_data, tmp_path, process_group):
    config = TrainConfig(
        data=str(demo_data),
        store=str(tmp_path / "saliency.zarr"),
        run_dir=str(tmp_path / "run"),
        model="mae-micro",
        strategy="amt",
        epochs=4,
        warmup_epochs=1,
        refresh_every=1,
        keep_checkpoints=1,
        keep_generations=2,
        batch_size=16,
        image_size=32,
        patch_size=8,
        lr=1e-3,
        loader_workers=0,
        refresh_batch_size=32,
    )
    Path(config.run_dir).mkdir()
    Path(config.run_dir, "metrics.jsonl").touch()
    launcher, reports = InProcessRefresh(config), []
    args = {"config": config, "launch_refresh": launcher, "run_id": "t"}
    worker = _Worker(args, 0, 1, torch.device("cpu"), reports.append)
    try:
        worker.run()
    finally:
        worker.close()

    due = [e for e in range(1, config.epochs + 1) if refresh_due(config, e)]
    assert due == [1, 2, 3]  # after the warmup epoch, every epoch but the last
    assert launcher.teachers == [f"checkpoint-{e:05d}.pt" for e in due]
    # epoch 1 warms up at random; each later epoch binds the generation the refresh before
    # it published (refresh_wait is off, but this launcher's refresh is done at once)
    assert [r["generation"] for r in reports] == [None, "gen-000001", "gen-000002", "gen-000003"]
    assert [r["strategy"] for r in reports] == ["random", "amt", "amt", "amt"]
    assert [r["mask_ratio"] for r in reports] == [0.75, 0.45, 0.45, 0.45]
    records = [
        json.loads(line) for line in Path(config.run_dir, "metrics.jsonl").read_text().splitlines()
    ]
    refreshes = [r for r in records if r["kind"] == "refresh"]
    assert [r["generation"] for r in refreshes] == ["gen-000001", "gen-000002", "gen-000003"]
    # keep_generations=2 keeps the first one too: it was replaced less than the grace period
    # (an hour) ago, so a reader may still be bound to it
    assert [r["collected"] for r in refreshes] == [[], [], []]
    store = SaliencyStore.open(config.store)
    assert store.current() == "gen-000003"
    assert [g["name"] for g in store.generations()] == ["gen-000001", "gen-000002", "gen-000003"]
    # keep_checkpoints=1: only the newest checkpoint, with its exported encoder
    kept = sorted(p.name for p in Path(config.run_dir).glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00004.pt"]
    assert Path(config.run_dir, "encoder-00004", "model.safetensors").is_file()
    _check_tensorboard(Path(config.run_dir), records)
    _check_console(config, records)


def _check_console(config: TrainConfig, records: list[dict]) -> None:
    """The driver's console over this run's logs, without a terminal: a progress line with
    1-based epochs and an ETA, then every epoch and refresh as a line of its own."""
    import io
    import os

    from salient.jobs.train.console import TrainConsole

    os.environ["SALIENT_PROGRESS_EVERY"] = "0"
    try:
        out = io.StringIO()
        console = TrainConsole(config, 96 // 16, "lines", stream=out)
        console._steps.records()  # the run's steps were seen: the next poll shows one line
        console.poll()
    finally:
        del os.environ["SALIENT_PROGRESS_EVERY"]
    lines = out.getvalue().splitlines()
    assert (
        all(line.startswith("salient train: ") for line in lines) and "pid=" not in out.getvalue()
    )
    epochs = [r for r in records if r["kind"] == "epoch"]
    shown = [line for line in lines if " done · " in line]
    assert [line.split("epoch ")[1].split(" done")[0] for line in shown] == [
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ]
    assert all(f"loss {r['loss']:.4g}" in line for r, line in zip(epochs, shown))
    refreshes = [line for line in lines if "refresh from epoch" in line]
    assert [line.split("published ")[1].split(" ")[0] for line in refreshes] == [
        "gen-000001",
        "gen-000002",
        "gen-000003",
    ]
    assert all("box lift" in line for line in refreshes)


def _check_tensorboard(run_dir: Path, records: list[dict]) -> None:
    """RUN/tb/ holds every scalar of the run's records, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()

    def curve(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in tb.Scalars(tag)]

    steps = [
        json.loads(line) for line in (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()
    ]
    assert curve("step/loss") == [(s["step"], pytest.approx(s["loss"])) for s in steps]
    epochs = [r for r in records if r["kind"] == "epoch"]
    for tag in ("loss", "lr", "img_per_s", "saliency_share"):
        assert curve(f"epoch/{tag}") == [(r["step"], pytest.approx(r[tag])) for r in epochs]
    per_epoch = epochs[0]["step"]
    bound = [(r["step"], int(r["generation"][4:])) for r in epochs if r["generation"]]
    assert curve("epoch/generation") == bound  # gen-000002 -> 2; None (the warmup) is left out
    refreshes = [r for r in records if r["kind"] == "refresh"]
    lifts = curve("refresh/box/lift_mean")  # the demo set has object boxes
    assert lifts == [
        (r["epochs_done"] * per_epoch, pytest.approx(r["box"]["lift_mean"])) for r in refreshes
    ]
    assert all(v > 0 for _, v in lifts)


def test_the_console_shows_epochs_from_one_rate_and_eta_and_events_above_its_bar(
    tmp_path, monkeypatch
):
    """Records written by the worker's own log, read by the driver's console: off a terminal
    one progress line (epoch 1-based, step in it, img/s over the workers, ETA); on one a bar
    over the run's steps, with the epoch's line printed above it."""
    import io

    from salient.jobs.train.console import TrainConsole
    from salient.jobs.train.worker import _Log

    monkeypatch.setenv("SALIENT_PROGRESS_EVERY", "0")
    config = TrainConfig(data="d", strategy="random", epochs=3, run_dir=str(tmp_path), workers=2)
    log = _Log(tmp_path, 0)
    try:
        lines, drawn = io.StringIO(), io.StringIO()
        plain = TrainConsole(config, 4, "lines", stream=lines)  # 4 batches: 4 steps an epoch
        bar = TrainConsole(config, 4, "bar", stream=drawn)
        log.event({"kind": "start", "run": "r", "from": None, "epochs_done": 0, "restart": False})
        for step in range(1, 6):
            epoch = (step - 1) // 4
            log.step(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "rank": 0,
                    "step": step,
                    "loss": 0.5,
                    "img_per_s": 10.0,
                    "generation": None,
                }
            )
            if step == 4:
                log.event(
                    {
                        "kind": "epoch",
                        "epoch": 0,
                        "epochs_done": 1,
                        "step": 4,
                        "loss": 0.5,
                        "img_per_s": 19.5,
                        "generation": None,
                        "corrupt_maps": 2,
                        "damaged_chunks": ["saliency/0.0"],
                    }
                )
        for console in (plain, bar):
            console.poll()
        bar._view.close()
    finally:
        log.close()
    text = lines.getvalue().splitlines()
    assert text[0] == (  # what the epoch lost: a notice of its own, the chunk named once
        "salient train: damaged saliency/0.0: its rows read as no map (masked at random, counted)"
    )
    assert text[1].startswith(
        "salient train: epoch 1/3 done · img/s 19.5 · loss 0.5 · generation none"
        " · corrupt maps 2 · eta "
    )
    assert text[2].startswith(
        "salient train: epoch 2/3 · step 1/4 · img/s 20 · loss 0.5 · generation none · eta "
    ), text  # the step after the epoch
    shown = drawn.getvalue()
    assert "salient train: epoch 1/3 done · img/s 19.5" in shown
    assert "5/12 steps" in shown and "epoch 2/3 · step 1/4" in shown, shown
