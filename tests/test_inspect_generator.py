"""``salient inspect --generator``: an AutoMAE checkpoint's mask probability on a heads
generation, its panels and its box statistics, checked through an independent computation.

The store (our writer API, zarr on disk) holds two heads per demo image on an 8 × 8 grid: head
0 is the object box's cell coverage, head 1 noise. The AutoMAE (mae-micro, 32 px, 4 px
patches: the same 8 × 8 grid) has a generator set by hand to follow head 0, so its mask
probability should sit on the objects. Expectations read the heads with plain zarr, run the
generator's two convolutions with ``F.conv2d`` and rasterise the boxes on the pixel grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from salient.jobs.inspect.config import InspectConfig, InspectError
from salient.jobs.inspect.driver import run_inspect
from salient.jobs.train.config import TrainConfig
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore
from salient.trainer.automae import automae_settings, build_automae
from salient.trainer.checkpoint import save_checkpoint
from salient.trainer.models import build_model

GRID, HEADS, INVALID = 8, 2, (5, 70)
IDS = (0, 5, 33)


def _pixel_cover(box, size: int) -> np.ndarray:
    mask = np.zeros((size, size))
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = 1.0
    cell = size // GRID
    return mask.reshape(GRID, cell, GRID, cell).mean(axis=(1, 3))


def _boxes(dataset) -> dict[int, tuple]:
    import webdataset as wds

    boxes = {}
    for sample in wds.WebDataset(dataset.shard_urls(), shardshuffle=False, empty_check=False):
        box = json.loads(sample["box.json"])
        boxes[int(sample["__key__"])] = (box["x0"], box["y0"], box["x1"], box["y1"])
    return boxes


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inspect-generator")
    dataset = open_dataset(demo_data)
    size, boxes = dataset.manifest.demo["image_size"], _boxes(dataset)
    heads = np.zeros((dataset.num_samples, HEADS, GRID, GRID), np.float32)
    rng = np.random.default_rng(0)
    for i, box in boxes.items():
        cover = _pixel_cover(box, size)
        heads[i, 0] = (cover + 0.01) / (cover + 0.01).sum()
        noise = rng.random((GRID, GRID)) + 0.1
        heads[i, 1] = noise / noise.sum()
    valid = np.ones(dataset.num_samples, np.uint8)
    valid[list(INVALID)] = 0
    store = SaliencyStore.create(str(root / "s.zarr"), dataset, grid=GRID)
    names = {}
    for kind in ("heads", "cls_attn"):
        teacher = {"path": "t", "sha256": "0" * 64, "name": "t", "epoch": 0, "kind": kind}
        writer = store.begin_generation(
            teacher, kind, image_size=64, patch_size=8, heads=HEADS if kind == "heads" else None
        )
        for shard in dataset.shards:
            rows = slice(shard.first_id, shard.stop_id)
            part = heads[rows].astype(np.float16)
            writer.write_shard(
                shard.index, part.mean(1), valid[rows], part if kind == "heads" else None
            )
        writer.publish()
        names[kind] = writer.name
    run = TrainConfig(
        data=str(demo_data),
        store=str(root / "s.zarr"),
        model="mae-micro",
        family="automae",
        strategy="random",
        image_size=32,
        patch_size=4,
        generator_heads=HEADS,
    )
    torch.manual_seed(0)
    model = build_automae(**automae_settings(run))
    with torch.no_grad():  # the generator follows head 0: the object's coverage
        first, second = model.generator.net[0], model.generator.net[2]
        for conv in (first, second):
            conv.weight.zero_()
            conv.bias.zero_()
        first.weight[0, 0, 1, 1] = 1.0
        second.weight[0, 0, 1, 1] = 40.0
    checkpoint = save_checkpoint(root / "automae.pt", model, None, None, 1, 1, None, run.as_dict())
    torch.manual_seed(0)
    mae = build_model("mae-micro", 32, 4)
    plain = save_checkpoint(root / "mae.pt", mae, None, None, 1, 1, None, {"model": "mae-micro"})
    return {
        "data": str(demo_data),
        "store": str(root / "s.zarr"),
        "names": names,
        "checkpoint": str(checkpoint),
        "plain": str(plain),
        "boxes": boxes,
        "size": size,
        "model": model,
        "out": root / "report",
    }


def _expected(setup) -> dict:
    """The generator's box figures over every usable row, recomputed from plain zarr."""
    group = zarr.open_group(setup["store"], mode="r")[setup["names"]["heads"]]
    heads = torch.as_tensor(np.asarray(group["head_maps"][:], dtype=np.float32))
    valid = np.asarray(group["valid"][:])
    net = setup["model"].generator.net
    hidden = F.relu(F.conv2d(heads, net[0].weight, net[0].bias, padding=1))
    p = F.conv2d(hidden, net[2].weight, net[2].bias, padding=1).flatten(1).softmax(-1)
    p = p.detach().double().numpy().reshape(-1, GRID, GRID)
    mass, area = [], []
    for i in np.flatnonzero(valid == 1):
        cover = _pixel_cover(setup["boxes"][i], setup["size"])
        mass.append((p[i] * cover).sum())
        area.append(cover.mean())
    mass, area = np.array(mass), np.array(area)
    return {"images": len(mass), "mass": mass.mean(), "lift": (mass / area).mean()}


def test_the_generators_box_lift_and_panels_beside_the_stored_maps(setup):
    config = InspectConfig(
        store=setup["store"],
        data=setup["data"],
        out=str(setup["out"]),
        ids=IDS,
        generation=setup["names"]["heads"],
        generator=setup["checkpoint"],
    )
    summary = run_inspect(config)
    body = json.loads((setup["out"] / "stats.json").read_text())
    stats, want = body["generator"]["stats"], _expected(setup)
    assert stats == summary["generator"]
    assert stats["images"] == want["images"] == 96 - len(INVALID)
    assert stats["mass_mean"] == pytest.approx(want["mass"], rel=1e-5)
    assert stats["lift_mean"] == pytest.approx(want["lift"], rel=1e-5)
    assert stats["lift_mean"] > 2  # a generator that follows the objects masks on them ...
    assert stats["masked_box_share_mean"] > stats["mask_ratio"] == 0.75  # ... more than random
    panels = {i: setup["out"] / "panels" / f"{i:09d}-generator.png" for i in IDS}
    assert [i for i, png in panels.items() if png.is_file()] == [0, 33]  # 5 has no map
    index = (setup["out"] / "index.html").read_text()
    assert "AutoMAE generator" in index and "000000033-generator.png" in index


def test_a_generator_needs_an_automae_checkpoint_and_a_heads_generation(setup, tmp_path):
    base = dict(store=setup["store"], data=setup["data"], out=str(tmp_path), ids=IDS)
    with pytest.raises(InspectError, match="is a checkpoint of mae; give one of an AutoMAE run"):
        run_inspect(InspectConfig(**base, generator=setup["plain"]))
    other = setup["names"]["cls_attn"]
    with pytest.raises(InspectError, match=f"takes 2 per-head maps but generation {other}"):
        run_inspect(InspectConfig(**base, generation=other, generator=setup["checkpoint"]))
