"""The saliency store on real zarr on disk, with real writer / publisher processes.

Results are checked through an independent path: plain ``zarr.open_group`` / ``open_array``
and the raw chunk files, against maps recomputed from their seeds
(``salient.store.testing``: every row is a pure function of seed, shard and row). Child
processes use the ``spawn`` context and entry points from the package.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from salient.errors import SalientError
from salient.store import (
    FingerprintMismatchError,
    GenerationNotFoundError,
    GenerationStateError,
    IdRangeError,
    IncompleteGenerationError,
    LayoutMismatchError,
    NotPublishedError,
    SaliencyStore,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
)
from salient.store.testing import (
    publish_generations,
    synthetic_dataset,
    synthetic_shard,
    synthetic_teacher,
    write_shards,
)

N, SHARD, GRID, PATCH = 1030, 100, 6, 8  # 11 shards, the last one holds 30 ids
SHARDS = 11
SPAWN = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------- helpers


def new_store(path: Path, n: int = N) -> SaliencyStore:
    return SaliencyStore.create(path, synthetic_dataset(n, SHARD, path.parent), grid=GRID)


def begin(store: SaliencyStore, seed: int, heads: int | None = None):
    return store.begin_generation(
        synthetic_teacher(seed),
        "cls_attn",
        image_size=GRID * PATCH,
        patch_size=PATCH,
        epoch=seed,
        heads=heads,
    )


def write(writer, store: SaliencyStore, shard: int, seed: int) -> None:
    start, stop = store.layout.shard_range(shard)
    maps, valid, heads = synthetic_shard(seed, shard, stop - start, GRID, writer.attrs["heads"])
    writer.write_shard(shard, maps, valid, head_maps=heads)


def publish(store: SaliencyStore, seed: int, heads: int | None = None) -> str:
    writer = begin(store, seed, heads)
    for shard in range(store.num_shards):
        write(writer, store, shard, seed)
    writer.publish()
    return writer.name


def expected(seed: int, n: int = N, heads: int | None = None) -> dict[str, np.ndarray]:
    """What a generation written with ``seed`` must hold, from the generator alone."""
    parts = [
        synthetic_shard(seed, i, min(SHARD, n - s), GRID, heads)
        for i, s in enumerate(range(0, n, SHARD))
    ]
    out = {
        "maps": np.concatenate([p[0] for p in parts]).astype(np.float16),
        "valid": np.concatenate([p[1] for p in parts]),
    }
    if heads is not None:
        out["head_maps"] = np.concatenate([p[2] for p in parts]).astype(np.float16)
    return out


def bits(array: np.ndarray) -> np.ndarray:
    """float16 as its raw bits, so NaN rows compare equal."""
    return np.asarray(array).view(np.uint16) if array.dtype == np.float16 else np.asarray(array)


def same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and bool((bits(got) == bits(want)).all())


def plain(path: Path, name: str) -> dict[str, np.ndarray]:
    """A generation's arrays read with plain zarr.open_array, one path per array."""
    group = zarr.open_group(path / name, mode="r", use_consolidated=False)
    return {key: zarr.open_array(path / name / key, mode="r")[:] for key in group.array_keys()}


def chunk_files(path: Path, name: str) -> dict[str, bytes]:
    """Every file of a generation but its own zarr.json (which holds times), and no
    ``*.partial`` temp file a killed writer may leave (zarr never reads those)."""
    base = path / name
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p != base / "zarr.json" and not p.name.endswith(".partial")
    }


def spawn(fn, *args):
    proc = SPAWN.Process(target=fn, args=args)
    proc.start()
    return proc


def root_attrs(path: Path) -> dict:
    return dict(zarr.open_group(path, mode="r", use_consolidated=False).attrs)


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# ---------------------------------------------------------------- 1. parallel == serial


