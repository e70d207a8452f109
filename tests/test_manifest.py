"""Manifests validated strictly, before any work, and shards checked against them as they are read.

Hostile manifests are the session's demo dataset's own manifest with one thing changed (the
fingerprint recomputed, so only that thing is wrong); each must fail in one line naming it,
through the library and through the CLI (exit 2). Replaced shards are the dataset's own tars
overwritten in place with the same number of bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from salient.jobs.cli import main
from salient.pipeline import shards
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import LoaderConfig, SalientLoader
from salient.pipeline.manifest import (
    FORMAT,
    MANIFEST_NAME,
    DatasetError,
    ShardChangedError,
    ShardInfo,
    fingerprint,
    open_dataset,
)


@pytest.fixture
def data(demo_data, tmp_path):
    """A private copy of the session's demo set (3 shards of 32, each > 64 KiB)."""
    out = tmp_path / "data"
    shutil.copytree(demo_data, out)
    return out


def _edit(data, change) -> None:
    """Rewrite the manifest after ``change(body)``, with the fingerprint of what it says now."""
    path = data / MANIFEST_NAME
    body = json.loads(path.read_text())
    change(body)
    try:
        infos = [ShardInfo(**s) for s in body["shards"]]
        body["fingerprint"] = fingerprint(infos, body["num_samples"])
    except (TypeError, KeyError):
        pass  # a hostile shape: the old fingerprint stays
    path.write_text(json.dumps(body))


def _shard(i: int, **values):
    def change(body: dict) -> None:
        body["shards"][i].update(values)

    return change


def _set(**values):
    return lambda body: body.update(values)


def _claim(count: int):
    """Shard 2 claims ``count`` samples, and the totals agree with it."""

    def change(body: dict) -> None:
        body["shards"][2]["count"] = count
        body["num_samples"] = 64 + count
        body["shard_size"] = count

    return change


HOSTILE = [  # (what changes, what the one line must name)
    (_shard(1, name="../../other/shard-000000.tar"), "not a plain file name"),
    (_shard(1, name="/etc/passwd"), "not a plain file name"),
    (_shard(1, name="s3://bucket/shard-000001.tar"), "not a plain file name"),
    (_shard(1, name=".shard-000001.tar"), "not a plain file name"),
    (_shard(1, count="32"), "count must be an integer"),
    (_shard(1, count=True), "count must be an integer"),
    (_shard(1, bytes=1.5e5), "bytes must be an integer"),
    (_set(shards=[]), "lists no shards"),
    (_set(shards={"0": {}}), "lists no shards"),
    (_claim(50_000_000), "claims 50000000 samples in"),
    (_shard(1, first_id=33), "must start at 32"),
    (_shard(1, count=40), "shard_size 32 must be the largest shard's count (40)"),
    (_shard(1, index=5), "has index 5 at position 1"),
    (_shard(1, sha256="beef"), "sha256 must be a sha256"),
    (_shard(1, extra=1), "unknown fields ['extra']"),
    (_set(num_samples=95), "but num_samples is 95"),
    (_set(root="relative/path"), "must be an absolute path or a URL"),
    (_set(format="salient-dataset/9"), "is not one of"),
    (_set(shard_size=2_000_000), "at most 1000000"),
]


@pytest.mark.parametrize(("change", "needle"), HOSTILE)
def test_a_hostile_manifest_is_one_line_before_any_work(data, tmp_path, capsys, change, needle):
    _edit(data, change)
    with pytest.raises(DatasetError) as err:
        open_dataset(data)
    message = str(err.value)
    assert needle in message and "\n" not in message and len(message) < 300, message
    # through the CLI: a job that opens the dataset first (ingest's --classes-from), exit 2
    (tmp_path / "src" / "a").mkdir(parents=True)
    argv = ["ingest", str(tmp_path / "src"), str(tmp_path / "o"), "--classes-from", str(data)]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert needle in line and len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert not (tmp_path / "o").exists()


def test_the_fingerprint_guards_hand_edits(data):
    path = data / MANIFEST_NAME
    body = json.loads(path.read_text())
    body["shards"][2]["count"] = 31
    body["num_samples"] = 95  # consistent counts, but the fingerprint was not redone
    path.write_text(json.dumps(body))
    with pytest.raises(DatasetError, match="fingerprint does not match"):
        open_dataset(data)


