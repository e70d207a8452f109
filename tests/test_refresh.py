"""The refresh job on a real local Ray: result, determinism, worker and driver kills, corrupt
images and refusals before any work.

The teacher is a depth-2 ViT (patch 8, image 64 → 8×8 maps) saved as a salient checkpoint; the
data is the 96-image demo set in 3 shards. Stores are checked through plain zarr, and the
reference maps are computed in this process with webdataset + the teacher, independently of
the job's reading, decoding and scheduling code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from timm.models.vision_transformer import VisionTransformer

from salient.errors import SalientError
from salient.jobs.refresh.driver import RefreshConfig, RefreshError, run_refresh
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.manifest import open_dataset
from salient.pipeline.shards import file_digests
from salient.store import SaliencyStore
from salient.trainer.teacher import preprocess, saliency
from salient.trainer.teacher_load import load_teacher

IMAGE_SIZE, GRID, SHARDS = 64, 8, 3
ENCODER = {
    "img_size": IMAGE_SIZE,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 0,
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny salient training checkpoint; weights spread so attention is far from uniform."""
    torch.manual_seed(0)
    model = VisionTransformer(**ENCODER)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint-00003.pt"
    torch.save(
        {
            "format": "salient-checkpoint/1",
            "config": {"model": "vit-test"},
            "encoder_kwargs": ENCODER,
            "encoder": model.state_dict(),
            "epoch": 3,
        },
        path,
    )
    return path


def config_for(data, store, teacher, **overrides) -> RefreshConfig:
    fields = {
        "data": str(data),
        "store": str(store),
        "teacher": str(teacher),
        "image_size": IMAGE_SIZE,
        "batch_size": 16,
        "workers": 2,
        "cpus_per_worker": 0.5,
    }
    return RefreshConfig(**{**fields, **overrides})


def read_generation(store: Path, name: str | None = None) -> dict:
    """A generation read through plain zarr: maps, valid, shards_done and the root attrs."""
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    name = name or root.attrs["current"]
    gen = root[name]
    return {
        "name": name,
        "current": root.attrs.get("current"),
        "maps": gen["maps"][:],
        "valid": gen["valid"][:],
        "shards_done": gen["shards_done"][:],
        "attrs": dict(gen.attrs),
    }


def reference_maps(data: Path, teacher_path: Path, kind: str = "cls_attn") -> np.ndarray:
    """The maps of every image, computed in one process in one batch (no Ray, no store)."""
    teacher = load_teacher(str(teacher_path), image_size=IMAGE_SIZE)
    samples = wds.WebDataset(open_dataset(data).shard_urls(), shardshuffle=False).decode("rgb8")
    ordered = sorted(samples, key=lambda s: int(s["__key__"]))
    images = [torch.from_numpy(s["jpg"].copy()).permute(2, 0, 1) for s in ordered]
    x = preprocess(images, IMAGE_SIZE, teacher.mean, teacher.std)
    return saliency(teacher.model, x, kind=kind).numpy()


def assert_maps_close(got: np.ndarray, want: np.ndarray) -> None:
    """float16 storage of fp32 maps computed with other batch boundaries: one fp16 ulp."""
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=1e-5)


@pytest.fixture(scope="module")
def baseline(ray_session, demo_data, teacher_file, tmp_path_factory) -> dict:
    """One uninterrupted refresh: its summary and its published generation."""
    store = tmp_path_factory.mktemp("baseline") / "saliency.zarr"
    summary = run_refresh(config_for(demo_data, store, teacher_file), progress=False)
    return {"store": store, "summary": summary, **read_generation(store)}


# ---------------------------------------------------------------- the result


def test_refresh_publishes_what_a_direct_computation_gives(baseline, demo_data, teacher_file):
    summary = baseline["summary"]
    assert summary["images"] == 96 and summary["invalid"] == 0
    assert (summary["shards_computed"], summary["shards_skipped"]) == (SHARDS, 0)
    assert summary["generation"] == baseline["name"] == baseline["current"]
    assert baseline["maps"].shape == (96, GRID, GRID) and baseline["maps"].dtype == np.float16
    assert baseline["valid"].tolist() == [1] * 96
    assert baseline["shards_done"].tolist() == [1] * SHARDS
    assert baseline["attrs"]["teacher"]["epoch"] == 3
    assert_maps_close(baseline["maps"], reference_maps(demo_data, teacher_file))


def test_rerun_after_publish_makes_a_new_identical_generation(
    baseline, demo_data, teacher_file, capsys, monkeypatch
):
    monkeypatch.delenv("SALIENT_PROGRESS", raising=False)  # no terminal: progress lines
    summary = run_refresh(
        config_for(demo_data, baseline["store"], teacher_file, workers=1, batch_size=16)
    )
    again = read_generation(baseline["store"])
    assert summary["generation"] == again["current"] != baseline["name"]
    assert summary["shards_computed"] == SHARDS
    np.testing.assert_array_equal(again["maps"], baseline["maps"])  # bit for bit
    last = capsys.readouterr().err.strip().splitlines()[-1]  # its rate is the summary's
    assert last == (
        f"salient refresh: shard {SHARDS}/{SHARDS} · img/s {summary['img_per_s']:.4g} · "
        f"generation {summary['generation']}"
    )


