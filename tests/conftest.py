"""Shared fixtures: a local S3 endpoint and one local Ray for the whole session, a demo dataset."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The S3 environment every client of the session sees, Ray's workers included (they inherit
# the environment Ray starts with): a local endpoint, no credentials from the developer's
# machine, and no instance-metadata lookups (botocore would try 169.254.169.254 for keys).
_S3_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_S3_UNSET = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the moto S3 server did not answer on port {port}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer) for the whole session.

    Clients reach it only through ``AWS_ENDPOINT_URL``; credentials are up to each test
    (dummy keys: moto checks none unless a test turns its IAM checks on).
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_for(port, timeout_s=30)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in _S3_UNSET:
            env.delenv(name, raising=False)
        for name, value in {**_S3_ENV, "AWS_ENDPOINT_URL": url}.items():
            env.setenv(name, value)
        yield url
    server.stop()


BUCKET = "salient-patience"
# One attempt per request and a 1 s read timeout: a stalled endpoint fails within seconds.
FAST = {"config_kwargs": {"read_timeout": 1, "retries": {"total_max_attempts": 1}}}


@pytest.fixture
def endpoint(s3_endpoint, tmp_path):
    """``(s3://salient-patience, the moto server's process)``: an S3 endpoint in a child
    process of its own, which a test may stop (SIGSTOP: it accepts connections and never
    answers) or kill; this process's storage options point at it (``FAST``). Everything is
    put back afterwards, the server continued and killed."""
    from salient import urls

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    previous = urls.storage_options()
    try:
        _wait_for(port, timeout_s=60)
        urls.set_storage_options(
            {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}", **FAST}
        )
        urls.filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        yield f"s3://{BUCKET}", server
    finally:
        urls.on_wait(None)
        urls.set_patience(urls.PATIENCE_S)
        urls.set_storage_options(previous)
        if server.poll() is None:
            server.send_signal(signal.SIGCONT)
            server.kill()
        server.wait(30)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size) -> folder``: a tmpfs of ``size`` (e.g. "256k") mounted in ``tmp_path``,
    a real disk that fills up; unmounted afterwards. Skips where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One real local Ray (num_cpus=2) for the whole test session (its cold start is 5–20 s).

    It starts after the S3 endpoint: Ray's workers keep the environment Ray starts with."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A 96-image demo dataset in 3 shards of 32, made by our own ingest (image size 96)."""
    from salient.pipeline.ingest import ingest_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    ingest_demo(out, n=96, seed=0, shard_size=32, image_size=96)
    return out


@pytest.fixture(scope="session")
def demo_val(tmp_path_factory):
    """The held-out demo split beside ``demo_data``: 48 scenes in 2 shards (image size 96)."""
    from salient.pipeline.ingest import ingest_demo

    out = tmp_path_factory.mktemp("demo-val") / "data"
    ingest_demo(out, n=48, seed=0, shard_size=32, image_size=96, split="val")
    return out


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory):
    """A 13000 × 13000 RGB PNG of ~0.5 MB (one grey row, compressed 13000 times): 507 MB once
    decoded. Written chunk by chunk, so making it never holds the pixels. Grey, not black: a
    decode then writes non-zero bytes into every page it allocates."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    side = 13000
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    packer, row = zlib.compressobj(9), b"\x00" + b"\x80" * (3 * side)  # filter byte + grey
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(data + chunk(b"IEND", b""))
    return path
