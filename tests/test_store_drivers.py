"""Several drivers on one store: leases, a dead driver's generation, gc plans, a store created
twice at once, a damaged store. Real zarr on disk, real driver processes (``spawn``), checked
through plain zarr where it matters.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import zarr

from salient.jobs.cli import main
from salient.store import (
    GenerationBusyError,
    SaliencyStore,
    StoreDamagedError,
    store_exists,
)
from salient.store.lease import lease_state
from salient.store.testing import (
    hold_generation,
    open_or_create,
    synthetic_dataset,
    synthetic_teacher,
)

N, SHARD, GRID = 300, 100, 4  # 3 shards
SPAWN = multiprocessing.get_context("spawn")


def new_store(path: Path) -> SaliencyStore:
    return SaliencyStore.create(path, synthetic_dataset(N, SHARD, path.parent), grid=GRID)


def open_or_resume(store: SaliencyStore, seed: int):
    return store.open_or_resume(synthetic_teacher(seed), "cls_attn", GRID * 8, 8, epoch=seed)


def publish(store: SaliencyStore, seed: int) -> str:
    from salient.store.testing import _write

    writer = open_or_resume(store, seed)
    for shard in range(store.num_shards):
        _write(writer, store, shard, seed)
    writer.publish()
    return writer.name


@pytest.fixture
def holder(tmp_path):
    """A driver process holding the lease of seed 1's generation, shard 0 written."""
    store = new_store(tmp_path / "s.zarr")
    ready = SPAWN.Event()
    child = SPAWN.Process(target=hold_generation, args=(store.url, 1, [0], ready))
    child.start()
    try:
        assert ready.wait(120), "the holding driver did not start"
        yield store, child
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join(30)


def test_a_live_drivers_generation_is_refused_in_one_line_then_resumed_after_it_dies(holder):
    store, child = holder
    name = store.generations()[0]["name"]
    with pytest.raises(GenerationBusyError) as busy:
        open_or_resume(store, 1)  # the same teacher: the same generation
    message = str(busy.value)
    assert name in message and f"pid {child.pid}" in message and "\n" not in message
    assert busy.value.generation == name
    other = open_or_resume(store, 2)  # another teacher writes its own generation beside it
    assert other.name != name
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=0)}
    assert not plan[name]["remove"] and "being written" in plan[name]["reason"]

    os.kill(child.pid, signal.SIGKILL)  # the driver dies; its lease names a process now gone
    child.join(30)
    assert lease_state(store.writer_state(name)[1]) == "stale"
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=3600)}
    assert not plan[name]["remove"]  # within the grace period: the next refresh may resume it
    assert store.gc(keep=1, grace_s=0, dry_run=True) == [name]  # after it: collectable
    resumed = open_or_resume(store, 1)
    assert resumed.name == name and resumed.missing_shards() == [1, 2]
    attrs = zarr.open_group(store.url, mode="r", use_consolidated=False)[name].attrs
    assert attrs["writer"]["pid"] == os.getpid()  # the lease is this driver's now


