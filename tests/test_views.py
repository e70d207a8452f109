"""Multi-crop views in the loader: each global view's map is that view's crop of the stored map.

Data: the 96-image demo set (``demo_data``: 3 shards of 32, 96 px). Maps are written through
the store API on a 12×12 grid: linear ramps (each cell holds its centre's image x, or y), so
what a crop of the map must hold at every output patch is known analytically from the view's
box (as ``test_crops`` checks the single crop), and random maps for the masks, checked against
``torch.topk``. Views: 64 px global crops of 8 px patches (N = 64), 32 px local crops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TV
from PIL import Image, ImageFilter, ImageOps

from salient.pipeline import shards
from salient.pipeline.crops import CropBox, crop_pil
from salient.pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig, SalientLoader
from salient.pipeline.loader_config import LoaderError, MultiCrop
from salient.pipeline.manifest import open_dataset
from salient.pipeline.views import FIRST_GLOBAL, LOCAL, OTHER_GLOBAL, augment_view, view_augment
from salient.store import SaliencyStore

STORE_GRID, IMAGE, PATCH, SOURCE, LOCAL_SIZE = 12, 64, 8, 96, 32
GRID = IMAGE // PATCH
N = GRID * GRID


def publish(path, data, maps: np.ndarray, valid: np.ndarray | None = None) -> str:
    dataset = open_dataset(data)
    store = SaliencyStore.create(str(path), dataset, grid=STORE_GRID)
    teacher = {"path": "t", "sha256": "0" * 64, "name": "t", "epoch": 0, "kind": "cls_attn"}
    teacher |= {"image_size": SOURCE, "patch_size": 8, "reduce": "mean", "block": -1, "head": None}
    writer = store.begin_generation(
        teacher=teacher, kind="cls_attn", image_size=SOURCE, patch_size=8
    )
    valid = np.ones(dataset.num_samples, np.uint8) if valid is None else valid
    for shard in dataset.shards:
        part = slice(shard.first_id, shard.stop_id)
        writer.write_shard(shard.index, maps[part].astype(np.float16), valid[part])
    writer.publish()
    return str(path)


def ramp(axis: int, n: int = 96) -> np.ndarray:
    """``[n, G, G]``: every cell holds its centre's image x (axis 1) or y (axis 0)."""
    centres = (np.arange(STORE_GRID) + 0.5) * SOURCE / STORE_GRID  # 4, 12, …, 92: exact in f16
    grid = np.meshgrid(centres, centres, indexing="ij")[axis]  # [G, G] rows = y
    return np.broadcast_to(grid, (n, STORE_GRID, STORE_GRID)).astype(np.float32)


def config(data, store=None, views=None, **overrides) -> LoaderConfig:
    fields = {
        "data": str(data),
        "store": store,
        "image_size": IMAGE,
        "patch_size": PATCH,
        "batch_size": 16,
        "strategy": "attmask_high",
        "mask_ratio": 0.25,
        "throw_ratio": 0.0,
        "num_workers": 0,
        "shuffle_buffer": 20,
        "chunk_size": 8,
        "seed": 3,
        "crop_scale": (0.25, 1.0),
        "views": views or MultiCrop(local_crops=3, local_size=LOCAL_SIZE),
    }
    return LoaderConfig(**{**fields, **overrides})


def batches(c: LoaderConfig, epoch: int = 0) -> list[dict]:
    return list(SalientLoader(c).epoch(epoch))


def boxes_of(batch: dict, b: int) -> list[CropBox]:
    return [CropBox(*row[:4].tolist(), bool(row[4])) for row in batch["crop_boxes"][b]]


def expected_coordinate(box: CropBox, axis: int) -> torch.Tensor:
    """``[grid, grid]``: the image x (axis 1) or y (axis 0) of each output patch's centre."""
    j = torch.arange(GRID) + 0.5
    if axis == 1:
        jx = (GRID - j) if box.flip else j
        return (box.left + jx * box.width / GRID).expand(GRID, GRID)
    return (box.top + j * box.height / GRID)[:, None].expand(GRID, GRID)


def inside_map(box: CropBox) -> torch.Tensor:
    """Patches whose map samples stay between the outer cell centres (no edge clamping)."""
    j = torch.arange(GRID)
    cells = STORE_GRID / SOURCE  # map cells per image pixel

    def ok(start, length):
        lo = (start + j * length / GRID) * cells
        hi = (start + (j + 1) * length / GRID) * cells
        return (lo >= 0.5) & (hi <= STORE_GRID - 0.5)

    ok_x, ok_y = ok(box.left, box.width), ok(box.top, box.height)
    return ok_y[:, None] & (ok_x.flip(0) if box.flip else ok_x)[None, :]


# ---------------------------------------------------------------- maps per global view


