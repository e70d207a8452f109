"""Storage with finite patience, against a real S3 endpoint that stalls or goes away.

The endpoint is moto's server in a child process of its own (the ``endpoint`` fixture of
conftest.py), so a test can stop it (SIGSTOP: it accepts connections and never answers) or
kill it. Clients reach it only through the storage options (``endpoint_url``), with a read
timeout of 1 s and one attempt per request so a stall ends within seconds; the defaults are
checked separately.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import FAST

from salient import urls
from salient.store import SaliencyStore
from salient.store.paths import store_like
from salient.store.testing import synthetic_dataset, synthetic_teacher


def new_store(url: str) -> tuple[SaliencyStore, str]:
    """A store of 3 shards of 10 on S3 with one published generation."""
    store = SaliencyStore.create(url, synthetic_dataset(30, 10), grid=4)
    writer = store.begin_generation(synthetic_teacher(1), "cls_attn", 32, 8)
    for shard in range(3):
        writer.write_shard(shard, np.ones((10, 4, 4), np.float16), np.ones(10, np.uint8))
    writer.publish()
    return store, writer.name


def test_every_remote_client_has_timeouts_that_storage_options_override(s3_endpoint):
    previous = urls.storage_options()
    try:
        urls.set_storage_options({"key": "k", "secret": "s"})
        fs, _ = urls.filesystem("s3://any-bucket")
        fs.connect()  # builds the botocore client; no request
        config = fs.s3.meta.config
        assert (config.connect_timeout, config.read_timeout) == (urls.CONNECT_S, urls.READ_S)
        assert config.retries == {"total_max_attempts": urls.S3_ATTEMPTS, "mode": "standard"}
        assert fs.retries == urls.S3FS_TRIES  # s3fs's own tries around each call
        zarr_fs = store_like("s3://any-bucket/s.zarr")["store"].fs  # what the store opens
        assert zarr_fs.asynchronous and zarr_fs.retries == urls.S3FS_TRIES

        urls.set_storage_options({"key": "k", "secret": "s", **FAST})  # --storage-option
        fs, _ = urls.filesystem("s3://any-bucket")
        fs.connect()
        config = fs.s3.meta.config
        assert (config.connect_timeout, config.read_timeout) == (urls.CONNECT_S, 1)
        assert config.retries == {"total_max_attempts": 1, "mode": "standard"}  # merged
    finally:
        urls.set_storage_options(previous)
    http, _ = urls.filesystem("http://127.0.0.1:9/data")
    timeout = http.client_kwargs["timeout"]
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (10, 15, None)
    gcs = urls.fsspec_options("gs://bucket/d")["requests_timeout"]  # gcsfs: per request
    assert (gcs.sock_connect, gcs.sock_read, gcs.total) == (10, 15, None)
    assert "config_kwargs" not in urls.fsspec_options("memory://x")


def test_a_stalled_endpoint_heartbeats_then_ends_in_one_line_and_a_rerun_goes_on(endpoint):
    bucket, server = endpoint
    store, name = new_store(f"{bucket}/s.zarr")
    beats: list[tuple[str, float]] = []
    urls.on_wait(lambda url, seconds: beats.append((url, seconds)), every_s=0.5)
    server.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    with pytest.raises(urls.StorageError) as stalled:
        store.current()
    message = str(stalled.value)
    assert message.startswith(f"{store.url}: the endpoint stopped answering (Read timeout")
    assert "rerun when it answers" in message and "\n" not in message and len(message) < 400
    assert beats and {url for url, _ in beats} == {store.url}  # the heartbeat named the store
    assert [s for _, s in beats] == [0.5 * (i + 1) for i in range(len(beats))]

    server.send_signal(signal.SIGCONT)
    assert store.current() == name  # nothing was lost: the same call now succeeds


def test_a_stalled_upload_is_cancelled_after_its_limit(endpoint):
    bucket, server = endpoint
    url = f"{bucket}/big.tar"
    urls.set_patience(1)
    data = os.urandom(8 * 2**20)  # more than the socket buffers hold: the write itself blocks
    server.send_signal(signal.SIGSTOP)
    with pytest.raises(urls.StorageError) as stalled:
        urls.write_bytes(url, data)
    limit = urls.upload_limit_s(len(data))
    assert str(stalled.value) == (
        f"{url}: the endpoint stopped answering: an upload of {len(data)} bytes did not finish "
        f"within {limit:.0f} s; nothing was written under that name — rerun when it answers"
    )
    server.send_signal(signal.SIGCONT)
    assert urls.read_bytes(url) is None  # no half object under the final name
    urls.write_bytes(url, data)  # the rerun
    assert urls.read_bytes(url) == data


def test_an_endpoint_gone_keeps_the_first_error_when_the_lease_cannot_be_released(endpoint):
    bucket, server = endpoint
    store, _ = new_store(f"{bucket}/s.zarr")
    writer = store.begin_generation(synthetic_teacher(2), "cls_attn", 32, 8)
    with pytest.raises(urls.StorageError) as gone, store.keep_alive(writer):
        server.kill()
        server.wait(30)
        writer.write_shard(0, np.ones((10, 4, 4), np.float16), np.ones(10, np.uint8))
    message = str(gone.value)
    assert message.startswith(f"{store.url}: the endpoint cannot be reached")
    assert "\n" not in message
    (note,) = gone.value.__notes__  # the release failed too: a note, not the error
    assert note.startswith(f"releasing the writer lease of {writer.name} failed too")


def test_a_stream_read_that_stalls_heartbeats_and_ends(endpoint):
    bucket, server = endpoint
    url = f"{bucket}/shard-000000.tar"
    urls.write_bytes(url, b"x" * 1000)
    beats: list[str] = []
    urls.on_wait(lambda waited_url, seconds: beats.append(waited_url), every_s=0.5)
    with urls.open_read(url) as stream:  # opened while the endpoint answers
        server.send_signal(signal.SIGSTOP)
        with pytest.raises(Exception) as stalled:  # the client's own error type
            stream.read()
    error = urls.as_storage_error(url, stalled.value)  # what shards.iter_samples raises
    assert error is not None and "the endpoint stopped answering" in str(error)
    assert beats and set(beats) == {url}


def test_a_forked_reader_keeps_the_heartbeat(tmp_path):
    # DataLoader workers are forked from a train rank that set its heartbeat: the child's
    # storage calls still report, from a watcher of its own (the parent's thread is not there).
    beats = tmp_path / "beats"
    urls.on_wait(lambda url, seconds: beats.open("a").write(f"{os.getpid()} {url}\n"), 0.2)
    try:
        pid = os.fork()
        if pid == 0:  # the child: one storage call that waits 0.7 s
            try:
                with urls.storage_errors("s3://bucket/slow"):
                    time.sleep(0.7)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        urls.on_wait(None)
    lines = beats.read_text().splitlines() if beats.exists() else []
    assert lines and all(line == f"{pid} s3://bucket/slow" for line in lines), lines


def test_a_stalled_endpoint_leaves_a_lease_to_go_stale_instead_of_waiting_again():
    # Clearing a lease writes to the store's endpoint: after it stopped answering, that write
    # would wait as long again in silence; the lease is left to go stale (60 s) instead.
    from salient.store.lease import Lease

    cleared: list[str] = []

    def clear(name: str) -> None:
        cleared.append(name)

    stalled = urls.StorageError("s3://b/s.zarr: the endpoint stopped answering")
    stalled.stalled = True
    lease = Lease({"pid": 1}, write=lambda r: None, clear=lambda: clear("stalled"))
    with pytest.raises(urls.StorageError) as raised, lease:
        raise stalled
    assert cleared == [] and lease._stopped.is_set()
    assert raised.value.__notes__ == [
        "the lease was left to go stale: the endpoint stopped answering"
    ]
    wrapped = RuntimeError("a Ray task's wrapper")
    wrapped.cause = stalled  # RayTaskError keeps what it wraps as .cause
    with pytest.raises(RuntimeError), Lease({}, lambda r: None, lambda: clear("wrapped")):
        raise wrapped
    assert cleared == []
    refused = urls.StorageError("s3://b/s.zarr: access denied")  # not a stall: released
    with pytest.raises(urls.StorageError), Lease({}, lambda r: None, lambda: clear("denied")):
        raise refused
    assert cleared == ["denied"]


def test_flipped_bytes_in_a_chunk_on_s3_read_as_no_map_and_verify_names_it(endpoint):
    # The checksum travels with the chunk object: a bad copy on object storage is caught as
    # on local disk (the reader's rows read as no map; verify names the chunk).
    bucket, _ = endpoint
    store, name = new_store(f"{bucket}/flipped.zarr")
    fs, _ = urls.filesystem(bucket)
    key = f"{store.url.removeprefix('s3://')}/{name}/maps/c/1/0/0"
    data = bytearray(fs.cat_file(key))
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    fs.pipe_file(key, bytes(data))
    reader = SaliencyStore.open(store.url).bind()
    maps, valid = reader.read_range(0, 30)
    assert valid.tolist() == [0 if 10 <= i < 20 else 1 for i in range(30)]
    assert np.isnan(maps[10:20].astype(np.float32)).all() and (maps[:10] == 1).all()
    assert [str(d) for d in reader.damaged] == [
        f"{name}: chunk 1 of maps (ids 10..19) fails its CRC-32C checksum"
    ]
    report = store.verify(name)
    assert [(d.array, d.chunk) for d in report.damaged] == [("maps", 1)] and not report.ok