def test_gc_cli_lists_then_removes(tmp_path, capsys):
    store = new_store(tmp_path / "s.zarr")
    names = [publish(store, seed) for seed in (1, 2, 3)]
    writing = open_or_resume(store, 4).name  # held by this process: always kept
    args = ["gc", "--store", store.url, "--keep", "1", "--grace-s", "0"]
    assert main([*args, "--dry-run"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listing[:4]] == [
        [names[0], "published", "remove"],
        [names[1], "published", "remove"],
        [names[2], "published", "keep"],
        [writing, "writing", "keep"],
    ]
    assert "would remove 2 of 4" in listing[-1] and "nothing removed" in listing[-1]
    root = zarr.open_group(store.url, mode="r", use_consolidated=False)
    assert sorted(root.group_keys()) == sorted([*names, writing])
    assert main(args) == 0
    assert "removed 2 of 4" in capsys.readouterr().out
    root = zarr.open_group(store.url, mode="r", use_consolidated=False)
    assert sorted(root.group_keys()) == [names[2], writing]
    assert list(root.attrs["published"]) == [names[2]]


def test_two_drivers_creating_one_store_at_once_both_open_it(tmp_path):
    for attempt in range(3):
        url = str(tmp_path / f"s{attempt}.zarr")
        barrier, queue = SPAWN.Barrier(2), SPAWN.Queue()
        children = [
            SPAWN.Process(target=open_or_create, args=(url, N, SHARD, GRID, barrier, queue))
            for _ in range(2)
        ]
        for child in children:
            child.start()
        results = [queue.get(timeout=120) for _ in children]
        for child in children:
            child.join(30)
        fingerprint = synthetic_dataset(N, SHARD).fingerprint
        assert results == [fingerprint, fingerprint], results


def test_a_store_without_its_root_is_called_damaged(tmp_path, demo_data, capsys):
    from salient.pipeline.manifest import open_dataset

    path = tmp_path / "s.zarr"
    store = SaliencyStore.create(path, open_dataset(demo_data), grid=8)
    name = store.begin_generation(synthetic_teacher(1), "cls_attn", 64, 8).name
    (path / "zarr.json").unlink()
    assert store_exists(path)  # not absent: nothing may create a store over it
    with pytest.raises(StoreDamagedError, match=f"damaged: its root zarr.json is missing.*{name}"):
        SaliencyStore.open(path)
    teacher = str(tmp_path / "never-read.pt")
    for argv in (
        ["inspect", "--store", str(path), "--data", str(demo_data), "--out", str(tmp_path / "r")],
        ["refresh", "--store", str(path), "--data", str(demo_data), "--teacher", teacher],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged" in err and name in err, err
    assert sorted(p.name for p in path.iterdir()) == [name]  # nothing was written


def test_progress_lines_are_throttled(capsys):
    from salient.jobs.runtime.progress import ProgressLines

    lines = ProgressLines("refresh", every_s=3600)
    assert not lines.update(shard="1/3")  # too soon after the start
    lines.line(shard="3/3", img_per_s=12.345, generation="gen-000001", loss=None)
    assert capsys.readouterr().err == (
        "salient refresh: shard 3/3 · img/s 12.35 · generation gen-000001\n"
    )


def test_demo_summary_is_short_and_points_at_the_report(tmp_path):
    from salient.jobs.demo import human_summary

    result = {
        "out": "/x/demo_run",
        "ingest": "written",
        "dataset": {"images": 2000, "shards": 4},
        "train": {
            "model": "mae-tiny",
            "epochs_done": 5,
            "workers": 2,
            "steps": 75,
            "loss": 0.41234,
            "img_per_s": 21.7,
            "refreshes": ["gen-000001", "gen-000002"],
        },
        "inspect": {
            "index": "/x/demo_run/report/index.html",
            "generation": "gen-000002",
            "stats": {
                "gen-000002": {
                    "valid_share": 1.0,
                    "box": {"mass_mean": 0.41, "area_mean": 0.24, "lift_mean": 1.7},
                }
            },
        },
        "eval": {
            "knn_top1": 0.356,
            "baseline_knn_top1": 0.414,
            "chance": 1 / 7,
            "images": {"train": 2000, "val": 500},
        },
        "seconds": 184.2,
    }
    text = human_summary(result, tmp_path / "summary.json")
    lines = text.splitlines()
    assert len(lines) <= 8 and all(len(line) < 240 for line in lines)
    assert "/x/demo_run/report/index.html" in text and str(tmp_path / "summary.json") in text
    assert "2 refreshes published (gen-000001, gen-000002)" in text
    assert "41% of the saliency mass falls inside the object box" in text
    assert "top-1 0.356 on 500 held-out scenes (the same encoder at its random init 0.414" in text