def test_gpa_and_head_maps_match_direct_computation(ray_session, demo_data, teacher_file, tmp_path):
    store = tmp_path / "heads.zarr"
    run_refresh(config_for(demo_data, store, teacher_file, kind="heads", workers=1), progress=False)
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    gen = root[root.attrs["current"]]
    want = reference_maps(demo_data, teacher_file, kind="heads")  # [96, H, G, G]
    assert_maps_close(gen["head_maps"][:], want)
    assert_maps_close(gen["maps"][:], want.mean(1))
    gpa_store = tmp_path / "gpa.zarr"
    run_refresh(
        config_for(demo_data, gpa_store, teacher_file, kind="gpa", workers=1), progress=False
    )
    got = read_generation(gpa_store)["maps"].astype(np.float32)
    want = reference_maps(demo_data, teacher_file, kind="gpa")
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * np.abs(want).max())


# ---------------------------------------------------------------- failures


def test_killed_worker_is_replaced_and_the_result_is_identical(
    baseline, demo_data, teacher_file, tmp_path
):
    """SIGKILL the only worker right after its first shard: the next one dies in flight."""
    killed = []

    def kill_once(result: dict) -> None:
        if not killed:
            os.kill(result["pid"], signal.SIGKILL)
            killed.append(result["pid"])

    store = tmp_path / "saliency.zarr"
    config = config_for(demo_data, store, teacher_file, workers=1, shard_delay_s=0.3)
    summary = run_refresh(config, progress=False, on_shard_done=kill_once)
    assert killed and summary["retries"] >= 1
    assert (summary["shards_computed"], summary["images"]) == (SHARDS, 96)
    np.testing.assert_array_equal(read_generation(store)["maps"], baseline["maps"])