def _as_v1(body: dict) -> None:
    """The manifest as ingest wrote it before shard digests were recorded."""
    assert body["format"] == FORMAT
    for shard in body["shards"]:
        shard.pop("sha256"), shard.pop("head_sha256")
    for name in ("root", "image", "label_key", "id_map"):
        body.pop(name)
    body["format"] = "salient-dataset/1"


def _read_all(dataset) -> list[int]:
    return [s["id"] for src in dataset.sources() for s in shards.iter_samples(src, None, {"cls"})]


def test_a_shard_replaced_by_random_bytes_of_the_same_size_is_refused_before_its_samples(data):
    dataset = open_dataset(data)
    shard = data / "shard-000001.tar"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    dataset = open_dataset(data)  # the size matches: the listing cannot tell
    source = dataset.source(dataset.shards[1])
    samples = shards.iter_samples(source, None, {"cls"})
    with pytest.raises(ShardChangedError, match="its first bytes differ") as err:
        next(samples)
    assert "shard-000001.tar" in str(err.value) and len(str(err.value)) < 300
    config = LoaderConfig(
        data=str(data), image_size=32, patch_size=8, batch_size=8, strategy="random", num_workers=2
    )
    with pytest.raises(ShardChangedError) as err:  # the loader's workers read through the check
        for _ in SalientLoader(config).epoch(0):
            pass
    assert "shard-000001.tar" in str(err.value) and "\n" not in str(err.value)  # not wrapped


def test_a_shard_changed_after_its_head_is_refused_when_read_to_its_end(data):
    dataset = open_dataset(data)
    shard = data / "shard-000002.tar"
    raw = bytearray(shard.read_bytes())
    assert len(raw) > 2 * 64 * 1024
    raw[-20_000] ^= 0xFF  # inside an image near the end: the tar still parses
    shard.write_bytes(bytes(raw))
    source = open_dataset(data).source(dataset.shards[2])
    samples = shards.iter_samples(source, None, {"cls"})
    assert next(samples)["id"] == 64  # the head is the recorded one
    with pytest.raises(ShardChangedError, match="its sha256 differs"):
        list(samples)


def test_more_samples_than_recorded_are_refused_never_given_the_next_shards_ids(data):
    """A manifest without digests (the older format) still cannot make a shard's extra
    samples take ids of the next shard."""
    path = data / MANIFEST_NAME
    body = json.loads(path.read_text())
    _as_v1(body)
    body["shards"][2]["count"] = 20  # the tar holds 32
    body["num_samples"] = 84
    infos = [ShardInfo(**s) for s in body["shards"]]
    body["fingerprint"] = fingerprint(infos, 84)
    path.write_text(json.dumps(body))
    dataset = open_dataset(data)
    got = []
    with pytest.raises(ShardChangedError, match="more than the 20 samples"):
        got += [s["id"] for s in shards.iter_samples(dataset.source(dataset.shards[2]))]
    assert got == [] or max(got) < 84


def test_an_older_manifest_without_digests_still_opens_and_reads(data):
    path = data / MANIFEST_NAME
    body = json.loads(path.read_text())
    _as_v1(body)
    path.write_text(json.dumps(body))
    dataset = open_dataset(data)
    assert dataset.fingerprint == body["fingerprint"]  # ingested datasets keep theirs
    assert _read_all(dataset) == list(range(96))


def test_ingest_records_each_shards_size_and_digests(tmp_path):
    manifest = ingest_demo(tmp_path / "d", n=40, shard_size=16, image_size=64)
    for shard in manifest.shards:
        raw = (tmp_path / "d" / shard.name).read_bytes()
        assert shard.bytes == len(raw)
        assert shard.sha256 == hashlib.sha256(raw).hexdigest()
        assert shard.head_sha256 == hashlib.sha256(raw[: 64 * 1024]).hexdigest()
    assert [s.count for s in manifest.shards] == [16, 16, 8]
    dataset = open_dataset(tmp_path / "d")
    assert dataset.num_ids == dataset.num_samples == 40  # ingest leaves no gaps
    assert _read_all(dataset) == list(range(40))
