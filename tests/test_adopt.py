"""Existing webdataset shards adopted in place: ImageNet-style tars of unequal sizes, indexed
without a byte of them rewritten, then read by id like an ingested dataset — local, over
http(s) (read-only, the manifest elsewhere) and on the S3 endpoint.

The tars are written by webdataset's own TarWriter in the layout of the public ImageNet shards
(``imagenet1k-train-0000.tar``; keys ``n01440764_10026``; fields ``jpg``, ``cls``, ``json``).
What salient reads is checked against Python's own ``tarfile`` and plain zarr.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from PIL import Image

from salient import urls
from salient.pipeline import shards
from salient.pipeline.adopt import AdoptError, index_shards, key_ids
from salient.pipeline.epochs import Segment, epoch_segments
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import LoaderConfig, SalientLoader
from salient.pipeline.manifest import DatasetError, open_dataset
from salient.pipeline.stages import _Tally, attach_rows, read_segment
from salient.store import LayoutMismatchError, SaliencyStore

SYNSETS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
SIZES = (7, 5, 9, 3)  # unequal, the largest not first: ids 0-6, 9-13, 18-26, 27-29
GRID = 4


def _jpeg(n: int) -> bytes:
    pixels = np.random.default_rng(n).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def imagenet_shards(folder: Path, sizes=SIZES, replace: dict | None = None) -> list[dict]:
    """Tars with ``sizes`` samples each, as public ImageNet shards hold them; ``replace``: the
    jpg bytes of some samples (by order) swapped for others. Returns every sample in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"imagenet1k-train-{index:04d}.tar")) as writer:
            for _ in range(size):
                n = len(rows)
                label = n % 3
                synset = list(SYNSETS)[label]
                key = f"{synset}_{10026 + 7 * n}"
                sample = {
                    "__key__": key,
                    "jpg": (replace or {}).get(n, _jpeg(n)),
                    "cls": label,
                    "json": {"label": label, "class_name": SYNSETS[synset], "filename": key},
                }
                writer.write(sample)
                rows.append({**sample, "shard": index})
    return rows


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.glob("*.tar"))
    }


