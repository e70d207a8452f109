"""Nothing silently wrong in the store: checksummed chunks, damaged chunks read as "no map",
readers' leases that gc respects, failure paths that keep their first error.

Real parts only: the demo dataset made by our own ingest (real tars), real zarr stores on disk,
bytes flipped in the chunk files on disk, real child processes holding leases (``spawn``),
results checked through plain zarr and the raw chunk files.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import signal
import warnings
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from salient import urls
from salient.pipeline.loader import LoaderConfig, SalientLoader
from salient.pipeline.manifest import open_dataset
from salient.store import (
    DamagedChunk,
    GenerationNotFoundError,
    NotPublishedError,
    SaliencyStore,
)
from salient.store.testing import hold_generation, hold_reader, synthetic_teacher

GRID, IMAGE, PATCH, SHARD = 12, 64, 8, 32  # demo_data: 96 scenes in 3 shards of 32
SPAWN = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------- helpers


def teacher(seed: int) -> dict:
    return {**synthetic_teacher(seed), "image_size": GRID * PATCH, "patch_size": PATCH}


def written_maps(seed: int, n: int = 96) -> np.ndarray:
    """The maps a generation of ``seed`` holds: positive, finite, float16."""
    return np.random.default_rng(seed).random((n, GRID, GRID)).astype(np.float16) + 0.01


def publish(store: SaliencyStore, seed: int) -> str:
    writer = store.begin_generation(teacher(seed), "cls_attn", GRID * PATCH, PATCH, epoch=seed)
    maps = written_maps(seed, store.num_samples)
    for shard in range(store.num_shards):
        start, stop = store.layout.shard_range(shard)
        writer.write_shard(shard, maps[start:stop], np.ones(stop - start, np.uint8))
    writer.publish()
    return writer.name


@pytest.fixture
def store(demo_data, tmp_path) -> SaliencyStore:
    """A store over the demo dataset's real tars with one published generation (seed 1)."""
    made = SaliencyStore.create(tmp_path / "s.zarr", open_dataset(demo_data), grid=GRID)
    publish(made, 1)
    return made


def chunk_file(store: SaliencyStore, name: str, array: str, chunk: int) -> Path:
    trailing = {"maps": ["0", "0"], "head_maps": ["0", "0", "0"]}.get(array, [])
    return Path(store.url, name, array, "c", str(chunk), *trailing)


def flip_bytes(path: Path, count: int = 4) -> None:
    """Flip ``count`` bytes in the middle of a file on disk (a bit rot / a bad copy)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def with_crc(payload: bytes) -> bytes:
    """``payload`` followed by its CRC-32C, as zarr's crc32c codec stores a chunk."""
    return payload + np.uint32(google_crc32c.value(payload)).tobytes()


def plain_rows(store: SaliencyStore, name: str, array: str, chunk: int) -> np.ndarray:
    """One chunk's rows read with plain zarr (an independent reader)."""
    data = zarr.open_array(Path(store.url, name, array), mode="r")
    return data[chunk * SHARD : (chunk + 1) * SHARD]


def nan_rows(maps: np.ndarray) -> np.ndarray:
    return np.isnan(maps.astype(np.float32)).all(axis=(1, 2))


# ---------------------------------------------------------------- checksums


def test_a_new_generation_carries_the_crc32c_codec_that_plain_zarr_verifies(store):
    name = store.current()
    for array in ("maps", "valid", "shards_done"):
        codecs = zarr.open_array(Path(store.url, name, array), mode="r").metadata.codecs
        assert type(codecs[-1]).__name__ == "Crc32cCodec", (array, codecs)  # last: stored bytes
    flip_bytes(chunk_file(store, name, "maps", 1))
    with pytest.raises(ValueError, match="checksum"):  # plain zarr refuses the chunk too
        plain_rows(store, name, "maps", 1)
    np.testing.assert_array_equal(plain_rows(store, name, "maps", 0), written_maps(1)[:SHARD])


