"""Per-head maps through the store and the loader: every head cropped with its image, and
the batches an AutoMAE trains on.

Data: the 96-image demo set (3 shards of 32, 96 px, fixture ``demo_data``). Heads written
through the store API on a 12×12 grid, read back through plain zarr for the expectations:
an x ramp, a y ramp (whose crops are known analytically), each scene's object box, and
noise. Loader: 64 px crops of 8 px patches (an 8×8 output grid).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from salient.pipeline.crops import CropBox, CropError, crop_head_maps, crop_maps
from salient.pipeline.loader import LoaderConfig, LoaderError, SalientLoader
from salient.pipeline.manifest import open_dataset
from salient.store import LayoutMismatchError, SaliencyStore
from salient.trainer.automae import automae_loader_fields, build_automae
from salient.trainer.family import FAMILIES
from salient.trainer.loop import build_optimizer, train_one_epoch
from salient.trainer.schedules import WarmupCosine

CELLS, IMAGE, PATCH, SOURCE, HEADS = 12, 64, 8, 96, 4
GRID = IMAGE // PATCH


# ---------------------------------------------------------------- helpers


def _boxes(data: Path) -> dict[int, tuple[float, float, float, float]]:
    """Object boxes per sample id, read straight from the tars."""
    boxes = {}
    for path in sorted(data.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "box.json":
                    box = json.loads(tar.extractfile(member).read())
                    boxes[int(key)] = (box["x0"], box["y0"], box["x1"], box["y1"])
    return boxes


def _head_maps(boxes: dict) -> np.ndarray:
    """``[n, 4, G, G]``: x ramp and y ramp (value = cell centre + 1), box cover, noise."""
    n, centres = len(boxes), np.arange(CELLS) + 1.5
    maps = np.zeros((n, HEADS, CELLS, CELLS), np.float32)
    maps[:, 0] = centres[None, None, :]
    maps[:, 1] = centres[None, :, None]
    edges = np.arange(CELLS + 1) * SOURCE / CELLS
    for i, (x0, y0, x1, y1) in boxes.items():
        cover_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
        cover_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
        maps[i, 2] = np.outer(cover_y, cover_x) / (SOURCE / CELLS) ** 2
    maps[:, 3] = np.random.default_rng(0).random((n, CELLS, CELLS)) + 0.1
    return maps


def _publish(path: Path, data: Path, head_maps=None, valid=None, kind="heads") -> str:
    dataset = open_dataset(data)
    store = SaliencyStore.create(str(path), dataset, grid=CELLS)
    n = dataset.num_samples
    valid = np.ones(n, np.uint8) if valid is None else valid
    teacher = {"path": "t", "sha256": "0" * 64, "name": "t", "epoch": 0, "kind": kind}
    writer = store.begin_generation(
        teacher=teacher,
        kind=kind,
        image_size=SOURCE,
        patch_size=SOURCE // CELLS,
        heads=None if head_maps is None else head_maps.shape[1],
    )
    for shard in dataset.shards:
        part = slice(shard.first_id, shard.stop_id)
        heads = None if head_maps is None else head_maps[part].astype(np.float16)
        maps = np.ones((shard.count, CELLS, CELLS)) if heads is None else heads.mean(1)
        writer.write_shard(shard.index, maps.astype(np.float16), valid[part], head_maps=heads)
    writer.publish()
    return writer.name


def _config(data, store, **overrides) -> LoaderConfig:
    fields = {
        "data": str(data),
        "store": str(store),
        "image_size": IMAGE,
        "patch_size": PATCH,
        "batch_size": 16,
        "strategy": "random",
        "mask_ratio": 0.75,
        "throw_ratio": 0.0,
        "num_workers": 0,
        "shuffle_buffer": 20,
        "chunk_size": 8,
        "seed": 3,
        "head_maps": HEADS,
    }
    return LoaderConfig(**{**fields, **overrides})


def _plain_heads(store: Path, generation: str) -> np.ndarray:
    """The stored per-head rows, read with plain zarr (not through salient's reader)."""
    return zarr.open_group(str(store), mode="r")[generation]["head_maps"][:].astype(np.float32)


@pytest.fixture(scope="module")
def heads_store(demo_data, tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("heads") / "saliency.zarr"
    return path, _publish(path, demo_data, _head_maps(_boxes(demo_data)))


def _by_id(batches: list[dict]) -> dict[int, torch.Tensor]:
    return {i: b["head_maps"][k] for b in batches for k, i in enumerate(b["ids"].tolist())}


# ---------------------------------------------------------------- crops


def test_every_head_is_cropped_like_a_single_map_and_keeps_its_mass():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 3, CELLS, CELLS, generator=g)
    boxes = [CropBox(4 * i, 2 * i, 40 + i, 50 - i, bool(i % 2)) for i in range(5)]
    sizes = [(96, 90 + i) for i in range(5)]
    joint = crop_maps(maps, boxes, sizes, GRID)  # [B, H, g, g] in one call
    assert joint.shape == (5, 3, GRID, GRID)
    for h in range(3):
        torch.testing.assert_close(joint[:, h], crop_maps(maps[:, h], boxes, sizes, GRID))
    heads = crop_head_maps(maps, boxes, sizes, GRID)
    torch.testing.assert_close(heads.sum((-2, -1)), maps.sum((-2, -1)))
    torch.testing.assert_close(
        heads / heads.sum((-2, -1), keepdim=True), joint / joint.sum((-2, -1), keepdim=True)
    )
    zero = crop_head_maps(torch.zeros(1, 2, CELLS, CELLS), boxes[:1], sizes[:1], GRID)
    assert (zero == 0).all()
    with pytest.raises(CropError, match=r"\[B, C, G, G\]"):
        crop_maps(torch.zeros(1, 2, 4, 5), boxes[:1], sizes[:1], GRID)


# ---------------------------------------------------------------- the loader


def test_batches_carry_each_head_cropped_with_its_image(demo_data, heads_store):
    store, generation = heads_store
    stored = _plain_heads(store, generation)  # [96, H, 12, 12]
    loader = SalientLoader(_config(demo_data, store))
    batches = list(loader.epoch(0))
    assert len(batches) == 6 and loader.stats.fallback == 0
    for b in batches:
        assert b["head_maps"].shape == (16, HEADS, GRID, GRID) and b["has_saliency"].all()
        ids = b["ids"].numpy()
        boxes = [CropBox(*row[:4].tolist(), bool(row[4])) for row in b["crop_boxes"]]
        whole = torch.from_numpy(stored[ids])  # [16, H, 12, 12]
        # each head: the single-map crop of the stored map, scaled to the head's stored sum
        for h in range(HEADS):
            single = crop_maps(whole[:, h], boxes, [(SOURCE, SOURCE)] * 16, GRID)
            part = single.sum((-2, -1))  # a crop that misses the object keeps zeros
            scale = torch.where(part > 0, whole[:, h].sum((-2, -1)) / part, 0.0)
            expected = single * scale[:, None, None]
            torch.testing.assert_close(b["head_maps"][:, h], expected, rtol=1e-5, atol=1e-6)
        # analytically: the ramps' crops are the patch centres in map cells (interior patches)
        for k, box in enumerate(boxes):
            _check_ramps(b["head_maps"][k], box, stored[ids[k], 0].sum())


def _check_ramps(heads: torch.Tensor, box: CropBox, whole_sum: float) -> None:
    step = CELLS / SOURCE  # map cells per image pixel
    cols = (np.arange(GRID) + 0.5) / GRID * box.width * step + box.left * step
    rows = (np.arange(GRID) + 0.5) / GRID * box.height * step + box.top * step
    if box.flip:
        cols = cols[::-1]
    x_ramp = np.broadcast_to(cols + 1.0, (GRID, GRID))  # value of cell u = (u + 0.5) + 1
    y_ramp = np.broadcast_to((rows + 1.0)[:, None], (GRID, GRID))
    half = 0.5 * box.width * step / GRID  # the patch's half-width in cells
    inside_x = (cols - half >= 0.5) & (cols + half <= CELLS - 0.5)  # off the clamped border
    inside_y = (rows - 0.5 * box.height * step / GRID >= 0.5) & (
        rows + 0.5 * box.height * step / GRID <= CELLS - 0.5
    )
    for head, ramp, inside in ((0, x_ramp, inside_x[None, :]), (1, y_ramp, inside_y[:, None])):
        got = heads[head].numpy()
        assert got.sum() == pytest.approx(whole_sum, rel=1e-4)  # the head keeps its mass
        mask = np.broadcast_to(inside, (GRID, GRID))
        if mask.sum() < 2:
            continue
        scale = (got[mask] * ramp[mask]).sum() / (ramp[mask] ** 2).sum()
        np.testing.assert_allclose(got[mask], scale * ramp[mask], rtol=2e-3)


def test_head_maps_cross_worker_processes_and_the_device_path_unchanged(demo_data, heads_store):
    store, _ = heads_store
    inline = _by_id(list(SalientLoader(_config(demo_data, store)).epoch(0)))
    for overrides in ({"num_workers": 1}, {"decode": "device"}):
        other = _by_id(list(SalientLoader(_config(demo_data, store, **overrides)).epoch(0)))
        assert other.keys() == inline.keys()
        for i, maps in other.items():
            torch.testing.assert_close(maps, inline[i])


def test_samples_without_maps_carry_zeros_and_are_counted(demo_data, tmp_path):
    heads, valid = _head_maps(_boxes(demo_data)), np.ones(96, np.uint8)
    valid[[5, 50]] = 0
    heads[77, 2, 3, 3] = np.nan  # one damaged head: the sample has no map
    _publish(tmp_path / "s.zarr", demo_data, heads, valid)
    loader = SalientLoader(_config(demo_data, tmp_path / "s.zarr"))
    batches = list(loader.epoch(0))
    without = {i for b in batches for i, h in zip(b["ids"].tolist(), b["has_saliency"]) if not h}
    assert without == {5, 50, 77} and loader.stats.fallback == 3
    maps = _by_id(batches)
    assert all((maps[i] == 0).all() for i in without)
    assert all(maps[i].sum() > 0 for i in maps if i not in without)


def test_no_generation_yet_gives_zero_maps_and_counts_every_sample(demo_data, tmp_path):
    SaliencyStore.create(str(tmp_path / "e.zarr"), open_dataset(demo_data), grid=CELLS)
    loader = SalientLoader(_config(demo_data, tmp_path / "e.zarr"))
    with pytest.warns(UserWarning, match="no published generation"):
        batches = list(loader.epoch(0))
    assert all((b["head_maps"] == 0).all() and not b["has_saliency"].any() for b in batches)
    assert loader.stats.fallback == 96


def test_generations_without_those_heads_are_refused(demo_data, heads_store, tmp_path):
    store, _ = heads_store
    with pytest.raises(LoaderError, match="per-head maps of 6 heads.*heads=4"):
        next(SalientLoader(_config(demo_data, store, head_maps=6)).epoch(0))
    plain = tmp_path / "plain.zarr"
    generation = _publish(plain, demo_data, kind="cls_attn")
    with pytest.raises(LoaderError, match="holds kind cls_attn with heads=None.*--kind heads"):
        next(SalientLoader(_config(demo_data, plain)).epoch(0))
    reader = SaliencyStore.open(str(plain)).bind(generation)
    with pytest.raises(LayoutMismatchError, match="no per-head maps"):
        reader.read_head_maps(0, 4)
    assert reader.heads is None


def test_store_reader_returns_the_stored_head_rows(heads_store):
    store, generation = heads_store
    reader = SaliencyStore.open(str(store)).bind(generation)
    assert reader.heads == HEADS
    rows = reader.read_head_maps(30, 40)
    assert rows.dtype == np.float16 and rows.shape == (10, HEADS, CELLS, CELLS)
    np.testing.assert_array_equal(rows.astype(np.float32), _plain_heads(store, generation)[30:40])


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"head_maps": 0}, "head_maps must be a positive integer"),
        ({"gpa_target": True}, "turn one of"),
    ],
)
def test_config_refuses_bad_head_settings(demo_data, bad, words):
    with pytest.raises(LoaderError, match=words):
        _config(demo_data, "s.zarr", **bad)


