"""Datasets and stores on S3: the whole flow against a real S3 endpoint on this machine.

The endpoint is moto's server on 127.0.0.1 (session fixture ``s3_endpoint``), reached only
through s3fs with ``AWS_ENDPOINT_URL``. The dummy keys come as storage options (what
``--storage-option`` sets), not from the environment: Ray's actors, the train workers and the
DataLoader workers can only read or write anything if the options reach them. Results are
compared with the same flow on local disk and read back through plain zarr and s3fs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from timm.models.vision_transformer import VisionTransformer

from salient import urls
from salient.jobs.cli import main
from salient.jobs.inspect.config import InspectConfig
from salient.jobs.inspect.driver import run_inspect
from salient.jobs.refresh.driver import RefreshConfig, run_refresh
from salient.jobs.train.driver import TrainConfig, run_train
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import LoaderConfig, SalientLoader
from salient.pipeline.manifest import open_dataset

BUCKET = "salient-tests"
SECRET = "salient-test-secret-4d1f0c"  # a storage option that must never be written anywhere
OPTIONS = {"key": "salient-test-key", "secret": SECRET}
IMAGE, PATCH, SHARDS = 32, 8, 3
ENCODER = {
    "img_size": IMAGE,
    "patch_size": PATCH,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 0,
}


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """``s3://salient-tests`` with the dummy keys set as this process's storage options."""
    previous = urls.storage_options()
    urls.set_storage_options(OPTIONS)
    fs, _ = urls.filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    urls.set_storage_options(previous)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny salient checkpoint (patch 8 at 32 px: the 4×4 grid the trainer refreshes)."""
    torch.manual_seed(0)
    model = VisionTransformer(**ENCODER)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint-00001.pt"
    torch.save(
        {
            "format": "salient-checkpoint/1",
            "config": {"model": "vit-test"},
            "encoder_kwargs": ENCODER,
            "encoder": model.state_dict(),
            "epoch": 1,
        },
        path,
    )
    return path


def _refresh(data: str, store: str, teacher: Path, workers: int = 2) -> dict:
    config = RefreshConfig(
        data=data,
        store=store,
        teacher=str(teacher),
        image_size=IMAGE,
        batch_size=16,
        workers=workers,
        cpus_per_worker=0.5,
    )
    return run_refresh(config, progress=False)


def _s3_flow(s3: str, local: Path, teacher: Path) -> dict:
    """ingest → refresh (2 workers) → train (2 epochs, a refresh between) → inspect."""
    data, store = f"{s3}/flow/data", f"{s3}/flow/saliency.zarr"
    ingest_demo(data, n=32 * SHARDS, seed=0, shard_size=32, image_size=48)
    refresh = _refresh(data, store, teacher)
    train = run_train(
        TrainConfig(
            data=data,
            store=store,
            run_dir=str(local / "run"),
            model="mae-micro",
            epochs=2,
            warmup_epochs=0,
            refresh_every=1,
            refresh_wait=True,
            workers=1,
            batch_size=16,
            image_size=IMAGE,
            patch_size=PATCH,
            lr=1e-3,
            loader_workers=0,
            refresh_batch_size=32,
        ),
        progress=False,
    )
    report = run_inspect(
        InspectConfig(store=store, data=data, out=str(local / "report"), n=4, compare="gen-000001")
    )
    return {"refresh": refresh, "train": train, "inspect": report, "store": store, "data": data}


def _local_flow(local: Path, teachers: list[Path]) -> dict:
    """The same data and the same teachers on local disk (the trainer's checkpoint comes from
    the S3 flow: what is compared is the data and store path, and a train on S3 reads the same
    batches as on disk, see the DataLoader test below)."""
    data, store = str(local / "data"), str(local / "saliency.zarr")
    ingest_demo(data, n=32 * SHARDS, seed=0, shard_size=32, image_size=48)
    for teacher in teachers:  # one actor: the maps do not depend on the worker count
        _refresh(data, store, teacher, workers=1)
    report = run_inspect(
        InspectConfig(store=store, data=data, out=str(local / "report"), n=4, compare="gen-000001")
    )
    return {"inspect": report, "store": store, "data": data}


def _generations(store: str) -> dict[str, dict[str, bytes]]:
    """Every generation's maps and valid flags, as bytes, read through plain zarr."""
    options = {"storage_options": urls.fsspec_options()} if urls.is_remote(store) else {}
    root = zarr.open_group(store, mode="r", use_consolidated=False, **options)
    return {
        name: {a: np.asarray(root[name][a][:]).tobytes() for a in ("maps", "valid")}
        for name in sorted(root.group_keys())
        if name.startswith("gen-")  # not readers/, the leases of training runs that read it
    }