def test_each_global_views_map_is_that_views_crop_of_the_stored_map(demo_data, tmp_path):
    low, high = (0.5, STORE_GRID - 0.5)  # whole-image min-max: the outer cell centres
    low, high = low * SOURCE / STORE_GRID, high * SOURCE / STORE_GRID
    checked = 0
    per_axis = {}
    for axis in (0, 1):
        store = publish(tmp_path / f"ramp{axis}.zarr", demo_data, ramp(axis))
        per_axis[axis] = batches(config(demo_data, store))
    for bx, by in zip(per_axis[1], per_axis[0]):
        assert torch.equal(bx["crop_boxes"], by["crop_boxes"])  # same seed: same views
        assert bx["view_maps"].shape == (2, 16, N)
        for b in range(16):
            for v, box in enumerate(boxes_of(bx, b)):
                inside = inside_map(box)
                for axis, batch in ((1, bx), (0, by)):
                    got = batch["view_maps"][v, b].view(GRID, GRID)
                    expected = (expected_coordinate(box, axis) - low) / (high - low)
                    assert torch.allclose(got[inside], expected[inside], atol=1e-4)
                checked += int(inside.sum())
    assert checked > 2000
    boxes = torch.cat([b["crop_boxes"] for b in per_axis[1]])  # [S, 2, 5]
    assert not torch.equal(boxes[:, 0], boxes[:, 1])  # each view its own box
    areas = boxes[..., 2] * boxes[..., 3] / SOURCE**2  # global scale 0.25–1
    assert areas.min() >= 0.24 and areas.max() <= 1.0 and boxes[..., 4].float().mean() > 0.3


def test_global_pixels_are_cropped_with_the_views_box(demo_data):
    c = config(demo_data, views=MultiCrop(local_crops=2, local_size=LOCAL_SIZE, augment=False))
    dataset = open_dataset(demo_data)
    records = {}
    for shard in dataset.shards:
        for i, record in enumerate(
            shards.read_images(dataset.shard_url(shard), shard.first_id, shard.count)
        ):
            records[shard.first_id + i] = record[1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batch = batches(c)[0]
    for b, sample in enumerate(batch["ids"].tolist()):
        image = shards.open_rgb(records[sample])
        for v, box in enumerate(boxes_of(batch, b)):
            crop = torch.from_numpy(np.asarray(crop_pil(image, box, IMAGE))).permute(2, 0, 1)
            expected = (crop.float() / 255 - mean) / std
            assert torch.allclose(batch["global_images"][v, b], expected, atol=1e-5)


def test_augmentations_change_pixels_only(demo_data, tmp_path):
    store = publish(tmp_path / "r.zarr", demo_data, ramp(1))
    plain = batches(
        config(demo_data, store, MultiCrop(local_crops=3, local_size=32, augment=False))
    )
    augmented = batches(config(demo_data, store))
    for a, b in zip(plain, augmented):
        for key in ("crop_boxes", "view_maps", "masks", "ids"):
            assert torch.equal(a[key], b[key]), key
        changed = (a["global_images"] - b["global_images"]).abs().flatten(2).amax(-1) > 0.05
        assert changed[0].float().mean() > 0.5  # view 1: blur always, jitter 80 %
        assert a["local_images"].shape == (3, 16, 3, 32, 32)
        assert not torch.equal(a["local_images"], b["local_images"])


# ---------------------------------------------------------------- masks per global view


def test_masks_are_the_top_of_each_views_own_map(demo_data, tmp_path):
    maps = np.random.default_rng(0).random((96, STORE_GRID, STORE_GRID)).astype(np.float32)
    store = publish(tmp_path / "rand.zarr", demo_data, maps)
    for batch in batches(config(demo_data, store, strategy_options={})):
        weights, masks = batch["view_maps"], batch["masks"]  # [2, B, N]
        top = weights.topk(int(N * 0.25), dim=-1).indices
        assert torch.equal(masks, torch.zeros_like(masks).scatter_(-1, top, True))
    hint = batches(config(demo_data, store, strategy="attmask_hint", mask_ratio=0.5))
    for batch in hint:
        rank = batch["view_maps"].argsort(-1, descending=True).argsort(-1)
        masks = batch["masks"]
        picked = masks.any(-1)  # mask_prob default 1 here: every view is masked
        assert picked.all() and (masks.sum(-1) == 32 - 3).all()  # 64·0.5, int(64·0.1·0.5)
        revealed = (rank < 32) & ~masks
        assert (rank[masks] < 32).all() and (rank[revealed] < 6).all()  # pool int(6.4)


def test_ibot_schedule_leaves_unpicked_views_unmasked_and_maps_missing_rows_at_random(
    demo_data, tmp_path
):
    maps = np.random.default_rng(1).random((96, STORE_GRID, STORE_GRID)).astype(np.float32)
    valid = np.ones(96, np.uint8)
    valid[::3] = 0
    store = publish(tmp_path / "v.zarr", demo_data, maps, valid)
    options = {"mask_prob": 0.5, "ratio_var": 0.2}
    loader = SalientLoader(config(demo_data, store, strategy_options=options))
    counts, seen, without = [], 0, 0
    for batch in loader.epoch(0):
        per_row = batch["masks"].sum(-1)  # [2, B]
        counts.append(set(per_row[per_row > 0].tolist()))
        has = batch["has_saliency"]
        assert torch.equal(has, torch.from_numpy((batch["ids"].numpy() % 3) != 0))
        rank = batch["view_maps"].argsort(-1, descending=True).argsort(-1)
        on_top = (rank < per_row[..., None]) | ~batch["masks"]  # masked ⊂ the top
        assert on_top[:, has].all()
        seen += int((per_row > 0).sum())
        without += int((~has).sum())
    assert all(len(c) == 1 for c in counts) and len(set().union(*counts)) > 1
    assert 0.3 < seen / (2 * 16 * len(counts)) < 0.7  # about half the views masked
    assert loader.stats.fallback == without > 0  # counted as the single-view loader does


def test_online_masks_read_no_store_and_plan_no_mask(demo_data, tmp_path):
    store = publish(tmp_path / "o.zarr", demo_data, ramp(1))
    views = MultiCrop(local_crops=0, local_size=LOCAL_SIZE, masks_online=True)
    batch = batches(config(demo_data, store, views))[0]
    assert "masks" not in batch and "view_maps" not in batch and batch["generation"] is None
    assert batch["local_images"].shape == (0, 16, 3, LOCAL_SIZE, LOCAL_SIZE)
    assert isinstance(batch["mask_seed"], int)


def test_block_views_need_no_store_and_repeat_for_a_seed(demo_data):
    c = config(demo_data, strategy="block", strategy_options={"mask_prob": 0.5})
    first, again = batches(c), batches(c)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("global_images", "local_images", "masks"))
        assert a["mask_seed"] == b["mask_seed"]
    assert len({i for b in first for i in b["ids"].tolist()}) == 16 * len(first)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"throw_ratio": 0.2}, "mask tokens only"),
        ({"decode": "device"}, "decode in the workers"),
        ({"views": MultiCrop(local_size=30)}, "local_size must be a multiple"),
        ({"views": MultiCrop(global_crops=0)}, "global_crops must be"),
        ({"views": MultiCrop(local_scale=(0.3, 0.1))}, "local_scale"),
    ],
)
def test_bad_view_configs_are_refused(demo_data, overrides, words):
    with pytest.raises(LoaderError, match=words):
        config(demo_data, **overrides)


