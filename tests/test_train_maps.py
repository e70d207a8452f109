"""Training that says what it lost, and whose maps it reads: the train worker without Ray (one
rank in a gloo process group; refreshes run in this process, as in test_train_worker.py).

- gc refuses the generation a run is bound to (rank 0 holds a reader lease on it);
- ``--resume`` resumes the refresh a killed run left unpublished, or abandons it when its
  teacher checkpoint is gone, and logs which; an unpublished generation's teacher is never
  pruned;
- two runs on one store each read their own lineage (``--maps own``), or say in one line that
  they read another teacher's maps (``--maps any``);
- a damaged store chunk is counted (``corrupt_maps``, ``damaged_chunks``) in the epoch record
  and named once by the console, and the epoch trains on.

Checks read metrics.jsonl, the store through plain zarr and ``salient gc`` run as a separate
process (so its view of the reader's lease is another process's).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from test_train_worker import InProcessRefresh

from salient.jobs.refresh.driver import prepare_refresh, worker_spec
from salient.jobs.refresh.worker import RefreshWorker
from salient.jobs.train.config import TrainConfig
from salient.jobs.train.console import TrainConsole
from salient.jobs.train.worker import _Worker
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore
from salient.store.testing import synthetic_teacher


class Killed(BaseException):
    """The driver dies here (as a SIGKILL would stop the run, without cleanup)."""


class HalfRefresh(InProcessRefresh):
    """A refresh that writes its first shard and never finishes (its driver was killed)."""

    def __call__(self, teacher: str, group):
        refresh = self.config.refresh_config(teacher)
        prepared = prepare_refresh(refresh)
        spec = worker_spec(refresh, prepared.teacher, prepared.spec, prepared.writer.name)
        actor = RefreshWorker(prepared.teacher.model, spec)
        actor.compute_shard(0, prepared.dataset.source(prepared.dataset.shards[0]))
        self.teachers.append(Path(teacher).name)
        return Never()


class Never:
    def done(self) -> bool:
        return False

    def result(self) -> dict:
        raise Killed  # the run would wait for it here: the test kills it instead


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def config_for(data, root: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        store=str(root / "saliency.zarr"),
        run_dir=str(root / "run"),
        model="mae-micro",
        strategy="amt",
        epochs=3,
        warmup_epochs=1,
        refresh_every=1,
        keep_checkpoints=1,
        keep_generations=0,
        batch_size=16,
        image_size=32,
        patch_size=8,
        lr=1e-3,
        loader_workers=0,
        refresh_batch_size=32,
    )
    return TrainConfig(**{**fields, **overrides})


def train(config: TrainConfig, launcher, report=None) -> list[dict]:
    """Run the worker (rank 0 of 1) until it ends or is killed; returns metrics.jsonl."""
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    Path(config.run_dir, "metrics.jsonl").touch()
    args = {"config": config, "launch_refresh": launcher, "progress": False, "run_id": "t"}
    worker = _Worker(args, 0, 1, torch.device("cpu"), report or (lambda record: None))
    try:
        worker.run()
    except Killed:
        pass
    finally:
        worker.close()
    return records(config)


def records(config: TrainConfig, kind: str | None = None) -> list[dict]:
    lines = Path(config.run_dir, "metrics.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines if line]
    return [r for r in found if kind is None or r["kind"] == kind]


def gc_in_another_process(store: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "salient.jobs.cli", "gc", "--store", store, "--keep", "1",
         "--grace-s", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def generations(store: str) -> dict[str, str]:
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    published = set(root.attrs["published"])
    names = [k for k in root.group_keys() if k.startswith("gen-")]
    return {n: "published" if n in published else root[n].attrs["status"] for n in names}


# ---------------------------------------------------------------- the reader's lease


def test_gc_refuses_the_generation_a_run_is_bound_to(demo_data, tmp_path, process_group):
    config = config_for(demo_data, tmp_path)
    said = {}

    def after_epoch(record: dict) -> None:  # between epochs, as a user's gc would run
        if record["epochs_done"] == 2:  # epoch 2 read gen-000001; gen-000002 is current
            said["gc"] = gc_in_another_process(config.store)
            said["left"] = generations(config.store)

    train(config, InProcessRefresh(config), after_epoch)
    line = next(x for x in said["gc"].splitlines() if x.startswith("gen-000001"))
    assert "keep" in line and f"held by a reader: train run {config.run_dir}" in line
    assert "teacher checkpoint" in line and "checkpoint-00001.pt" in line  # its provenance
    assert said["left"]["gen-000001"] == "published"  # not collected while bound
    epochs = records(config, "epoch")
    assert [e["generation"] for e in epochs] == [None, "gen-000001", "gen-000002"]
    assert epochs[1]["teacher"]["path"] == str(Path(config.run_dir) / "checkpoint-00001.pt")
    # the run ended and released its lease: gc collects what nothing reads any more
    gc_in_another_process(config.store)
    assert set(generations(config.store)) == {"gen-000002"}


# ---------------------------------------------------------------- --resume and a refresh in flight


def test_resume_resumes_the_refresh_a_killed_run_left_unpublished(
    demo_data, tmp_path, process_group
):
    config = config_for(demo_data, tmp_path, stop_after_epochs=2)
    train(config, HalfRefresh(config))  # killed after epoch 2: gen-000001 has 1 of 3 shards
    assert generations(config.store) == {"gen-000001": "writing"}
    resumed = replace(config, resume=True, stop_after_epochs=None)
    launcher = InProcessRefresh(resumed)
    train(resumed, launcher)
    (event,) = records(resumed, "refresh_resumed")
    assert (event["generation"], event["shards_done"], event["shards"]) == ("gen-000001", 1, 3)
    assert Path(event["teacher"]).name == "checkpoint-00001.pt"
    # the resumed refresh wrote its missing shards into the same generation, then the one due
    # after the restored checkpoint ran
    assert launcher.teachers == ["checkpoint-00001.pt", "checkpoint-00002.pt"]
    (rerun,) = records(resumed, "refresh_rerun")  # stopped before it began a generation
    assert Path(rerun["teacher"]).name == "checkpoint-00002.pt" and rerun["epochs_done"] == 2
    assert generations(resumed.store) == {"gen-000001": "published", "gen-000002": "published"}
    epochs = records(resumed, "epoch")
    assert [e["generation"] for e in epochs] == [None, None, "gen-000002"]
    assert not records(resumed, "refresh_abandoned")


def test_resume_abandons_a_refresh_whose_teacher_is_gone_and_says_so(
    demo_data, tmp_path, process_group, capsys
):
    config = config_for(demo_data, tmp_path, stop_after_epochs=2)
    train(config, HalfRefresh(config))
    run = Path(config.run_dir)
    assert (run / "checkpoint-00001.pt").is_file()  # kept: its refresh was in flight
    (run / "checkpoint-00001.pt").unlink()
    shutil.rmtree(run / "encoder-00001")
    resumed = replace(config, resume=True, stop_after_epochs=None)
    with TrainConsole(resumed, 6, "off"):
        train(resumed, InProcessRefresh(resumed))
    (event,) = records(resumed, "refresh_abandoned")
    assert (event["generation"], event["shards_done"], event["shards"]) == ("gen-000001", 1, 3)
    assert event["reason"] == "its teacher is gone"
    root = zarr.open_group(resumed.store, mode="r", use_consolidated=False)
    teachers = {n: Path(root[n].attrs["teacher"]["path"]).name for n in generations(resumed.store)}
    assert set(teachers.values()) == {"checkpoint-00002.pt"}  # the abandoned one is gone
    err = capsys.readouterr().err
    assert "salient train: refresh abandoned gen-000001 from checkpoint-00001.pt (1 of 3 " in err
    assert (
        "salient train: refresh from checkpoint-00002.pt never began a generation before the "
        "run stopped: running it now" in err
    )


def test_an_unpublished_generations_teacher_is_never_pruned(demo_data, tmp_path, process_group):
    config = config_for(demo_data, tmp_path, stop_after_epochs=2)
    train(config, HalfRefresh(config))
    # resumed without refreshes: nothing resumes gen-000001, yet its teacher stays
    resumed = replace(config, resume=True, stop_after_epochs=None, refresh_every=0, maps="own")
    train(resumed, None)
    kept = sorted(p.name for p in Path(config.run_dir).glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00001.pt", "checkpoint-00003.pt"]  # keep_checkpoints=1, + 1
    assert generations(config.store) == {"gen-000001": "writing"}


# ---------------------------------------------------------------- two runs, one store


@pytest.mark.parametrize("maps", ["own", "any"])
def test_two_runs_on_one_store_each_read_their_own_lineage_or_say_so(
    demo_data, tmp_path, process_group, maps, capsys
):
    first = config_for(demo_data, tmp_path / "a", epochs=2, store=str(tmp_path / "s.zarr"))
    train(first, InProcessRefresh(first))  # publishes gen-000001 from a's checkpoint
    second = config_for(demo_data, tmp_path / "b", epochs=3, store=first.store, maps=maps)
    with TrainConsole(second, 6, "off"):
        train(second, HalfRefresh(second))  # b's own refresh never publishes
    epoch_2 = records(second, "epoch")[1]
    if maps == "own":
        assert (epoch_2["generation"], epoch_2["strategy"], epoch_2["teacher"]) == (
            None, "random", None,
        )  # fmt: skip
        assert not records(second, "foreign_maps")
    else:
        assert (epoch_2["generation"], epoch_2["strategy"]) == ("gen-000001", "amt")
        assert epoch_2["teacher"]["path"] == str(Path(first.run_dir) / "checkpoint-00001.pt")
        (told,) = records(second, "foreign_maps")
        assert told["generation"] == "gen-000001"
        err = capsys.readouterr().err
        assert "salient train: maps gen-000001 comes from another teacher, checkpoint " in err


# ---------------------------------------------------------------- damaged maps


def test_a_damaged_chunk_is_counted_named_once_and_never_stops_the_epoch(
    demo_data, tmp_path, process_group, capsys
):
    store = SaliencyStore.create(tmp_path / "s.zarr", open_dataset(demo_data), grid=4)
    writer = store.begin_generation(synthetic_teacher(3), "cls_attn", 32, 8)
    rng = np.random.default_rng(0)
    for shard in range(3):
        writer.write_shard(shard, rng.random((32, 4, 4), np.float32), np.ones(32, np.uint8))
    writer.publish()
    chunk = tmp_path / "s.zarr" / writer.name / "maps" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\xff\xff\xff"  # 4 flipped bytes
    chunk.write_bytes(bytes(data))
    config = config_for(
        demo_data, tmp_path, store=store.url, warmup_epochs=0, refresh_every=0, epochs=2
    )
    with TrainConsole(config, 6, "off"):
        train(config, None)
    epochs = records(config, "epoch")
    damaged = "gen-000001: chunk 1 of maps (ids 32..63) fails its CRC-32C checksum"
    for epoch in epochs:
        assert (epoch["corrupt_maps"], epoch["damaged_chunks"]) == (32, [damaged])
        assert epoch["corrupt"] == 0 and epoch["fallback"] == 32 and epoch["images"] == 96
        assert epoch["teacher"]["generation"] == "gen-000001"  # the synthetic teacher's
    err = capsys.readouterr().err
    assert err.count(f"salient train: damaged {damaged}") == 1  # once, not per epoch
    assert "salient train: maps gen-000001 comes from another teacher" in err  # --maps any


def test_the_console_names_a_restart_before_any_checkpoint(tmp_path, capsys):
    config = config_for(tmp_path / "d", tmp_path)
    Path(config.run_dir).mkdir(parents=True)
    log = Path(config.run_dir, "metrics.jsonl")
    log.touch()
    with TrainConsole(config, 6, "lines"), open(log, "a") as f:
        f.write(json.dumps({"kind": "start", "run": "r", "from": None, "restart": True}))
        f.write("\n")
    err = capsys.readouterr().err
    assert "salient train: restarted from the start after a lost worker" in err