@pytest.fixture(scope="module")
def flows(ray_session, s3, teacher, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flows")
    remote = _s3_flow(s3, root / "s3", teacher)
    checkpoint = Path(remote["train"]["run_dir"]) / "checkpoint-00001.pt"  # gen-000002's teacher
    local = _local_flow(root / "local", [teacher, checkpoint])
    return {"root": root, "local": local, "s3": remote}


def test_the_flow_on_s3_publishes_the_same_maps_as_on_local_disk(flows):
    local, remote = flows["local"], flows["s3"]
    assert open_dataset(remote["data"]).fingerprint == open_dataset(local["data"]).fingerprint
    assert remote["refresh"]["images"] == 96 and remote["refresh"]["generation"] == "gen-000001"
    assert remote["train"]["refreshes"] == ["gen-000002"] and remote["train"]["epochs_done"] == 2
    s3_gens, local_gens = _generations(remote["store"]), _generations(local["store"])
    assert list(s3_gens) == ["gen-000001", "gen-000002"]
    assert s3_gens == local_gens  # byte for byte
    stats = {k: remote["inspect"]["stats"][k] for k in remote["inspect"]["stats"]}
    assert stats == local["inspect"]["stats"] and remote["inspect"]["panels"] == 4
    assert Path(remote["inspect"]["index"]).is_file()


def test_no_storage_option_is_written_anywhere(flows):
    """The secret travels to every worker but is in no object, file or Ray log."""
    import ray

    fs, _ = urls.filesystem(f"s3://{BUCKET}")
    blobs = [fs.cat_file(path) for path in fs.find(f"{BUCKET}/flow")]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for d in (flows["root"], logs) for p in d.rglob("*") if p.is_file()]
    assert len(blobs) > 10 and files
    for blob in blobs + [p.read_bytes() for p in files]:
        assert SECRET.encode() not in blob


def test_dataloader_workers_read_s3_like_local_disk(flows):
    """Two DataLoader workers on the S3 dataset and store: the same batches as on disk."""

    def batches(flow: dict) -> list[dict]:
        config = LoaderConfig(
            data=flow["data"],
            store=flow["store"],
            image_size=IMAGE,
            patch_size=PATCH,
            batch_size=16,
            num_workers=2,
            seed=1,
        )
        return list(SalientLoader(config).epoch(3))

    for a, b in zip(batches(flows["s3"]), batches(flows["local"]), strict=True):
        assert a["generation"] == b["generation"] == "gen-000002"
        for key in ("ids", "crop_boxes", "mask_idx", "has_saliency", "images"):
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- a killed refresh on S3


def _driver(config: RefreshConfig, log: Path) -> subprocess.Popen:
    code = (
        "import json, os, sys\nfrom salient import urls\n"
        "from salient.jobs.refresh.driver import RefreshConfig, run_refresh\n"
        "urls.set_storage_options(json.loads(os.environ['SALIENT_TEST_OPTIONS']))\n"
        "run_refresh(RefreshConfig(**json.loads(sys.argv[1])), progress=False)\n"
    )
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
    env = {**os.environ, "SALIENT_TEST_OPTIONS": json.dumps(OPTIONS)}
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(fields)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _markers(store: str) -> dict[str, np.ndarray]:
    if not urls.list_names(store):
        return {}
    root = zarr.open_group(
        store, mode="r", use_consolidated=False, storage_options=urls.fsspec_options()
    )
    groups = [root[name] for name in root.group_keys()]
    return {g.basename: g["shards_done"][:] for g in groups if "shards_done" in g}  # made yet