# ---------------------------------------------------------------- DINO's augmentations


def test_views_take_dinos_augmentation_probabilities():
    # iBOT main_ibot.py DataAugmentationiBOT: global_transfo1, global_transfo2, local_transfo
    assert [view_augment(v, 2) for v in range(4)] == [FIRST_GLOBAL, OTHER_GLOBAL, LOCAL, LOCAL]
    assert (FIRST_GLOBAL.blur_p, FIRST_GLOBAL.solarize_p) == (1.0, 0.0)
    assert (OTHER_GLOBAL.blur_p, OTHER_GLOBAL.solarize_p) == (0.1, 0.2)
    assert (LOCAL.blur_p, LOCAL.solarize_p) == (0.5, 0.0)
    assert {(a.jitter_p, a.grey_p) for a in (FIRST_GLOBAL, OTHER_GLOBAL, LOCAL)} == {(0.8, 0.2)}


def test_augment_view_applies_dinos_transforms_as_torchvision_and_pil_do():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    nothing = [0.999] * 13  # no op fires but FIRST_GLOBAL's blur (p = 1)
    got = augment_view(image, nothing, FIRST_GLOBAL)
    assert np.array_equal(
        np.asarray(got), np.asarray(image.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * 0.999)))
    )
    assert np.array_equal(np.asarray(augment_view(image, nothing, LOCAL)), np.asarray(image))
    order = [0.7, 0.1, 0.9, 0.3]  # argsort: contrast, hue, brightness, saturation
    draws = [0.0, *order, 0.25, 0.5, 0.75, 1.0, 0.0, 0.0, 0.5, 0.0]
    got = augment_view(image, draws, OTHER_GLOBAL)
    expected = TV.adjust_contrast(image, 0.6 + 0.8 * 0.5)  # ColorJitter(0.4, 0.4, 0.2, 0.1)
    expected = TV.adjust_hue(expected, 0.1)
    expected = TV.adjust_brightness(expected, 0.6 + 0.8 * 0.25)
    expected = TV.adjust_saturation(expected, 0.8 + 0.4 * 0.75)
    expected = TV.rgb_to_grayscale(expected, num_output_channels=3)  # RandomGrayscale
    expected = expected.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * 0.5))
    expected = ImageOps.solarize(expected)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
