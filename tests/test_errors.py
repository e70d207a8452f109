"""One line for every user error, wherever it is raised: a Ray task, an actor's method, an
actor's constructor, a Ray Train worker. Real Ray (the session's), real failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zarr

from salient.jobs.cli import main
from salient.jobs.runtime.ray_env import user_error
from salient.store import SaliencyStore, StoreError


def test_a_task_error_is_ours_in_one_line(ray_session):
    from salient.store.paths import positive_int

    ray = ray_session
    with pytest.raises(StoreError) as info:  # Ray's wrapper is also a StoreError …
        ray.get(ray.remote(positive_int).remote(0, "keep"))
    assert len(str(info.value).splitlines()) > 1  # … whose text is the remote traceback
    error = user_error(info.value)
    assert type(error) is StoreError and str(error) == "keep must be a positive integer, got 0"


def test_an_actor_methods_error_is_ours(ray_session):
    ray = ray_session
    attrs = {"num_samples": 4, "shard_size": 2, "grid": 2, "fingerprint": "f"}
    actor = ray.remote(SaliencyStore).options(num_cpus=0).remote("/nowhere", attrs)
    with pytest.raises(Exception) as info:
        ray.get(actor.gc.remote(keep=0))
    assert str(user_error(info.value)) == "keep must be a positive integer, got 0"
    ray.kill(actor)


def test_an_actor_that_cannot_start_is_one_line(ray_session, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from salient.errors import SalientError
    from salient.jobs.refresh.worker import RefreshWorker, WorkerSpec
    from salient.jobs.runtime.shard_pool import ActorInputs, _check_started

    ray = ray_session
    spec = WorkerSpec(
        str(tmp_path / "none.zarr"),
        "gen-000001",
        "cls_attn",
        None,
        -1,
        None,
        ActorInputs(32, 8, (0.5,) * 3, (0.5,) * 3),
    )
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    actor = ray.remote(RefreshWorker).options(num_cpus=0).remote(model, spec)
    with pytest.raises(ray.exceptions.RayActorError) as info:
        ray.get(actor.pid.remote())
    with pytest.raises(SalientError) as error:
        _check_started(info.value, "refresh actor")
    message = str(error.value)
    assert "\n" not in message and "no saliency store at" in message
    assert message.startswith("a refresh actor could not start:")


def test_a_train_workers_store_error_is_one_line_without_retries(
    ray_session, demo_data, tmp_path, capsys
):
    """The store's root names a generation that is not there; the worker that binds it fails,
    Ray Train restarts the workers once, and they stop at once on the recorded error."""
    from salient.pipeline.manifest import open_dataset

    store = tmp_path / "s.zarr"
    SaliencyStore.create(store, open_dataset(demo_data), grid=4)
    zarr.open_group(store, mode="r+", use_consolidated=False).update_attributes(
        {"current": "gen-000009"}
    )
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(demo_data), "--store", str(store), "--run-dir", str(run_dir)]
    argv += ["--model", "mae-micro", "--image-size", "32", "--patch-size", "8", "--batch-size", "8"]
    argv += ["--workers", "2", "--epochs", "1", "--warmup-epochs", "0", "--refresh-every", "0"]
    argv += ["--loader-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(True) if ": warning: " not in line)  # lr's
    assert err.count("\n") == 1 and "no generation 'gen-000009'" in err, err
    assert json.loads((run_dir / "error.json").read_text())["type"] == "GenerationNotFoundError"
    starts = [
        r
        for r in map(json.loads, Path(run_dir, "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "start"
    ]
    assert len(starts) == 1  # the restart stopped before training again


def test_a_changed_shard_in_train_is_one_line_on_the_console(demo_data, tmp_path):
    """A shard replaced by other bytes of its size, met by a Ray Train worker: the real CLI's
    stderr holds the run's warnings and one error line, not Ray Train's traceback of it."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    shard = data / "shard-000001.tar"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    argv = ["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--epochs", "1"]
    argv += ["--model", "mae-micro", "--image-size", "32", "--patch-size", "8", "--batch-size", "8"]
    argv += ["--strategy", "random", "--workers", "1", "--loader-workers", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SALIENT_"))}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("salient")), *argv],
        capture_output=True,
        text=True,
        env={**env, "SALIENT_PROGRESS": "0"},
        timeout=600,
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if ": warning: " not in line]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"salient train: error: shard {shard} is not the one its manifest")


def test_workers_killed_for_memory_end_the_run_in_one_line(tmp_path):
    """Ray's memory monitor (the node over 95 %) kills workers: the run ends in one line that
    says so and how to go on, not Ray's traceback of the controller's error."""
    import ray.exceptions

    from salient.jobs.train.config import TrainConfig
    from salient.jobs.train.failure import raise_failure
    from salient.trainer.specs import TrainError

    text = (
        "6 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
        "192.0.2.2, ID: e6c0) was 22.38GB used / 23.54GB limit (0.950875)"
    )
    killed = ray.exceptions.OutOfMemoryError(text)
    wrapper = RuntimeError("Training failed due to controller error:")  # as Ray Train's
    wrapper.controller_failure = killed
    config = TrainConfig(data=str(tmp_path), model="mae-micro", strategy="random")
    with pytest.raises(TrainError) as raised:
        raise_failure(tmp_path, wrapper, config)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 300, message
    assert "out of memory (22.38GB used / 23.54GB limit)" in message
    assert message.endswith("`--resume` continues from the start")