def _refresh_in_subprocess(config: RefreshConfig, log: Path) -> subprocess.Popen:
    code = (
        "import json, sys\nfrom salient.jobs.refresh.driver import RefreshConfig, run_refresh\n"
        "run_refresh(RefreshConfig(**json.loads(sys.argv[1])), progress=False)\n"
    )
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(fields)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_shards(store: Path, driver: subprocess.Popen, log: Path, timeout: float = 120):
    """Poll the resume markers (plain zarr) until one shard is done; returns the generation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        root = (
            zarr.open_group(str(store), mode="r", use_consolidated=False)
            if (store / "zarr.json").exists()
            else None
        )
        for name in root.group_keys() if root is not None else []:
            group = root[name]  # its arrays appear a moment after the group itself
            if "shards_done" in group and group["shards_done"][:].sum() >= 1:
                return name
        time.sleep(0.05)
    raise AssertionError(f"no shard done within {timeout} s:\n{log.read_text()[-3000:]}")


def test_killed_driver_rerun_resumes_only_missing_shards(
    baseline, demo_data, teacher_file, tmp_path
):
    store, hold = tmp_path / "saliency.zarr", tmp_path / "hold"
    hold.touch()  # kept: the dead driver's actor writes nothing more until Ray reaps it
    slow = config_for(
        demo_data, store, teacher_file, workers=1, hold_while=str(hold), address=ray_address()
    )
    driver = _refresh_in_subprocess(slow, tmp_path / "driver.log")
    try:
        generation = _wait_for_shards(store, driver, tmp_path / "driver.log")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed = read_generation(store, generation)
    done = int(killed["shards_done"].sum())
    assert killed["current"] is None and done == 1
    summary = run_refresh(config_for(demo_data, store, teacher_file), progress=False)
    assert summary["generation"] == generation  # resumed, not begun again
    assert (summary["shards_skipped"], summary["shards_computed"]) == (done, SHARDS - done)
    assert summary["images"] == 32 * (SHARDS - done)
    np.testing.assert_array_equal(read_generation(store)["maps"], baseline["maps"])


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _corrupt_sample(data: Path, sample_id: int) -> None:
    """Overwrite one image's bytes inside its tar with zeros, and record the shard's new
    digests in the manifest: an image that was corrupt when the dataset was written (a shard
    changed afterwards is refused: test_failure_paths.py)."""
    shard = data / f"shard-{sample_id // 32:06d}.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{sample_id:09d}.jpg")
    with open(shard, "r+b") as stream:
        stream.seek(member.offset_data)
        stream.write(b"\0" * member.size)
    manifest = json.loads((data / "manifest.json").read_text())
    size, sha256, head_sha256 = file_digests(str(shard))
    entry = manifest["shards"][sample_id // 32]
    entry.update(bytes=size, sha256=sha256, head_sha256=head_sha256)
    (data / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_image_gets_valid_zero_and_is_counted(baseline, demo_data, teacher_file, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    _corrupt_sample(data, 40)
    store = tmp_path / "saliency.zarr"
    summary = run_refresh(config_for(data, store, teacher_file), progress=False)
    got = read_generation(store)
    assert (summary["images"], summary["invalid"]) == (96, 1)
    assert np.flatnonzero(got["valid"] == 0).tolist() == [40]
    assert np.isnan(got["maps"][40].astype(np.float32)).all()
    keep = np.arange(96) != 40
    assert_maps_close(got["maps"][keep], baseline["maps"][keep].astype(np.float32))


# ---------------------------------------------------------------- refusals before any work


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_store_of_another_dataset_is_refused_and_left_untouched(baseline, teacher_file, tmp_path):
    other = tmp_path / "other"
    ingest_demo(other, n=40, seed=1, shard_size=20, image_size=64)
    before = _tree(baseline["store"])
    with pytest.raises(SalientError, match="(?i)fingerprint|another dataset|different dataset"):
        run_refresh(config_for(other, baseline["store"], teacher_file), progress=False)
    assert _tree(baseline["store"]) == before


def test_grid_mismatch_is_refused_and_left_untouched(baseline, demo_data, teacher_file):
    before = _tree(baseline["store"])
    with pytest.raises(RefreshError, match="8x8 maps.*--image-size 64"):
        run_refresh(
            config_for(demo_data, baseline["store"], teacher_file, image_size=128), progress=False
        )
    assert _tree(baseline["store"]) == before


@pytest.mark.parametrize(
    "teacher, image_size, match",
    [
        ("missing.pt", 64, "does not exist"),
        ("not_a_vit.pt", 64, "not a salient training checkpoint"),
        ("ok", 60, "not a multiple of the teacher's patch size"),
    ],
)
def test_bad_teacher_is_refused_before_the_store_is_made(
    demo_data, teacher_file, tmp_path, teacher, image_size, match
):
    torch.save({"state": torch.zeros(2)}, tmp_path / "not_a_vit.pt")
    path = teacher_file if teacher == "ok" else tmp_path / teacher
    store = tmp_path / "saliency.zarr"
    with pytest.raises(SalientError, match=match):
        run_refresh(config_for(demo_data, store, path, image_size=image_size), progress=False)
    assert not store.exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kind": "rollout"}, "--kind must be one of"),
        ({"reduce": "max"}, "--reduce must be one of"),
        ({"workers": 0}, "--workers must be a positive integer"),
        ({"cpus_per_worker": 0}, "--cpus-per-worker must be > 0"),
        ({"teacher": ""}, "refresh needs --teacher"),
    ],
)
def test_config_errors_say_what_to_fix(overrides, match):
    with pytest.raises(RefreshError, match=match):
        RefreshConfig(**{"data": "d", "store": "s", "teacher": "t", **overrides})


def test_missing_dataset_is_refused(tmp_path, teacher_file):
    with pytest.raises(SalientError, match="does not exist"):
        run_refresh(
            config_for(tmp_path / "nope", tmp_path / "s.zarr", teacher_file), progress=False
        )
    assert not (tmp_path / "s.zarr").exists()


def test_a_second_driver_refuses_or_waits_for_the_first(
    baseline, demo_data, teacher_file, tmp_path, capsys, monkeypatch
):
    """Two `salient refresh` with the same teacher on one store: the second names the first's
    generation in one line, or with --wait-for-other waits and reports the first's result.

    The first driver holds after its first shard until the second is seen waiting (a spy on
    the store's lease reads), so no machine is too slow for the window."""
    from salient.jobs.cli import main

    store, hold = tmp_path / "saliency.zarr", tmp_path / "hold"
    hold.touch()
    slow = config_for(
        demo_data, store, teacher_file, workers=1, hold_while=str(hold), address=ray_address()
    )
    driver = _refresh_in_subprocess(slow, tmp_path / "driver.log")
    try:
        generation = _wait_for_shards(store, driver, tmp_path / "driver.log")
        argv = ["refresh", "--data", str(demo_data), "--store", str(store)]
        argv += ["--teacher", str(teacher_file), "--image-size", str(IMAGE_SIZE)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"generation {generation}" in err
        assert "being written by another refresh" in err

        waiting, read_lease = threading.Event(), SaliencyStore.writer_state

        def writer_state(self, name):  # only a waiting driver reads the lease: it waits now
            waiting.set()
            return read_lease(self, name)

        monkeypatch.setattr(SaliencyStore, "writer_state", writer_state)
        monkeypatch.delenv("SALIENT_PROGRESS", raising=False)  # its note is shown
        codes = []
        waiter = threading.Thread(target=lambda: codes.append(main([*argv, "--wait-for-other"])))
        waiter.start()
        assert waiting.wait(timeout=120), "the second driver never began to wait"
        hold.unlink()  # the first driver goes on and publishes
        waiter.join(timeout=180)
        assert codes == [0]
        out, err = capsys.readouterr()
        summary = json.loads(out)
        assert (summary["generation"], summary["joined"], summary["images"]) == (
            generation,
            True,
            0,
        )
        assert f"waiting for generation {generation}" in err
        assert driver.wait(timeout=120) == 0
    finally:
        hold.unlink(missing_ok=True)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    np.testing.assert_array_equal(read_generation(store)["maps"], baseline["maps"])