def _first_shard_done(store: str, driver: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        done = [name for name, marks in _markers(store).items() if marks.sum() >= 1]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no shard done within {timeout} s:\n{log.read_text()[-3000:]}")


def test_a_refresh_killed_on_s3_resumes_and_ends_identical(flows, s3, teacher, tmp_path):
    import ray

    store = f"{s3}/killed/saliency.zarr"
    config = RefreshConfig(
        data=flows["s3"]["data"],
        store=store,
        teacher=str(teacher),
        image_size=IMAGE,
        batch_size=16,
        workers=1,
        cpus_per_worker=0.5,
        hold_while=str(tmp_path / "hold"),  # kept: the dead driver's actor writes no more
        address=ray.get_runtime_context().gcs_address,
    )
    (tmp_path / "hold").touch()
    driver = _driver(config, tmp_path / "driver.log")
    try:
        generation = _first_shard_done(store, driver, tmp_path / "driver.log")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done = int(_markers(store)[generation].sum())
    assert done == 1
    summary = run_refresh(RefreshConfig(**{**config.__dict__, "hold_while": ""}), progress=False)
    assert summary["generation"] == generation  # resumed, not begun again
    assert (summary["shards_skipped"], summary["shards_computed"]) == (done, SHARDS - done)
    assert _generations(store)[generation] == _generations(flows["s3"]["store"])["gen-000001"]


# ---------------------------------------------------------------- each bad case: one line


def _one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture
def fresh_clients():
    """s3fs caches clients per options, not per environment: start and end with none."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _ingest(url: str) -> list[str]:
    return ["ingest", "--demo", url, "--n", "4", "--image-size", "32"]


def test_a_missing_bucket_is_one_line_and_nothing_is_written(s3, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line(capsys, _ingest("s3://no-such-bucket-salient/d"))
    assert "s3://no-such-bucket-salient/d/" in err and "bucket does not exist" in err
    assert list(tmp_path.iterdir()) == []  # no local folder named "s3:"


def test_a_missing_store_bucket_is_refused_before_any_work(flows, teacher, capsys):
    store = "s3://no-such-bucket-salient/saliency.zarr"
    argv = ["refresh", "--data", flows["s3"]["data"], "--store", store, "--teacher", str(teacher)]
    err = _one_line(capsys, [*argv, "--image-size", str(IMAGE)])
    assert err.startswith("salient refresh: error: s3://no-such-bucket-salient/saliency.zarr: not")


def test_missing_credentials_are_one_line(s3, capsys, fresh_clients):
    urls.set_storage_options({})
    try:
        err = _one_line(capsys, _ingest(f"{s3}/nocreds"))
    finally:
        urls.set_storage_options(OPTIONS)
    assert f"{s3}/nocreds" in err and "no credentials found" in err


def test_an_unreachable_endpoint_is_one_line(s3, capsys, fresh_clients, monkeypatch):
    with socket_closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        urls.set_storage_options({**OPTIONS, "config_kwargs": {"retries": {"max_attempts": 1}}})
        try:
            err = _one_line(capsys, _ingest(f"{s3}/unreachable"))
        finally:
            urls.set_storage_options(OPTIONS)
    assert f"{s3}/unreachable" in err and "endpoint cannot be reached" in err


def test_a_storage_option_the_client_refuses_is_one_line(s3, capsys, fresh_clients):
    urls.set_storage_options({**OPTIONS, "connect_timeout": 2})  # a botocore name, not s3fs's
    try:
        err = _one_line(capsys, _ingest(f"{s3}/badoption"))
    finally:
        urls.set_storage_options(OPTIONS)
    assert f"{s3}/badoption" in err
    assert "--storage-option connect_timeout is not an option of the s3:// client" in err


def socket_closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, never accepting)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed():
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            yield holder.getsockname()[1]

    return closed()


def test_a_denied_write_is_one_line_and_nothing_is_written(s3, s3_endpoint, capsys, fresh_clients):
    """moto's IAM checks on, a user allowed to read only: the first upload is refused."""
    import boto3
    import requests

    iam = boto3.client("iam", **{"aws_access_key_id": "admin", "aws_secret_access_key": "x"})
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName="reader", PolicyName="ro", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        urls.set_storage_options({"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]})
        err = _one_line(capsys, _ingest(f"{s3}/denied"))
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        urls.set_storage_options(OPTIONS)
    assert f"{s3}/denied/" in err and "access denied" in err
    assert urls.list_names(f"{s3}/denied") == []