def test_flipped_bytes_in_a_published_chunk_read_as_no_map_and_are_named(store):
    name = store.current()
    flip_bytes(chunk_file(store, name, "maps", 1))
    reader = store.bind()
    maps, valid = reader.read_range(0, 96)  # three chunks in one call: no error
    damaged = nan_rows(maps)
    assert damaged.tolist() == [32 <= i < 64 for i in range(96)]
    assert valid.tolist() == [0 if 32 <= i < 64 else 1 for i in range(96)]
    keep = ~damaged
    np.testing.assert_array_equal(maps[keep], written_maps(1)[keep])  # the rest, bit for bit
    assert reader.damaged == [DamagedChunk(name, "maps", 1, 32, 64, "fails its CRC-32C checksum")]
    assert reader.damaged_between(0, 32) == [] and len(reader.damaged_between(60, 70)) == 1
    ids = [70, 40, 3, 40]  # any order, repeats, across chunks
    maps_ids, valid_ids = reader.read_ids(ids)
    assert nan_rows(maps_ids).tolist() == [False, True, False, True]
    assert valid_ids.tolist() == [1, 0, 1, 0]
    assert (
        str(reader.damaged[0])
        == "gen-000001: chunk 1 of maps (ids 32..63) fails its CRC-32C checksum"
    )

    report = store.verify(name)
    assert report.checksummed and report.chunks == 3 + 2 * 3  # markers, then maps and valid
    assert [(d.array, d.chunk, d.reason) for d in report.damaged] == [
        ("maps", 1, "fails its CRC-32C checksum")
    ]
    assert not report.ok and store.verify(publish(store, 2)).ok  # a whole one is whole


def test_a_chunk_that_does_not_decode_and_a_missing_one(store):
    name = store.current()
    # the checksum holds, but the bytes are no zstd frame: the decoding itself fails
    chunk_file(store, name, "maps", 0).write_bytes(with_crc(b"\x00" * 64))
    chunk_file(store, name, "valid", 2).write_bytes(with_crc(b"\x01" * 5))  # 5 of 32 flags
    maps, valid = store.bind().read_range(0, 96)
    no_map = nan_rows(maps) | (valid == 0)
    assert np.flatnonzero(no_map).tolist() == [*range(32), *range(64, 96)]
    assert nan_rows(maps).tolist() == no_map.tolist()  # rows of a damaged valid chunk too
    np.testing.assert_array_equal(maps[32:64], written_maps(1)[32:64])

    chunk_file(store, name, "valid", 1).unlink()  # a published chunk that vanished
    found = {(d.array, d.chunk): d.reason for d in store.verify(name).damaged}
    assert set(found) == {("maps", 0), ("valid", 2), ("valid", 1)}
    assert found[("maps", 0)].startswith("does not decode (RuntimeError: Zstd decompression")
    assert found[("valid", 2)].startswith("does not decode (ValueError")
    assert found[("valid", 1)] == "is missing"


def test_a_damaged_marker_means_the_shard_is_written_again(store):
    writer = store.begin_generation(teacher(3), "cls_attn", GRID * PATCH, PATCH, epoch=3)
    maps = written_maps(3)
    for shard in (0, 1):
        writer.write_shard(
            shard, maps[shard * SHARD : (shard + 1) * SHARD], np.ones(SHARD, np.uint8)
        )
    assert writer.missing_shards() == [2]
    flip_bytes(chunk_file(store, writer.name, "shards_done", 1), count=1)
    assert writer.missing_shards() == [1, 2]
    report = store.verify(writer.name)  # unpublished: shard 2's absent marker is no damage
    assert [(d.array, d.chunk) for d in report.damaged] == [("shards_done", 1)]
    assert str(report.damaged[0]).endswith("(the marker of shard 1) fails its CRC-32C checksum")
    assert {g["name"]: g["shards_done"] for g in store.generations()}[writer.name] == 1


