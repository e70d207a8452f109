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
        return _Done(
            {"store": refresh.store, "generation": prepared.writer.name, "kind": "cls_attn"}
        )


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
    args = {"config": config, "launch_refresh": launcher, "progress": False, "run_id": "t"}
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