def _tar_keys(path: Path) -> list[str]:
    """The samples' keys in tar order, read with Python's tarfile (not webdataset)."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


# ---------------------------------------------------------------- indexing in place


def test_index_adopts_imagenet_style_shards_without_rewriting_them(tmp_path):
    folder = tmp_path / "in1k"
    rows = imagenet_shards(folder)
    before = _digests(folder)
    manifest = index_shards(folder)
    assert _digests(folder) == before  # no tar rewritten, not even touched
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, "ids.tsv", "manifest.json"])
    assert manifest.shard_size == 9 and manifest.root is None and manifest.skipped == []
    assert [(s.first_id, s.count) for s in manifest.shards] == [(0, 7), (9, 5), (18, 9), (27, 3)]
    assert manifest.classes == ["0", "1", "2"]

    dataset = open_dataset(folder)
    assert (dataset.num_samples, dataset.num_ids) == (24, 30)
    lines, by_key = [], {r["__key__"]: r for r in rows}
    for shard in dataset.shards:
        expected = [shard.first_id + p for p in range(shard.count)]
        keys = _tar_keys(folder / shard.name)
        samples = list(shards.iter_samples(dataset.source(shard), None, {"image"}))
        assert [s["id"] for s in samples] == expected
        assert [s["__key__"] for s in samples] == keys
        assert all(s["jpg"] == by_key[s["__key__"]]["jpg"] for s in samples)
        labels = shards.read_labels(dataset.source(shard))
        assert labels.tolist() == [by_key[k]["cls"] for k in keys]
        lines += [f"{i}\t{shard.name}\t{k}" for i, k in zip(expected, keys)]
    assert (folder / "ids.tsv").read_text().splitlines() == lines
    assert np.array_equal(dataset.sample_ids(), [int(line.split("\t")[0]) for line in lines])
    first = {row["__key__"]: n - sum(SIZES[: row["shard"]]) for n, row in enumerate(rows)}
    ten, twelve = rows[10], rows[12]  # shard 1 position 3, shard 2 position 0
    asked = [ten["__key__"], f"imagenet1k-train-0002.tar/{twelve['__key__']}"]
    assert key_ids(dataset, asked) == {
        asked[0]: 9 + first[ten["__key__"]],
        asked[1]: 18 + first[twelve["__key__"]],
    }
    assert dataset.shard_of(13).index == 1
    with pytest.raises(DatasetError, match="no sample has id 7"):
        dataset.shard_of(7)  # in the gap after shard 0
    with pytest.raises(DatasetError, match="has key 'n00000000_1'"):
        key_ids(dataset, ["n00000000_1"])


def test_labels_come_from_a_json_key_as_names_or_numbers(tmp_path):
    rows = imagenet_shards(tmp_path / "train")
    names = index_shards(tmp_path / "train", label_key="class_name")
    assert names.classes == sorted(SYNSETS.values())
    dataset = open_dataset(tmp_path / "train")
    got = np.concatenate([shards.read_labels(src) for src in dataset.sources()])
    want = [names.classes.index(r["json"]["class_name"]) for r in rows]
    assert got.tolist() == want
    numbers = index_shards(tmp_path / "train", tmp_path / "by-number", label_key="label")
    assert numbers.classes == ["0", "1", "2"] and numbers.root == str(tmp_path / "train")
    dataset = open_dataset(tmp_path / "by-number")
    got = np.concatenate([shards.read_labels(src) for src in dataset.sources()])
    assert got.tolist() == [r["cls"] for r in rows]
    # a held-out split keeps the training set's classes, even when it lacks one of them
    imagenet_shards(tmp_path / "val", sizes=(2,))
    val = index_shards(tmp_path / "val", label_key="class_name", classes_from=tmp_path / "train")
    assert val.classes == names.classes


def test_an_index_is_refused_where_it_would_overwrite_what_it_did_not_write(tmp_path):
    imagenet_shards(tmp_path / "in1k")
    with pytest.raises(AdoptError, match="holds no shard matching 'val-\\*.tar'"):
        index_shards(tmp_path / "in1k", pattern="val-*.tar")
    index_shards(tmp_path / "in1k")
    with pytest.raises(AdoptError, match="already holds an index; pass --overwrite"):
        index_shards(tmp_path / "in1k")
    index_shards(tmp_path / "in1k", overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AdoptError, match="holds other files"):
        index_shards(tmp_path / "in1k", tmp_path / "busy")
    ingest_demo(tmp_path / "demo", n=4, shard_size=2, image_size=32)
    with pytest.raises(AdoptError, match="did not write"):
        index_shards(tmp_path / "demo", overwrite=True)


def test_a_key_twice_in_one_shard_is_refused(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a.tar")) as writer:
        for key in ("x_1", "x_2", "x_1"):  # not adjacent: webdataset would read 3 samples
            writer.write({"__key__": key, "jpg": _jpeg(0)})
    with pytest.raises(AdoptError, match="holds key 'x_1' twice"):
        index_shards(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.tar"]


def _png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(n))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_samples_without_a_usable_image_keep_their_ids_and_read_as_corrupt(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    with wds.TarWriter(str(folder / "odd-0.tar")) as writer:
        writer.write({"__key__": "a_1", "jpg": _jpeg(1), "cls": 0})
        writer.write({"__key__": "a_2", "txt": "a caption, no image"})  # nothing to decode
        writer.write({"__key__": "a_3", "jpg": _jpeg(3), "png": _png(3), "cls": 1})  # two
        writer.write({"__key__": "a_4", "jpg": b"not a jpeg", "cls": 1})  # no header
        writer.write({"__key__": "a_5", "jpg": _jpeg(5), "cls": 0})
    manifest = index_shards(folder)
    assert manifest.shards[0].count == 5  # every sample keeps its position
    reasons = {p["id"]: p["reason"] for p in manifest.skipped}
    assert sorted(reasons) == [1, 2, 3] and "several" in reasons[2]
    assert "unreadable image" in reasons[3]
    assert [line.split("\t")[2] for line in (folder / "ids.tsv").read_text().splitlines()] == (
        _tar_keys(folder / "odd-0.tar")
    )
    config = LoaderConfig(
        data=str(folder), image_size=32, patch_size=8, batch_size=2, strategy="random",
        num_workers=0,
    )  # fmt: skip
    loader = SalientLoader(config)
    seen = {i for batch in loader.epoch(0) for i in batch["ids"].tolist()}
    assert seen == {0, 4} and loader.stats.corrupt_ids == {1, 2, 3}
    chosen = index_shards(folder, tmp_path / "png", image="PNG")  # the field named, any case
    assert chosen.image == "png" and {p["id"] for p in chosen.skipped} == {0, 1, 3, 4}


# ---------------------------------------------------------------- read by id: store, loader


def _teacher() -> dict:
    return {"path": None, "sha256": "f" * 64, "name": "test"}


def _maps_for(ids: range) -> np.ndarray:
    """One map per id whose hottest cell is ``id % GRID²`` (a joined row says whose it is)."""
    maps = np.zeros((len(ids), GRID * GRID), np.float16)
    maps[np.arange(len(ids)), np.asarray(ids) % (GRID * GRID)] = 1
    return maps.reshape(len(ids), GRID, GRID)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # index, in-process
def test_the_store_and_the_loader_read_an_adopted_dataset_by_id(tmp_path, huge_png):
    folder = tmp_path / "in1k"
    imagenet_shards(folder, replace={15: huge_png.read_bytes()})  # over the budget
    huge = 2 * 9 + 15 - sum(SIZES[:2])  # sample 15: shard 2, position 3
    manifest = index_shards(folder)
    (problem,) = manifest.skipped
    assert problem["id"] == huge and "over the pixel budget" in problem["reason"]
    dataset = open_dataset(folder)
    store = SaliencyStore.create(str(tmp_path / "s.zarr"), dataset, grid=GRID)
    writer = store.begin_generation(_teacher(), "cls_attn", image_size=32, patch_size=8)
    with pytest.raises(LayoutMismatchError, match=r"expected \(7, 4, 4\)"):
        writer.write_shard(0, _maps_for(range(9)), np.ones(9, np.uint8))  # a whole chunk
    for shard in dataset.shards:
        ids = range(shard.first_id, shard.stop_id)
        writer.write_shard(shard.index, _maps_for(ids), np.ones(shard.count, np.uint8))
    writer.publish()

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # plain zarr
    assert root.attrs["shard_counts"] == [7, 5, 9, 3] and root.attrs["num_samples"] == 30
    valid, maps = root["gen-000001/valid"][:], root["gen-000001/maps"][:]
    assert maps.shape == (30, GRID, GRID) and root["gen-000001/maps"].chunks[0] == 9
    used = np.isin(np.arange(30), dataset.sample_ids())
    assert valid[used].all() and not valid[~used].any()  # the gaps: never a map
    assert np.isnan(maps[~used]).all() and not np.isnan(maps[used]).any()

    reader = store.bind()
    for shard in dataset.shards:  # a worker's segment: the shard after its first sample
        segment = Segment(shard.index, shard.first_id + 1, shard.stop_id)
        samples = read_segment(dataset.source(shard), segment, None)
        joined = list(attach_rows(samples, segment, reader, _Tally()))
        assert [s["id"] for s in joined] == list(range(segment.start, segment.stop))
        for sample in joined:  # each sample meets its own row
            assert int(sample["map"].argmax()) == sample["id"] % (GRID * GRID)

    config = LoaderConfig(
        data=str(folder), store=str(tmp_path / "s.zarr"), image_size=32, patch_size=8,
        batch_size=4, strategy="amt", num_workers=2,
    )  # fmt: skip
    loader = SalientLoader(config)
    seen = [i for batch in loader.epoch(0) for i in batch["ids"].tolist()]
    assert loader.stats.corrupt == 1 and loader.stats.corrupt_ids == {huge}
    assert len(seen) == 24 // 4 * 4 and set(seen) <= set(dataset.sample_ids().tolist()) - {huge}
    assert all(batch["has_saliency"].all() for batch in loader.epoch(1))


def test_ranks_and_workers_split_an_adopted_dataset_without_gaps_or_overlap(tmp_path):
    imagenet_shards(tmp_path / "in1k")
    index_shards(tmp_path / "in1k")
    dataset = open_dataset(tmp_path / "in1k")
    for world, workers in [(1, 1), (2, 2), (3, 2)]:
        ids = [
            i
            for rank in range(world)
            for worker in range(workers)
            for seg in epoch_segments(dataset.shards, 0, 5, rank, world, worker, workers)
            for i in range(seg.start, seg.stop)
        ]
        assert sorted(ids) == dataset.sample_ids().tolist()


# ---------------------------------------------------------------- elsewhere: http(s), S3


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """ImageNet-style shards served read-only over http from 127.0.0.1."""
    rows = imagenet_shards(tmp_path / "served")
    handler = functools.partial(_Quiet, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", rows
    server.shutdown()
    thread.join(timeout=10)


def test_read_only_shards_get_their_manifest_in_another_folder(served, tmp_path):
    url, rows = served
    with pytest.raises(AdoptError, match="is read-only; give --out"):
        index_shards(url)
    manifest = index_shards(url, tmp_path / "index")
    assert manifest.root == url and manifest.shards[0].name == "imagenet1k-train-0000.tar"
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["ids.tsv", "manifest.json"]
    dataset = open_dataset(tmp_path / "index")
    assert dataset.shard_url(dataset.shards[3]) == f"{url}/imagenet1k-train-0003.tar"
    keys = [s["__key__"] for src in dataset.sources() for s in shards.iter_samples(src)]
    assert keys == [r["__key__"] for r in rows]


@pytest.fixture
def bucket(s3_endpoint):
    """``s3://salient-adopt`` with dummy keys as this process's storage options."""
    previous = urls.storage_options()
    urls.set_storage_options({"key": "k", "secret": "s"})
    fs, _ = urls.filesystem("s3://salient-adopt")
    if not fs.exists("salient-adopt"):
        fs.mkdir("salient-adopt")
    yield fs, "s3://salient-adopt"
    urls.set_storage_options(previous)


