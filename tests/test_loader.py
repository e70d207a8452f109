"""The streaming loader on real shards and a real Zarr store.

Data: the 96-image demo set (3 shards of 32, 96 px, fixture ``demo_data``). Maps: each
scene's object box rasterised onto a 12×12 grid (the share of every cell the box covers),
written through the store API, so where saliency lies is known exactly. Loader: 64 px crops
of 8 px patches (N = 64), so tests stay small.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import (
    EpochStats,
    LoaderConfig,
    LoaderError,
    SalientLoader,
    batches_per_rank,
    epoch_segments,
)
from salient.pipeline.manifest import Manifest, ShardInfo, fingerprint, open_dataset, sample_key
from salient.pipeline.masking import mask_counts
from salient.store import SaliencyStore

STORE_GRID, IMAGE, PATCH, SOURCE = 12, 64, 8, 96
N = (IMAGE // PATCH) ** 2


# ---------------------------------------------------------------- helpers


def demo_boxes(data: Path) -> dict[int, tuple[float, float, float, float]]:
    """Object boxes per sample id, read straight from the tars (independent of the loader)."""
    boxes = {}
    for path in sorted(data.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "box.json":
                    box = json.loads(tar.extractfile(member).read())
                    boxes[int(key)] = (box["x0"], box["y0"], box["x1"], box["y1"])
    return boxes


def box_maps(boxes: dict, n: int, size: int = SOURCE, grid: int = STORE_GRID) -> np.ndarray:
    """``[n, grid, grid]``: the share of each map cell (rows = y) that the object box covers."""
    edges = np.arange(grid + 1) * size / grid
    maps = np.zeros((n, grid, grid), np.float32)
    for i, (x0, y0, x1, y1) in boxes.items():
        cover_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
        cover_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
        maps[i] = np.outer(cover_y, cover_x) / (size / grid) ** 2
    return maps


def publish(
    store: SaliencyStore,
    dataset,
    maps: np.ndarray,
    valid: np.ndarray,
    kind: str = "cls_attn",
    reduce: str | None = "mean",
) -> str:
    teacher = {
        "path": "boxes",
        "sha256": "0" * 64,
        "name": "boxes",
        "epoch": 0,
        "kind": kind,
        "image_size": SOURCE,
        "patch_size": SOURCE // STORE_GRID,
        "reduce": reduce,
        "block": -1,
        "head": None,
    }
    writer = store.begin_generation(
        teacher=teacher, kind=kind, image_size=SOURCE, patch_size=SOURCE // STORE_GRID
    )
    for shard in dataset.shards:
        part = slice(shard.first_id, shard.stop_id)
        writer.write_shard(shard.index, maps[part].astype(np.float16), valid[part].astype(np.uint8))
    writer.publish()
    return writer.name


def new_store(
    path: Path, data: Path, maps=None, valid=None, **describe
) -> tuple[SaliencyStore, str | None]:
    dataset = open_dataset(data)
    store = SaliencyStore.create(str(path), dataset, grid=STORE_GRID)
    if maps is None:
        return store, None
    valid = np.ones(dataset.num_samples, np.uint8) if valid is None else valid
    return store, publish(store, dataset, maps, valid, **describe)


def config(data, store=None, **overrides) -> LoaderConfig:
    fields = {
        "data": str(data),
        "store": None if store is None else str(store),
        "image_size": IMAGE,
        "patch_size": PATCH,
        "batch_size": 16,
        "strategy": "amt",
        "mask_ratio": 0.45,
        "throw_ratio": 0.40,
        "num_workers": 0,
        "shuffle_buffer": 20,
        "chunk_size": 8,
        "seed": 3,
    }
    return LoaderConfig(**{**fields, **overrides})


def run_epoch(loader: SalientLoader, epoch: int = 0) -> list[dict]:
    return list(loader.epoch(epoch))


def all_ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["ids"].tolist()]


@pytest.fixture(scope="module")
def boxes(demo_data) -> dict:
    return demo_boxes(demo_data)


@pytest.fixture(scope="module")
def box_store(demo_data, boxes, tmp_path_factory) -> Path:
    """A store whose one published generation holds every scene's box map."""
    path = tmp_path_factory.mktemp("loader-store") / "saliency.zarr"
    new_store(path, demo_data, box_maps(boxes, len(boxes)))
    return path


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"mask_ratio": 0.6, "throw_ratio": 0.5}, "must be < 1"),
        ({"image_size": 60}, "multiple of patch_size"),
        ({"rank": 2, "world_size": 2}, "rank must lie in 0..1"),
        ({"strategy": "nope"}, "unknown strategy"),
        ({"decode": "gpu"}, "decode must be"),
        ({"device": "tpu"}, "device must be"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_config_refuses_bad_values(demo_data, bad, words):
    with pytest.raises(LoaderError, match=words):
        config(demo_data, **bad)


def test_dataset_too_small_for_batch_is_refused(demo_data):
    with pytest.raises(LoaderError, match="no full batch"):
        SalientLoader(config(demo_data, batch_size=64, world_size=2))


# ---------------------------------------------------------------- the epoch plan


def test_epoch_segments_split_ranks_and_workers_disjointly(demo_data):
    shards = open_dataset(demo_data).shards
    for epoch in range(3):
        ids = []
        for rank in range(2):
            for worker in range(3):
                for seg in epoch_segments(shards, 5, epoch, rank, 2, worker, 3):
                    shard = shards[seg.shard]
                    assert shard.first_id <= seg.start < seg.stop <= shard.stop_id
                    ids += range(seg.start, seg.stop)
        assert sorted(ids) == list(range(96))
    orders = {tuple(s.shard for s in epoch_segments(shards, 5, e, 0, 1)) for e in range(8)}
    assert len(orders) > 1  # the shard order changes with the epoch
    assert batches_per_rank(96, 2, 10) == 4


# ---------------------------------------------------------------- batches


def test_batch_fields_shapes_and_counts(demo_data, box_store):
    loader = SalientLoader(config(demo_data, box_store))
    batches = run_epoch(loader)
    v, m, t = mask_counts(N, 0.45, 0.40)
    assert (v, m, t) == (10, 28, 26)
    assert mask_counts(196, 0.45, 0.40) == (30, 88, 78)  # docs/ARCHITECTURE.md, "Loader": ViT-B/16
    assert len(batches) == len(loader) == 96 // 16
    for b in batches:
        assert b["images"].shape == (16, 3, IMAGE, IMAGE) and b["images"].dtype == torch.float32
        assert b["visible_idx"].shape == (16, v) and b["mask_idx"].shape == (16, m)
        assert b["throw_idx"].shape == (16, t)
        assert b["ids"].shape == (16,) and b["has_saliency"].dtype == torch.bool
        assert b["has_saliency"].all() and b["generation"] == "gen-000001"
        every = torch.cat([b["visible_idx"], b["mask_idx"], b["throw_idx"]], 1).sort(1).values
        assert torch.equal(every, torch.arange(N).expand(16, N))
        assert -2.2 < b["images"].min() < -1.0 and 1.0 < b["images"].max() < 2.7  # normalised
    assert sorted(all_ids(batches)) == list(range(96))
    stats = loader.stats
    assert (stats.batches, stats.samples, stats.fallback, stats.corrupt) == (6, 96, 0, 0)
    assert stats.store_reads == 3  # one read per tar shard, not per sample


def test_same_seed_epoch_rank_give_the_same_batches(demo_data, box_store):
    def epoch_of(seed, epoch, workers):
        loader = SalientLoader(
            config(
                demo_data,
                box_store,
                seed=seed,
                num_workers=workers,
                world_size=2,
                rank=1,
                batch_size=8,
            )
        )
        return list(loader.epoch(epoch))

    a, b = epoch_of(3, 1, 0), epoch_of(3, 1, 0)
    for x, y in zip(a, b, strict=True):
        for key in ("images", "ids", "visible_idx", "mask_idx", "throw_idx", "crop_boxes"):
            assert torch.equal(x[key], y[key]), key
    other = epoch_of(3, 2, 0)
    assert all_ids(other) != all_ids(a)
    assert not torch.equal(other[0]["crop_boxes"], a[0]["crop_boxes"])
    forked = epoch_of(3, 1, 2)  # two DataLoader workers: same samples, own interleaving
    assert sorted(all_ids(forked)) == sorted(all_ids(a))
    assert all_ids(forked) == all_ids(epoch_of(3, 1, 2))


@pytest.mark.parametrize("batch_size, workers", [(8, (0, 2)), (10, (1, 0))])
def test_two_ranks_see_disjoint_ids_and_equal_batch_counts(
    demo_data, box_store, batch_size, workers
):
    seen = []
    for rank in range(2):
        loader = SalientLoader(
            config(
                demo_data,
                box_store,
                world_size=2,
                rank=rank,
                batch_size=batch_size,
                num_workers=workers[rank],
            )
        )
        batches = run_epoch(loader, epoch=4)
        assert len(batches) == len(loader) == 96 // (2 * batch_size)
        assert all(len(b["ids"]) == batch_size for b in batches)
        seen.append(set(all_ids(batches)))
        assert len(seen[-1]) == len(batches) * batch_size  # no id twice on a rank
    assert not seen[0] & seen[1]
    if batch_size == 8:  # 96 = 2 ranks × 6 batches × 8: together they cover the dataset
        assert seen[0] | seen[1] == set(range(96))


def test_more_workers_than_shards_on_a_rank_still_runs(demo_data, box_store):
    loader = SalientLoader(
        config(demo_data, box_store, world_size=2, rank=0, batch_size=8, num_workers=5)
    )
    assert loader.num_workers == 2  # 48 samples on the rank = 1.5 shards' worth
    batches = run_epoch(loader)
    assert len(batches) == 6 and len(set(all_ids(batches))) == 48


# ---------------------------------------------------------------- maps and fallback


def test_masked_patches_lie_on_the_cropped_object_box(demo_data, box_store, boxes):
    """attmask_high masks the top-M weights; with the box as map they must lie on the box
    as it appears in the crop (flips included) — AMT's top-left-map bug fails this."""
    loader = SalientLoader(
        config(
            demo_data,
            box_store,
            strategy="attmask_high",
            mask_ratio=0.1,
            throw_ratio=0.0,
            crop_scale=(0.3, 1.0),
        )
    )
    g, cell, checked, inside = IMAGE // PATCH, SOURCE / STORE_GRID, 0, []
    for batch in run_epoch(loader):
        for row, sample_id in enumerate(batch["ids"].tolist()):
            cover = _box_cover_in_crop(boxes[sample_id], batch["crop_boxes"][row].tolist(), g)
            if (cover > 0.99).sum() < batch["mask_idx"].shape[1]:
                continue  # the object fills fewer than M patches of this crop
            masked = batch["mask_idx"][row]
            near = _box_cover_in_crop(
                _dilate(boxes[sample_id], cell), batch["crop_boxes"][row].tolist(), g
            )
            assert (near.reshape(-1)[masked] > 0).all(), sample_id
            inside.append(float((cover.reshape(-1)[masked] > 0.5).float().mean()))
            checked += 1
    assert checked >= 30
    assert np.mean(inside) >= 0.9


def _dilate(box, d):
    x0, y0, x1, y1 = box
    return (x0 - d, y0 - d, x1 + d, y1 + d)


def _box_cover_in_crop(box, crop, g) -> torch.Tensor:
    """``[g, g]``: the share of each output patch the object box covers, given the crop box
    ``(top, left, height, width, flip)`` in source pixels."""
    top, left, height, width, flip = crop
    x0, y0, x1, y1 = box
    xs = (np.array([x0, x1]) - left) * g / width
    ys = (np.array([y0, y1]) - top) * g / height
    if flip:
        xs = g - xs[::-1]
    edges = np.arange(g + 1)
    cover_x = np.clip(np.minimum(edges[1:], xs[1]) - np.maximum(edges[:-1], xs[0]), 0, 1)
    cover_y = np.clip(np.minimum(edges[1:], ys[1]) - np.maximum(edges[:-1], ys[0]), 0, 1)
    return torch.from_numpy(np.outer(cover_y, cover_x))


def test_invalid_and_nan_rows_fall_back_to_random_and_are_counted(demo_data, boxes, tmp_path):
    maps, valid = box_maps(boxes, 96), np.ones(96, np.uint8)
    valid[[3, 40]] = 0
    maps[70] = np.nan
    new_store(tmp_path / "s.zarr", demo_data, maps, valid)
    loader = SalientLoader(config(demo_data, tmp_path / "s.zarr", num_workers=1))
    batches = run_epoch(loader)
    without = {i for b in batches for i, h in zip(b["ids"].tolist(), b["has_saliency"]) if not h}
    assert without == {3, 40, 70}
    assert loader.stats.fallback == 3 and loader.stats.samples == 96


def test_no_store_or_no_generation_masks_at_random_with_one_warning(demo_data, tmp_path):
    new_store(tmp_path / "empty.zarr", demo_data)
    for store in (None, tmp_path / "empty.zarr", tmp_path / "not-yet.zarr"):
        loader = SalientLoader(config(demo_data, store))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epochs = [run_epoch(loader, e) for e in range(2)]
        fallbacks = [w for w in caught if "falls back to random" in str(w.message)]
        assert len(fallbacks) == 1, store
        for batch in epochs[0] + epochs[1]:
            assert batch["generation"] is None and not batch["has_saliency"].any()
        assert loader.stats.fallback == 96
        mask = torch.cat([b["mask_idx"] for b in epochs[0]])
        assert len(set(map(tuple, mask.sort(1).values.tolist()))) == 96  # random, not one plan


def test_gc_keeps_the_generation_an_epoch_reads_and_collects_it_after(demo_data, boxes, tmp_path):
    dataset = open_dataset(demo_data)
    store, first = new_store(tmp_path / "s.zarr", demo_data, box_maps(boxes, 96))
    loader = SalientLoader(config(demo_data, tmp_path / "s.zarr"))
    batches = loader.epoch(0)
    next(batches)  # the epoch has bound the current generation: a lease holds it
    (reader,) = store.readers()
    assert reader["generation"] == first and reader["holder"] == "a SalientLoader (rank 0)"
    second = publish(store, dataset, box_maps(boxes, 96), np.ones(96, np.uint8))
    plan = {p["name"]: p for p in store.gc_plan(keep=1, grace_s=0)}
    assert plan[first]["reason"].startswith("held by a reader: a SalientLoader (rank 0)")
    assert store.gc(keep=1, grace_s=0) == []
    rest = list(batches)  # the rest of the epoch reads the generation it bound, whole
    assert {b["generation"] for b in rest} == {first} and loader.stats.fallback == 0
    assert store.readers() == []  # the epoch's end released it
    assert store.gc(keep=1, grace_s=0) == [first]
    run_epoch(loader, 1)
    assert loader.stats.generation == second and store.readers() == []


def test_a_store_that_refuses_the_lease_is_read_with_one_warning(demo_data, boxes, tmp_path):
    _, first = new_store(tmp_path / "s.zarr", demo_data, box_maps(boxes, 96))
    (tmp_path / "s.zarr" / "readers").write_text("")  # no lease record can be written here
    loader = SalientLoader(config(demo_data, tmp_path / "s.zarr"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epochs = [run_epoch(loader, e) for e in range(2)]
    (warning,) = [w for w in caught if "reader lease" in str(w.message)]
    said = str(warning.message)
    assert said.startswith("read without a reader lease, so salient gc may remove a generation")
    assert f"while it is read: {tmp_path / 's.zarr'}: FileExistsError" in said
    assert warning.filename == __file__  # the line of the caller's loop
    assert {b["generation"] for e in epochs for b in e} == {first}
    assert loader.stats.fallback == 0


def test_a_trainers_chosen_generation_takes_no_lease_in_the_loader(demo_data, box_store):
    loader = SalientLoader(config(demo_data, box_store))
    name = SaliencyStore.open(str(box_store)).current()
    batches = loader.epoch(0, generation=name)  # the trainer's rank 0 holds its own lease
    next(batches)
    assert SaliencyStore.open(str(box_store)).readers() == []
    batches.close()


def test_strategy_without_maps_reads_no_store(demo_data, box_store):
    loader = SalientLoader(config(demo_data, box_store, strategy="random"))
    batches = run_epoch(loader)
    assert loader.stats.store_reads == 0 and loader.stats.fallback == 0
    assert batches[0]["generation"] is None


@pytest.mark.parametrize("workers", [0, 1])  # 0: the later shards are read after the publish
def test_generation_published_mid_epoch_is_used_from_the_next_epoch(
    demo_data, boxes, tmp_path, workers
):
    dataset = open_dataset(demo_data)
    store, first = new_store(tmp_path / "s.zarr", demo_data, box_maps(boxes, 96))
    loader = SalientLoader(config(demo_data, tmp_path / "s.zarr", num_workers=workers))
    batches = loader.epoch(0)
    seen = [next(batches)]
    # the new generation: every row invalid, so using it would show as has_saliency False
    second = publish(store, dataset, box_maps(boxes, 96), np.zeros(96, np.uint8))
    assert store.current() == second != first
    seen += list(batches)
    assert {b["generation"] for b in seen} == {first}
    assert all(b["has_saliency"].all() for b in seen) and loader.stats.fallback == 0
    later = run_epoch(loader, 1)
    assert {b["generation"] for b in later} == {second}
    assert loader.stats.generation == second and loader.stats.fallback == 96


# ---------------------------------------------------------------- corrupt images


def corrupt_dataset(src: Path, out: Path, bad: dict[int, bytes]) -> Path:
    """Shard 0 of ``src`` rewritten with the image bytes of ids in ``bad`` replaced."""
    out.mkdir()
    with tarfile.open(src / "shard-000000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    samples: dict[str, dict] = {}
    for name, data in files.items():
        key, _, ext = name.partition(".")
        samples.setdefault(key, {"__key__": key})[ext] = data
    with wds.TarWriter(str(out / "shard-000000.tar"), encoder=False) as writer:
        for key in sorted(samples):
            sample = samples[key]
            if int(key) in bad:
                sample["jpg"] = bad[int(key)]
            writer.write(sample)
    shard = ShardInfo(
        0, "shard-000000.tar", 0, len(samples), (out / "shard-000000.tar").stat().st_size
    )
    manifest = Manifest(
        num_samples=len(samples),
        shard_size=len(samples),
        shards=[shard],
        classes=None,
        fingerprint=fingerprint([shard], len(samples)),
    )
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def truncated_jpeg(data: bytes) -> bytes:
    """A JPEG cut just after its scan header: the header reads, the pixels do not decode."""
    return data[: data.index(b"\xff\xda") + 20]


@pytest.mark.parametrize("decode", ["worker", "device"])
@pytest.mark.parametrize("batch_size, passes", [(6, 1), (8, 2)])
def test_corrupt_image_is_skipped_and_counted(demo_data, tmp_path, decode, batch_size, passes):
    data = corrupt_dataset(demo_data, tmp_path / "bad", {5: b"not a jpeg at all"})
    loader = SalientLoader(
        config(data, None, strategy="random", batch_size=batch_size, decode=decode)
    )
    batches = run_epoch(loader)
    ids = all_ids(batches)
    assert len(batches) == 32 // batch_size and 5 not in ids
    assert loader.stats.corrupt == 1 and loader.stats.corrupt_ids == {5}
    assert loader.stats.passes == passes  # 31 good images: 32 needed → a second pass
    if passes == 1:
        assert len(set(ids)) == len(ids) == 30


def test_jpeg_that_fails_on_the_device_is_skipped_and_counted(demo_data, tmp_path):
    with tarfile.open(demo_data / "shard-000000.tar") as tar:
        jpeg = tar.extractfile(f"{sample_key(9)}.jpg").read()
    bad = truncated_jpeg(jpeg)
    assert Image.open(io.BytesIO(bad)).size == Image.open(io.BytesIO(jpeg)).size  # header ok
    data = corrupt_dataset(demo_data, tmp_path / "bad", {9: bad})
    loader = SalientLoader(config(data, None, strategy="random", batch_size=6, decode="device"))
    batches = run_epoch(loader)
    assert 9 not in all_ids(batches) and loader.stats.corrupt_ids == {9}
    assert all(len(b["ids"]) == 6 for b in batches)


def test_device_decode_path_on_cpu_matches_the_worker_path(demo_data, box_store):
    worker = run_epoch(SalientLoader(config(demo_data, box_store, decode="worker")))
    device = run_epoch(SalientLoader(config(demo_data, box_store, decode="device", device="cpu")))
    for a, b in zip(worker, device, strict=True):
        for key in ("ids", "crop_boxes", "visible_idx", "mask_idx", "throw_idx", "has_saliency"):
            assert torch.equal(a[key], b[key]), key
        # libjpeg-turbo via PIL vs torchvision: the same pixels up to rounding
        assert (a["images"] - b["images"]).abs().mean() < 0.05


def test_stats_are_a_plain_record():
    stats = EpochStats(epoch=1, rank=0, generation=None)
    chunk = {"corrupt": [4, 4, 7], "shard_errors": 1, "store_reads": 2}
    stats.absorb({**chunk, "corrupt_maps": [(0, 10), (20, 30)], "damaged": []})
    stats.absorb({**chunk, "corrupt_maps": [(20, 30), (25, 32)], "damaged": []})  # a 2nd pass
    assert stats.as_dict()["corrupt_ids"] == [4, 7] and stats.corrupt == 2
    assert stats.corrupt_maps == 22  # ids 0..9 and 20..31, each once
    json.dumps(stats.as_dict())


# ---------------------------------------------------------------- where maps are normalised


def raised_background_maps(boxes: dict) -> np.ndarray:
    """Object 1.0, background raised to 0.3, one corner cell at 0 (the whole map's minimum,
    which most crops leave out): float16-rounded, as the store keeps them."""
    maps = 0.3 + 0.7 * box_maps(boxes, len(boxes))
    maps[:, 0, 0] = 0.0
    return maps.astype(np.float16).astype(np.float32)


def overlap_with_top(mask_idx: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """Per row: the share of the masked set inside the top-M patches by ``weights``."""
    m = mask_idx.shape[1]
    top = torch.zeros_like(weights, dtype=torch.bool)
    top.scatter_(1, weights.argsort(dim=1, descending=True, stable=True)[:, :m], True)
    return top.gather(1, mask_idx).float().mean(1).numpy()


def test_amt_masks_follow_the_whole_image_normalised_map_in_distribution(
    demo_data, boxes, tmp_path
):
    """AMT normalises the whole map to [0, 1] and crops that (AMT Sec. 3.2, Alg. 1); on a
    raised background the loader's masked sets match that reference in distribution.

    Statistic: per sample, the share of its 28 masked patches inside the crop's top 28.
    Reference: amt plans (8 draws per sample) on the whole-image-normalised map cropped
    independently here; the old order (min-max of each crop again) is drawn the same way.
    Measured (4 epochs, 384 samples): loader 0.556, reference 0.553 (z = 0.6); old order
    0.781 (z = -46.7 against the loader), so the old order fails this test.
    """
    from salient.pipeline.crops import CropBox, crop_maps, normalize_weights
    from salient.pipeline.masking import plan_masks

    maps = raised_background_maps(boxes)
    new_store(tmp_path / "s.zarr", demo_data, maps)
    loader = SalientLoader(config(demo_data, tmp_path / "s.zarr", strategy="amt"))
    got, ref, old = [], [], []
    generator = torch.Generator().manual_seed(11)
    for epoch in range(4):
        for b in loader.epoch(epoch):
            crops = [CropBox(*row[:4].tolist(), bool(row[4])) for row in b["crop_boxes"]]
            whole = torch.from_numpy(maps[b["ids"].numpy()])  # min 0, max 1: already [0, 1]
            cropped = crop_maps(whole, crops, [(SOURCE, SOURCE)] * len(crops), IMAGE // PATCH)
            cropped = cropped.flatten(1)  # [B, N]
            got.append(overlap_with_top(b["mask_idx"], cropped))
            for _ in range(8):
                for weights, out in ((cropped + 1e-6, ref), (normalize_weights(cropped), old)):
                    plan = plan_masks("amt", weights, 0.45, 0.40, generator=generator)
                    out.append(overlap_with_top(plan.mask_idx, cropped))
    got, ref, old = (np.concatenate(x) for x in (got, ref, old))

    def z(a: np.ndarray, b: np.ndarray) -> float:
        return (a.mean() - b.mean()) / np.sqrt(a.var() / len(a) + b.var() / len(b))

    assert len(got) == 4 * 96
    assert abs(z(got, ref)) < 4.0  # AMT's order: the same distribution of masked sets
    assert abs(z(got, old)) > 8.0  # the old order (min-max after the crop) is told apart
    assert old.mean() - ref.mean() > 0.1  # ... because it masks the object far more often


def test_minmax_mean_generations_are_taken_as_amt_weights():
    from salient.pipeline.stages import whole_map_weights

    maps = np.array([[[0.2, 0.4], [0.3, 0.6]]], np.float16)
    kept = whole_map_weights(maps, {"teacher": {"reduce": "minmax_mean"}})
    stretched = whole_map_weights(maps, {"teacher": {"reduce": "mean"}})
    assert np.allclose(kept, maps.astype(np.float32))  # already AMT's per-head [0, 1] mean
    assert np.allclose(stretched, [[[0.0, 0.5], [0.25, 1.0]]], atol=1e-3)


def test_mask_units_through_the_loader(demo_data, box_store):
    """16 px units of 8 px patches: 16 units of 4 patches; ratios count units."""
    batches = run_epoch(SalientLoader(config(demo_data, box_store, mask_unit=16)))
    v, m, t = mask_counts(16, 0.45, 0.40)
    for b in batches:
        assert [b[k].shape[1] for k in ("visible_idx", "mask_idx", "throw_idx")] == [
            4 * v,
            4 * m,
            4 * t,
        ]
        rows, cols = b["mask_idx"] // 8, b["mask_idx"] % 8
        units = (rows // 2) * 4 + cols // 2
        for row in units:
            assert (torch.bincount(row, minlength=16) % 4 == 0).all()
    with pytest.raises(LoaderError, match="mask_unit must be a multiple of patch_size 8"):
        config(demo_data, box_store, mask_unit=12)


def test_gpa_target_is_the_cropped_gpa_map_standardised(demo_data, boxes, box_store, tmp_path):
    from salient.pipeline.crops import CropBox, crop_maps

    maps = box_maps(boxes, len(boxes)) * 5.0 - 2.0  # raw GPA logits may be negative
    new_store(tmp_path / "g.zarr", demo_data, maps, kind="gpa", reduce=None)
    c = config(demo_data, tmp_path / "g.zarr", strategy="gpa", gpa_target=True)
    for b in run_epoch(SalientLoader(c)):
        crops = [CropBox(*row[:4].tolist(), bool(row[4])) for row in b["crop_boxes"]]
        whole = torch.from_numpy(maps[b["ids"].numpy()].astype(np.float16).astype(np.float32))
        raw = crop_maps(whole, crops, [(SOURCE, SOURCE)] * 16, IMAGE // PATCH).flatten(1)
        expected = (raw - raw.mean(1, keepdim=True)) / (raw.var(1, keepdim=True) + 1e-6).sqrt()
        assert b["gpa_target"].shape == (16, N)
        flat = raw.var(1) < 0.01  # nearly background only: GPA's 1e-6 in the variance shows
        assert torch.allclose(b["gpa_target"][~flat], expected[~flat], atol=5e-3)
        assert (~flat).sum() > 8
    with pytest.raises(LoaderError, match="needs maps of kind gpa.*holds cls_attn"):
        next(SalientLoader(config(demo_data, box_store, gpa_target=True)).epoch(0))


def test_samples_a_damaged_tar_loses_are_counted_as_corrupt(tmp_path):
    """A tar whose header in the middle is garbage ends there for tarfile (silently, past the
    first member): the samples after it are lost. On a dataset written before digests (format
    1, nothing to check the bytes against) the loader counts them as corrupt."""
    data = tmp_path / "d"
    ingest_demo(data, n=32, seed=0, shard_size=16, image_size=32)
    body = json.loads((data / "manifest.json").read_text())
    body["format"] = "salient-dataset/1"
    for shard in body["shards"]:
        shard["sha256"] = shard["head_sha256"] = ""
    (data / "manifest.json").write_text(json.dumps(body))
    with tarfile.open(data / "shard-000000.tar") as tar:
        header = next(m for m in tar if m.name.startswith(sample_key(8))).offset
    with open(data / "shard-000000.tar", "r+b") as stream:  # the same size: the manifest holds
        stream.seek(header)
        stream.write(b"\x01" * 512)
    config = LoaderConfig(
        data=str(data), image_size=32, patch_size=8, batch_size=8, strategy="random",
        num_workers=0,
    )  # fmt: skip
    loader = SalientLoader(config)
    seen = {i for batch in loader.epoch(0) for i in batch["ids"].tolist()}
    assert loader.stats.corrupt_ids == set(range(8, 16)) and loader.stats.corrupt == 8
    assert seen == set(range(32)) - set(range(8, 16))  # never another sample in their place


_HOLDS_ITS_WORKERS = """
import sys, time
from salient.pipeline.loader import LoaderConfig, SalientLoader

config = LoaderConfig(data=sys.argv[1], image_size=32, patch_size=8, batch_size=8,
                      num_workers=2, strategy="random")
loader = SalientLoader(config)
next(iter(loader.epoch(0)))  # its DataLoader workers run now
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_loader_workers_die_with_the_process_that_started_them(demo_data):
    # A train worker killed by Ray's memory monitor, a node, or a test: its DataLoader workers
    # must go too, or they hold its socket to Ray's raylet and Ray never restarts the group.
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_ITS_WORKERS, str(demo_data)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 2.0  # PyTorch's own watchdog would take up to 5 s, or hang
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # leave nothing behind, then fail
    assert not alive, f"DataLoader workers {alive} outlived their process"