def test_four_writer_processes_match_a_serial_writer_byte_for_byte(tmp_path):
    serial = new_store(tmp_path / "serial.zarr")
    assert publish(serial, seed=7, heads=2) == "gen-000001"
    parallel = new_store(tmp_path / "parallel.zarr")
    writer = begin(parallel, seed=7, heads=2)
    procs = [
        spawn(write_shards, parallel.url, writer.name, list(range(SHARDS))[k::4][::-1], 7)
        for k in range(4)
    ]
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert writer.missing_shards() == []
    writer.publish()

    a, b = (
        chunk_files(tmp_path / "serial.zarr", "gen-000001"),
        chunk_files(tmp_path / "parallel.zarr", writer.name),
    )
    assert len(a) == 4 * SHARDS + 4  # maps, head_maps, valid, shards_done: chunks + zarr.json
    assert a == b
    got, want = plain(tmp_path / "parallel.zarr", writer.name), expected(7, heads=2)
    for key in ("maps", "head_maps", "valid"):
        assert same(got[key], want[key]), key
    assert got["shards_done"].tolist() == [1] * SHARDS
    assert np.isnan(got["maps"][want["valid"] == 0].astype(np.float32)).all()


# ---------------------------------------------------------------- 2. SIGKILL and resume


def _wait_for_markers(path: Path, name: str, proc, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.is_alive(), "the writer exited before it was killed"
        if zarr.open_array(path / name / "shards_done", mode="r")[:].sum() >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} shards done within {timeout} s")


def _shard_files(path: Path, name: str, shard: int) -> list[Path]:
    return [
        path / name / "maps" / "c" / str(shard) / "0" / "0",
        path / name / "valid" / "c" / str(shard),
        path / name / "shards_done" / "c" / str(shard),
    ]