def test_shards_on_s3_are_indexed_and_read_in_place(bucket, tmp_path):
    fs, root = bucket
    rows = imagenet_shards(tmp_path / "local")
    fs.put(str(tmp_path / "local") + "/", "salient-adopt/in1k/", recursive=True)
    remote = f"{root}/in1k"
    before = {p: fs.info(p)["ETag"] for p in fs.ls("salient-adopt/in1k")}
    manifest = index_shards(remote, workers=2)
    assert {p: fs.info(p)["ETag"] for p in before} == before  # no tar rewritten
    added = set(fs.ls("salient-adopt/in1k")) - set(before)
    assert added == {"salient-adopt/in1k/ids.tsv", "salient-adopt/in1k/manifest.json"}
    local = index_shards(tmp_path / "local")
    assert manifest.fingerprint == local.fingerprint  # the same shards, the same dataset
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in local.shards]
    dataset = open_dataset(remote)
    got = [(s["id"], s["jpg"]) for src in dataset.sources() for s in shards.iter_samples(src)]
    assert [g[1] for g in got] == [r["jpg"] for r in rows]
    assert [g[0] for g in got] == dataset.sample_ids().tolist()
    config = LoaderConfig(
        data=remote, image_size=32, patch_size=8, batch_size=8, strategy="random", num_workers=2
    )
    loader = SalientLoader(config)
    seen = [i for batch in loader.epoch(0) for i in batch["ids"].tolist()]
    assert sorted(seen) == dataset.sample_ids().tolist() and loader.stats.corrupt == 0
    # the manifest elsewhere (a local folder) names the bucket as the shards' root
    elsewhere = index_shards(remote, tmp_path / "index")
    assert elsewhere.root == remote and open_dataset(tmp_path / "index").fingerprint == (
        manifest.fingerprint
    )
    shutil.rmtree(tmp_path / "local")
