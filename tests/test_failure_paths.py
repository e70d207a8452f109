"""Failure paths of the jobs, through the CLI: a full disk, an S3 endpoint that is killed or
that stalls each end in one line with exit 2, never in a traceback, and what was half written
is removed or named.

The disk is a real tmpfs of a few hundred KB (the ``small_disk`` fixture; it needs the right
to mount, else the tests skip), filled up while the job runs; the endpoint is moto's server in
a child process (the ``endpoint`` fixture), stopped with SIGSTOP or killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from salient import urls
from salient.jobs.cli import main
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore
from salient.store.testing import synthetic_teacher

ENCODER = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny salient checkpoint (4 × 4 maps at 32 px)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vit.pt"
    body = {"config": {"model": "vit-test"}, "encoder_kwargs": ENCODER, "epoch": 1}
    torch.save({**body, "encoder": VisionTransformer(**ENCODER).state_dict()}, path)
    return path


def _one_line_exit_2(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("salient ")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines[-1]) < 600, err
    return lines[-1]


def _when(condition, then, timeout_s: float = 120) -> threading.Thread:
    """Run ``then()`` in a thread as soon as ``condition()`` holds."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    break
            except Exception:  # the store is not there yet
                pass
            time.sleep(0.2)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _storage_flags() -> list[str]:
    """This process's storage options as the CLI takes them (the CLI replaces them all)."""
    flags = []
    for key, value in urls.storage_options().items():
        flags += [
            "--storage-option",
            f"{key}={json.dumps(value) if isinstance(value, dict) else value}",
        ]
    return flags


def _writing(store: str) -> bool:
    return any(g["status"] == "writing" for g in SaliencyStore.open(store).generations())


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_during_ingest_is_one_line_and_removes_what_it_wrote(
    small_disk, tmp_path, capsys
):
    disk = small_disk("320k")
    out = disk / "d"
    code = main(["ingest", "--demo", str(out), "--n", "300", "--shard-size", "8",
                 "--image-size", "64"])  # fmt: skip
    line = _one_line_exit_2(code, capsys.readouterr().err)
    assert "the disk is full" in line and "free space or write elsewhere" in line
    assert "shards written before it were removed (no dataset was made)" in line
    assert sorted(os.listdir(out)) == []  # no shard, no manifest, no staged file left
    code = main(["ingest", "--demo", str(out), "--n", "16", "--shard-size", "8",
                 "--image-size", "64"])  # fmt: skip
    assert code == 0 and open_dataset(out).num_samples == 16  # the rerun needs no --overwrite


def test_a_full_disk_during_refresh_is_one_line(
    ray_session, small_disk, demo_data, teacher_file, tmp_path, capsys
):
    disk = small_disk("2m")
    store, hold = str(disk / "s.zarr"), tmp_path / "hold"
    hold.touch()  # the refresh cannot finish before the disk is full

    def fill() -> None:  # what a full disk is: nothing more fits
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    watcher = _when(lambda: _writing(store), lambda: (fill(), hold.unlink()))
    code = main(
        ["refresh", "--data", str(demo_data), "--store", store, "--teacher", str(teacher_file),
         "--image-size", "32", "--workers", "1", "--hold-while", str(hold)]
    )  # fmt: skip
    watcher.join(10)
    line = _one_line_exit_2(code, capsys.readouterr().err)
    assert "the disk is full" in line
    os.unlink(disk / "filler")
    (gen,) = SaliencyStore.open(store).generations()
    assert gen["status"] == "writing"  # nothing half written was published: a rerun resumes


# ---------------------------------------------------------------- an endpoint gone or stalled


def test_a_killed_endpoint_during_refresh_is_one_line(
    ray_session, endpoint, demo_data, teacher_file, tmp_path, capsys
):
    bucket, server = endpoint
    store, hold = f"{bucket}/s.zarr", tmp_path / "hold"
    hold.touch()  # the refresh cannot finish before the endpoint is gone
    argv = ["refresh", "--data", str(demo_data), "--store", store, "--teacher", str(teacher_file),
            "--image-size", "32", "--workers", "1", "--hold-while", str(hold), *_storage_flags()]  # fmt: skip
    watcher = _when(
        lambda: _writing(store), lambda: (server.kill(), server.wait(30), hold.unlink())
    )
    code = main(argv)
    watcher.join(10)
    line = _one_line_exit_2(code, capsys.readouterr().err)
    assert "the endpoint cannot be reached" in line or "stopped answering" in line, line
    assert "check AWS_ENDPOINT_URL" in line or "rerun when it answers" in line


def test_a_stalled_endpoint_heartbeats_then_ends_in_one_line(
    endpoint, demo_data, teacher_file, monkeypatch, capsys
):
    bucket, server = endpoint
    store = SaliencyStore.create(f"{bucket}/s.zarr", open_dataset(demo_data), grid=4)
    writer = store.begin_generation(synthetic_teacher(1), "cls_attn", 32, 8)
    for shard in range(3):
        writer.write_shard(shard, np.ones((32, 4, 4), np.float16), np.ones(32, np.uint8))
    writer.publish()
    monkeypatch.delenv("SALIENT_PROGRESS", raising=False)  # progress lines: no terminal here
    monkeypatch.setenv("SALIENT_WAIT_EVERY", "0.5")
    server.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    start = time.monotonic()
    code = main(["gc", "--store", store.url, *_storage_flags()])
    waited = time.monotonic() - start
    err = capsys.readouterr().err
    line = _one_line_exit_2(code, err)
    assert line.startswith(f"salient gc: error: {store.url}: the endpoint stopped answering")
    assert "rerun when it answers" in line
    beats = [x for x in err.splitlines() if x.startswith(f"salient gc: waiting on {store.url}")]
    assert beats and beats[0].endswith("for 0.5 s")
    assert waited < urls.PATIENCE_S  # within the documented wait
    server.send_signal(signal.SIGCONT)
    assert main(["gc", "--store", store.url, "--dry-run", *_storage_flags()]) == 0  # a rerun
    assert "would remove 0 of 1 generations" in capsys.readouterr().out


# ---------------------------------------------------------------- a shard replaced under a job


@pytest.fixture
def replaced(demo_data, tmp_path) -> Path:
    """The demo set with shard 1 replaced by random bytes of the same size."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    shard = data / "shard-000001.tar"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    return data


def test_a_replaced_shard_ends_a_refresh_in_one_line_without_retries(
    ray_session, replaced, teacher_file, tmp_path, capsys
):
    code = main(
        ["refresh", "--data", str(replaced), "--store", str(tmp_path / "s.zarr"),
         "--teacher", str(teacher_file), "--image-size", "32", "--workers", "1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    line = _one_line_exit_2(code, err)
    assert "shard-000001.tar is not the one its manifest recorded" in line
    assert "worker died" not in err and "failed" not in line  # no lost-worker retries


def test_a_replaced_shard_ends_training_in_one_line_without_restarts(
    ray_session, replaced, tmp_path, capsys
):
    run = tmp_path / "run"
    code = main(
        ["train", "--data", str(replaced), "--run-dir", str(run), "--model", "mae-micro",
         "--strategy", "random", "--epochs", "1", "--workers", "1", "--batch-size", "16",
         "--image-size", "32", "--patch-size", "8", "--loader-workers", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err
    line = _one_line_exit_2(code, err)
    assert "shard-000001.tar is not the one its manifest recorded" in line
    assert "lost" not in err  # not taken for a lost worker