def test_loader_batches_train_an_automae_through_the_loop(demo_data, heads_store):
    """The contract between the two: what the loader's head_maps batches carry is what the
    AutoMAE family reads (``automae_loader_fields`` names the loader field)."""
    store, generation = heads_store
    settings = {"name": "mae-micro", "image_size": IMAGE, "patch_size": PATCH, "heads": HEADS}
    fields = automae_loader_fields(settings)
    loader = SalientLoader(_config(demo_data, store, **fields))
    torch.manual_seed(0)
    model = build_automae(**settings)
    optimizer = build_optimizer(model, 1e-3)
    records = []
    totals = train_one_epoch(
        model,
        optimizer,
        WarmupCosine(1e-3, 3),
        loader.epoch(0),
        epoch=0,
        step=0,
        device=torch.device("cpu"),
        accum_iter=2,
        family=FAMILIES["automae"],
        hooks=FAMILIES["automae"].hooks(model, optimizer),
        steps_per_epoch=3,
        on_step=lambda record, merged: records.append(record),
    )
    assert totals["steps"] == 3 and totals["with_saliency"] == 96
    assert all(r["generation"] == generation and r["loss_g"] > 0 for r in records)
    assert all(
        np.isfinite([r["loss_rec"], r["loss_d_real"], r["loss_d_fake"]]).all() for r in records
    )