def test_sigkilled_writer_leaves_current_readable_and_resume_redoes_only_missing(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    first = publish(store, seed=1)
    writer = begin(store, seed=2)
    proc = spawn(write_shards, store.url, writer.name, list(range(SHARDS)), 2, 0.15)
    _wait_for_markers(path, writer.name, proc, at_least=3)
    proc.kill()  # SIGKILL
    proc.join()
    assert proc.exitcode == -signal.SIGKILL

    done = np.flatnonzero(zarr.open_array(path / writer.name / "shards_done")[:]).tolist()
    assert 3 <= len(done) < SHARDS and done == list(range(len(done)))  # written in order
    assert store.current() == root_attrs(path)["current"] == first
    reader, want = store.bind(), expected(1)
    assert reader.name == first
    assert same(reader.read_range(0, N)[0], want["maps"])
    assert same(plain(path, first)["maps"], want["maps"])

    before = {p: p.stat().st_mtime_ns for s in done for p in _shard_files(path, writer.name, s)}
    resumed = store.resume_generation()
    assert resumed.name == writer.name
    missing = resumed.missing_shards()
    assert missing == [s for s in range(SHARDS) if s not in done]
    for shard in missing:
        write(resumed, store, shard, seed=2)
    resumed.publish()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # done shards not rewritten
    assert store.current() == writer.name

    reference = new_store(tmp_path / "uninterrupted.zarr")
    publish(reference, seed=1)
    assert publish(reference, seed=2) == writer.name
    assert chunk_files(path, writer.name) == chunk_files(
        tmp_path / "uninterrupted.zarr", writer.name
    )
    assert same(plain(path, writer.name)["maps"], expected(2)["maps"])


# ---------------------------------------------------------------- 3. readers never tear


def test_bound_reader_sees_only_its_generation_while_another_process_publishes(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    first = publish(store, seed=1)
    reader, want = store.bind(), expected(1)
    rng = np.random.default_rng(0)
    proc = spawn(publish_generations, store.url, [2, 3], 0.3)
    reads = mismatches = 0
    seen = set()
    while proc.is_alive() or reads < 2 * SHARDS:
        shard = reads % SHARDS
        start, stop = store.layout.shard_range(shard)
        maps, valid = reader.read_shard(shard)
        ids = rng.integers(0, N, 64)
        id_maps, id_valid = reader.read_ids(ids)
        mismatches += not (
            same(maps, want["maps"][start:stop])
            and same(valid, want["valid"][start:stop])
            and same(id_maps, want["maps"][ids])
            and same(id_valid, want["valid"][ids])
        )
        seen.add(store.current())
        reads += 1
    proc.join()
    assert proc.exitcode == 0
    assert mismatches == 0
    assert {"gen-000002", "gen-000003"} & seen, "no read overlapped a publish"
    assert store.current() == "gen-000003"
    # the publisher's gc(keep=1, grace_s=3600) kept the generations replaced a moment ago
    assert [g["name"] for g in store.generations()] == [first, "gen-000002", "gen-000003"]
    assert same(reader.read_range(0, N)[0], want["maps"])
    fresh = store.bind()
    assert fresh.name == "gen-000003" and same(fresh.read_range(0, N)[0], expected(3)["maps"])


# ---------------------------------------------------------------- 4. publish and gc


def test_publish_with_a_missing_shard_refuses_and_changes_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    first = publish(store, seed=1)
    writer = begin(store, seed=2)
    for shard in range(SHARDS):
        if shard != 3:
            write(writer, store, shard, seed=2)
    with pytest.raises(IncompleteGenerationError, match=r"1 of 11 shards.*\[3\].*resumes"):
        writer.publish()
    assert store.current() == root_attrs(path)["current"] == first
    status = {g["name"]: (g["status"], g["shards_done"]) for g in store.generations()}
    assert status == {first: ("published", SHARDS), writer.name: ("writing", SHARDS - 1)}
    with pytest.raises(NotPublishedError, match="writing"):
        store.bind(writer.name)
    write(writer, store, 3, seed=2)
    writer.publish()
    assert store.current() == writer.name
    with pytest.raises(GenerationStateError, match="published"):
        write(writer, store, 0, seed=2)
    with pytest.raises(GenerationStateError, match="published"):
        store.resume_generation(writer.name)


def test_gc_respects_current_in_progress_kept_and_grace(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path, n=250)
    g1, g2 = publish(store, 1), publish(store, 2)
    time.sleep(1.5)
    g3 = publish(store, 3)  # g1 was replaced > 1.5 s ago, g2 just now
    assert store.gc(keep=1, grace_s=3600) == []
    assert store.gc(keep=1, grace_s=1.2) == [g1]
    in_progress = begin(store, 4)
    write(in_progress, store, 0, seed=4)
    dead = begin(store, 5)  # an abandon that was interrupted before its delete
    zarr.open_group(path / dead.name, mode="r+").update_attributes({"status": "abandoned"})
    assert store.gc(keep=2, grace_s=0) == [dead.name]  # g2 is among the 2 newest published
    assert store.gc(keep=1, grace_s=0) == [g2]
    assert store.gc(keep=1, grace_s=0) == []

    group = zarr.open_group(path, mode="r", use_consolidated=False)
    assert sorted(group.group_keys()) == [g3, in_progress.name]
    assert group.attrs["current"] == g3 and list(group.attrs["published"]) == [g3]
    assert store.resume_generation().missing_shards() == [1, 2]
    with pytest.raises(GenerationNotFoundError, match=f"{g1}.*{g3}"):
        store.bind(g1)
    with pytest.raises(StoreError, match="keep must be a positive integer"):
        store.gc(keep=0)
    in_progress.abandon()
    assert [g["name"] for g in store.generations()] == [g3]


# ---------------------------------------------------------------- 5. clear errors


def test_store_of_another_dataset_is_refused_before_any_write(tmp_path):
    path = tmp_path / "s.zarr"
    publish(new_store(path), seed=1)
    before = tree(path)
    other = synthetic_dataset(N + 1, SHARD, tmp_path / "other")
    with pytest.raises(FingerprintMismatchError, match="made for another dataset.*new store"):
        SaliencyStore.open(path, dataset=other)
    assert SaliencyStore.open(path, synthetic_dataset(N, SHARD)).current() == "gen-000001"
    with pytest.raises(StoreExistsError, match="already holds something.*open the store"):
        SaliencyStore.create(path, synthetic_dataset(N, SHARD), grid=GRID)
    assert tree(path) == before
    with pytest.raises(StoreNotFoundError, match="no saliency store"):
        SaliencyStore.open(tmp_path / "missing.zarr")
    assert not (tmp_path / "missing.zarr").exists()
    zarr.create_group(tmp_path / "foreign.zarr", attributes={"hello": 1})
    with pytest.raises(StoreError, match="not a salient saliency store"):
        SaliencyStore.open(tmp_path / "foreign.zarr")


def test_grid_mismatch_is_refused_before_a_generation_is_made(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    with pytest.raises(LayoutMismatchError, match="does not give the 6x6 grid.*image size 48"):
        store.begin_generation(synthetic_teacher(1), "cls_attn", image_size=64, patch_size=8)
    assert store.generations() == []
    with pytest.raises(StoreError, match="grid must be a positive integer"):
        SaliencyStore.create(tmp_path / "t.zarr", synthetic_dataset(N, SHARD), grid=0)


def _rows(count: int = SHARD):
    maps, valid, _ = synthetic_shard(0, 0, count, GRID)
    return maps, valid


@pytest.mark.parametrize(
    "shard, change, error, match",
    [
        (
            0,
            lambda m, v: (m[:, :5, :5], v),
            LayoutMismatchError,
            r"shape \(100, 5, 5\).*\(100, 6, 6\)",
        ),
        (
            0,
            lambda m, v: (m[:-1], v[:-1]),
            LayoutMismatchError,
            r"shape \(99, 6, 6\).*\(100, 6, 6\)",
        ),
        (10, lambda m, v: (m, v), LayoutMismatchError, r"shape \(100, 6, 6\).*\(30, 6, 6\)"),
        (0, lambda m, v: (m.astype(np.complex64), v), LayoutMismatchError, "dtype complex64"),
        (0, lambda m, v: (m.astype(str), v), LayoutMismatchError, "dtype <U"),
        (0, lambda m, v: (m * 1e6, v), LayoutMismatchError, "beyond the float16 range"),
        (0, lambda m, v: (m, v * 2), LayoutMismatchError, "other than 0 and 1"),
        (0, lambda m, v: (m, v.astype(np.float32)), LayoutMismatchError, "dtype float32"),
        (11, lambda m, v: (m, v), IdRangeError, r"shard index 11.*0\.\.10"),
        (-1, lambda m, v: (m, v), IdRangeError, "shard index -1"),
    ],
)
def test_bad_shard_rows_are_refused_before_anything_is_written(
    tmp_path, shard, change, error, match
):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    writer = begin(store, seed=1)
    maps, valid = change(*_rows())
    with pytest.raises(error, match=match):
        writer.write_shard(shard, maps, valid)
    assert writer.missing_shards() == list(range(SHARDS))
    assert not list((path / writer.name).rglob("c/*"))  # not one chunk file


def test_head_maps_must_match_the_generation(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    maps, valid = _rows()
    with pytest.raises(LayoutMismatchError, match="heads=None; pass head_maps"):
        begin(store, 1).write_shard(0, maps, valid, head_maps=np.zeros((SHARD, 2, GRID, GRID)))
    with pytest.raises(LayoutMismatchError, match="heads=2; pass head_maps"):
        begin(store, 1, heads=2).write_shard(0, maps, valid)


def test_reads_outside_the_dataset_or_of_unpublished_generations_are_refused(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    with pytest.raises(NotPublishedError, match="no published generation yet.*salient refresh"):
        store.bind()
    name = publish(store, seed=1)
    reader = store.bind()
    for start, stop in [(-1, 3), (0, N + 1), (5, 4)]:
        with pytest.raises(IdRangeError, match=r"outside the dataset's ids 0\.\.1029"):
            reader.read_range(start, stop)
    for ids, match in [
        ([N], r"ids \[1030\] are outside"),
        ([3, -1], r"ids \[-1\] are outside"),
        ([[1]], "1-D list of integers"),
        ([0.5], "1-D list of integers"),
    ]:
        with pytest.raises(IdRangeError, match=match):
            reader.read_ids(ids)
    with pytest.raises(IdRangeError, match="shard index 11"):
        reader.read_shard(11)
    with pytest.raises(GenerationNotFoundError, match=f"gen-000099.*holds {name}"):
        store.bind("gen-000099")
    with pytest.raises(GenerationStateError, match="only an unpublished generation"):
        store.resume_generation(name)
    assert all(issubclass(e, SalientError) for e in (IdRangeError, NotPublishedError))


def test_arrays_of_another_dtype_are_refused_at_bind(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    name = publish(store, seed=1)
    zarr.create_array(
        path / name / "maps",
        shape=(N, GRID, GRID),
        chunks=(SHARD, GRID, GRID),
        dtype="float32",
        overwrite=True,
    )
    with pytest.raises(LayoutMismatchError, match="dtype float32.*dtype float16"):
        store.bind(name)


# ---------------------------------------------------------------- layout and reads


def test_layout_is_self_describing_through_plain_zarr(tmp_path):
    path = tmp_path / "s.zarr"
    store = new_store(path)
    name = publish(store, seed=5)
    maps = zarr.open_array(path / name / "maps", mode="r")
    assert (maps.shape, maps.chunks, maps.dtype) == (
        (N, GRID, GRID),
        (SHARD, GRID, GRID),
        np.float16,
    )
    assert np.isnan(maps.fill_value)
    assert {
        k: maps.attrs[k] for k in ("generation", "kind", "grid", "image_size", "patch_size")
    } == {
        "generation": name,
        "kind": "cls_attn",
        "grid": GRID,
        "image_size": GRID * PATCH,
        "patch_size": PATCH,
    }
    assert maps.attrs["teacher"] == synthetic_teacher(5)
    assert zarr.open_array(path / name / "shards_done").chunks == (1,)
    for array in ("maps", "valid", "shards_done"):
        meta = json.loads((path / name / array / "zarr.json").read_text())
        assert "sharding_indexed" not in [c["name"] for c in meta["codecs"]]
    root = json.loads((path / "zarr.json").read_text())
    assert root.get("consolidated_metadata") is None
    assert {k: root["attributes"][k] for k in ("format", "current", "grid", "num_shards")} == {
        "format": "salient-store/1",
        "current": name,
        "grid": GRID,
        "num_shards": SHARDS,
    }
    gen = zarr.open_group(path / name, mode="r").attrs
    assert (gen["status"], gen["kind"], gen["epoch"]) == ("published", "cls_attn", 5)

    reader, want = store.bind(), expected(5)
    assert same(reader.read_shard(10)[0], want["maps"][1000:])
    ids = [1029, 3, 3, 500, 0]
    got_maps, got_valid = reader.read_ids(ids)
    assert same(got_maps, want["maps"][ids]) and same(got_valid, want["valid"][ids])
    empty_maps, empty_valid = reader.read_ids([])
    assert empty_maps.shape == (0, GRID, GRID) and empty_valid.shape == (0,)


def test_open_or_resume_resumes_only_the_same_maps(tmp_path):
    store = new_store(tmp_path / "s.zarr")
    args = ("cls_attn", GRID * PATCH, PATCH)
    first = store.open_or_resume(synthetic_teacher(1), *args)
    write(first, store, 0, seed=1)
    moved = {**synthetic_teacher(1), "path": "/elsewhere/same-weights.pt"}
    again = store.open_or_resume(moved, *args)
    assert again.name == first.name and again.missing_shards() == list(range(1, SHARDS))
    other_block = store.open_or_resume({**synthetic_teacher(1), "block": 3}, *args)
    assert other_block.name != first.name
    random = {**synthetic_teacher(9), "sha256": "random"}
    assert store.open_or_resume(random, *args).name not in (first.name, other_block.name)


def test_memory_url_goes_through_fsspec(tmp_path):
    url = f"memory://salient-test-{tmp_path.name}/saliency.zarr"
    store = SaliencyStore.create(url, synthetic_dataset(250, SHARD), grid=GRID)
    assert store.url == url
    name = publish(store, seed=3)
    reopened = SaliencyStore.open(url)
    assert reopened.current() == name
    assert same(reopened.bind().read_range(0, 250)[0], expected(3, n=250)["maps"])