def test_a_generation_written_before_checksums_stays_readable(store):
    """The arrays as salient wrote them before checksums (zarr's default zstd for maps, no
    codec for the flags): read as before; a chunk that does not decode is still caught."""
    writer = store.begin_generation(teacher(4), "cls_attn", GRID * PATCH, PATCH, epoch=4)
    group = zarr.open_group(Path(store.url, writer.name), mode="r+")
    for array in ("maps", "valid", "shards_done"):
        old = group[array]
        group.create_array(
            array,
            shape=old.shape,
            chunks=old.chunks,
            dtype=old.dtype,
            fill_value=old.fill_value,
            attributes=dict(old.attrs),
            dimension_names=old.metadata.dimension_names,
            overwrite=True,
            **({} if array == "maps" else {"compressors": None}),
        )
    writer = store.resume_generation(writer.name)
    maps = written_maps(4)
    for shard in range(3):
        writer.write_shard(
            shard, maps[shard * SHARD : (shard + 1) * SHARD], np.ones(SHARD, np.uint8)
        )
    writer.publish()
    codecs = zarr.open_array(Path(store.url, writer.name, "maps"), mode="r").metadata.codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec", "ZstdCodec"]
    got, valid = store.bind().read_range(0, 96)
    np.testing.assert_array_equal(got, maps)
    report = store.verify(writer.name)
    assert report.ok and not report.checksummed

    chunk_file(store, writer.name, "maps", 2).write_bytes(b"not a zstd frame")
    got, valid = store.bind().read_range(0, 96)
    assert nan_rows(got).tolist() == [i >= 64 for i in range(96)] and valid[64:].sum() == 0
    (damaged,) = store.verify(writer.name).damaged
    assert (damaged.array, damaged.chunk) == ("maps", 2)


# ---------------------------------------------------------------- the loader


def test_the_loader_masks_damaged_rows_at_random_counts_them_and_names_the_chunk(store, demo_data):
    name = store.current()
    flip_bytes(chunk_file(store, name, "maps", 2))
    config = LoaderConfig(
        data=str(demo_data),
        store=store.url,
        image_size=IMAGE,
        patch_size=PATCH,
        batch_size=16,
        strategy="amt",
        num_workers=1,  # a DataLoader worker process reads the store: counts travel back
        shuffle_buffer=20,
        chunk_size=8,
    )
    loader = SalientLoader(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            batches = list(loader.epoch(epoch))
            without = {
                i for b in batches for i, h in zip(b["ids"].tolist(), b["has_saliency"]) if not h
            }
            assert without == set(range(64, 96))  # exactly the damaged chunk's ids
            stats = loader.stats
            assert (stats.corrupt_maps, stats.fallback, stats.corrupt) == (32, 32, 0)
            assert [(d.generation, d.array, d.chunk) for d in stats.damaged_chunks] == [
                (name, "maps", 2)
            ]
    lines = [str(w.message) for w in caught if "damaged map chunk" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]  # once for the loader's life
    assert f"{name}: chunk 2 of maps (ids 64..95)" in lines[0] and store.url in lines[0]


# ---------------------------------------------------------------- readers' leases and gc


@pytest.fixture
def three(demo_data, tmp_path) -> tuple[SaliencyStore, list[str]]:
    made = SaliencyStore.create(tmp_path / "s.zarr", open_dataset(demo_data), grid=GRID)
    return made, [publish(made, seed) for seed in (1, 2, 3)]


def child(target, *args):
    ready = SPAWN.Event()
    process = SPAWN.Process(target=target, args=(*args, ready))
    process.start()
    assert ready.wait(120), "the child did not start"
    return process


def kill(process) -> None:
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    process.join(30)


def test_gc_refuses_a_generation_a_reader_holds_and_names_the_reader(three):
    store, (first, second, third) = three
    reader = child(hold_reader, store.url, first, "train run runs/amt")
    try:
        plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=0)}
        assert not plan[first]["remove"] and plan[second]["remove"]
        assert plan[first]["reason"].startswith(
            f"held by a reader: train run runs/amt (pid {reader.pid} on host"
        )
        assert store.gc(keep=1, grace_s=0) == [second]
        assert [r["generation"] for r in store.readers()] == [first]
        assert store.bind(first).read_range(0, 1)[1].tolist() == [1]  # still whole
    finally:
        kill(reader)
    assert store.gc(keep=1, grace_s=0) == [first]  # its reader is dead: nothing holds it
    root = zarr.open_group(store.url, mode="r", use_consolidated=False)
    assert sorted(root.group_keys()) == [third, "readers"]
    assert list(root["readers"].group_keys()) == []  # the dead reader's record went too


