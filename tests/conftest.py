"""Shared fixtures: a local S3 endpoint and one local Ray for the whole session, a demo dataset."""

from __future__ import annotations

import logging
import os
import socket
import time

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