def test_gc_lists_a_dead_readers_record_it_drops(three):
    from salient.jobs.gc import GcConfig, run_gc

    store, (first, _, _) = three
    reader = child(hold_reader, store.url, first, "train run runs/amt")
    kill(reader)  # a run killed while bound: its lease record stays behind, holding nothing
    said = run_gc(GcConfig(store.url, keep=1, grace_s=0, dry_run=True))
    line = f"reader: train run runs/amt held {first}; it is dead (pid {reader.pid} on host"
    assert line in said and said.count("reader:") == 1 and "its record would go" in said
    assert "its record removed" in run_gc(GcConfig(store.url, keep=1, grace_s=0))
    assert store.readers() == []


def test_a_reader_in_this_process_holds_for_the_block(three):
    store, (first, _, third) = three
    with store.hold(first, "inspect") as lease:
        assert lease.record["generation"] == first
        plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=0)}
        assert "held by a reader: inspect" in plan[first]["reason"]
        assert first not in store.gc(keep=1, grace_s=0)
    assert store.readers() == []
    assert store.gc(keep=1, grace_s=0) == [first]
    with pytest.raises(GenerationNotFoundError, match=first):
        store.hold(first, "late")
    writer = store.begin_generation(teacher(9), "cls_attn", GRID * PATCH, PATCH)
    with pytest.raises(NotPublishedError, match="not published"):
        store.hold(writer.name, "early")
    assert store.readers() == [] and store.current() == third


def test_gc_names_a_dead_driver_dead(three):
    store, _ = three
    driver = child(hold_generation, store.url, 7, [0])
    name = store.generations()[-1]["name"]
    kill(driver)
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=3600)}
    reason = plan[name]["reason"]
    assert not plan[name]["remove"] and f"its driver (pid {driver.pid}) is dead" in reason
    assert "seen less" not in reason and "kept for a resuming refresh" in reason
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=0)}
    assert plan[name]["remove"] and "is dead, last renewed" in plan[name]["reason"]

    writer = store.begin_generation(teacher(8), "cls_attn", GRID * PATCH, PATCH)
    store.keep_alive(writer).release()  # a driver that let go: nobody holds it
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=3600)}
    assert "no driver holds it" in plan[writer.name]["reason"]


# ---------------------------------------------------------------- failure paths


def test_a_full_disk_while_staging_is_one_line_and_a_failed_cleanup_only_a_note(tmp_path):
    url = str(tmp_path / "shard-000000.tar")
    with pytest.raises(urls.StorageError) as raised, urls.staged(url) as tmp:
        Path(tmp).write_bytes(b"half a shard")
        os.unlink(tmp)
        os.mkdir(tmp)  # the temporary name now holds a folder: its removal fails
        (Path(tmp) / "x").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")  # what the write raised
    assert str(raised.value) == (
        f"{url}: the disk is full ([Errno 28] No space left on device); free space or write "
        "elsewhere, then rerun"
    )  # not the cleanup's IsADirectoryError
    (note,) = raised.value.__notes__
    assert note.startswith(f"removing the staged file {tmp} failed too: StorageError")
    assert not Path(url).exists()


def test_a_lease_released_on_a_failure_path_keeps_the_first_error(store):
    writer = store.begin_generation(teacher(5), "cls_attn", GRID * PATCH, PATCH)
    first = RuntimeError("the teacher ran out of memory")
    with pytest.raises(RuntimeError) as raised, store.keep_alive(writer):
        shutil.rmtree(store.url)  # the store vanishes: releasing the lease cannot work
        raise first
    assert raised.value is first
    (note,) = raised.value.__notes__
    assert note.startswith(f"releasing the writer lease of {writer.name} failed too")


def test_a_lease_block_releases_on_error_and_not_after_stop(store):
    writer = store.begin_generation(teacher(6), "cls_attn", GRID * PATCH, PATCH)
    with pytest.raises(KeyError), store.keep_alive(writer):
        raise KeyError("boom")
    assert store.writer_state(writer.name) == ("none", None)  # released for the next driver
    resumed = store.open_or_resume(teacher(6), "cls_attn", GRID * PATCH, PATCH)  # its lease
    assert resumed.name == writer.name
    with store.keep_alive(resumed) as lease:
        lease.stop()  # the holder is done with it (a publish clears it itself)
    assert store.writer_state(resumed.name)[0] == "mine"  # left as it was
