"""Joint crops: the map under a crop box lands on the same output patches as the image.

Ground truth always comes through an independent path: torchvision's own
RandomResizedCrop for the box law, ``crop_image`` (torchvision's resized_crop) of a box
mask for where an object ends up, and analytic image coordinates for linear ramps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from salient.errors import SalientError
from salient.pipeline.crops import (
    CropBox,
    CropError,
    crop_image,
    crop_maps,
    normalize_weights,
    sample_crop_box,
    whole_image_weights,
)
from salient.pipeline.demo import make_scene

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
G, GRID, SIZE = 14, 14, 224  # teacher map side, output patch grid, output image side


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_map(box, image_hw, cells: int = G) -> torch.Tensor:
    """The object box rasterised on the map grid: each cell's covered area fraction."""
    height, width = image_hw
    x0, y0, x1, y1 = box
    edges_x = torch.arange(cells + 1, dtype=torch.float64) * width / cells
    edges_y = torch.arange(cells + 1, dtype=torch.float64) * height / cells
    cover_x = (edges_x[1:].clamp(max=x1) - edges_x[:-1].clamp(min=x0)).clamp(min=0) * cells / width
    cover_y = (edges_y[1:].clamp(max=y1) - edges_y[:-1].clamp(min=y0)).clamp(min=0) * cells / height
    return (cover_y[:, None] * cover_x[None, :]).float()  # [G, G], rows = y


def box_patches_in_crop(box, image_hw, crop: CropBox) -> torch.Tensor:
    """Output patches more than half covered by the object, via crop_image of a box mask."""
    height, width = image_hw
    x0, y0, x1, y1 = box
    mask = torch.zeros(1, height, width)
    mask[:, y0:y1, x0:x1] = 1.0
    cropped = crop_image(mask, crop, SIZE)  # [1, S, S] torchvision's resized_crop + flip
    return F.avg_pool2d(cropped, SIZE // GRID)[0] > 0.5  # [grid, grid]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def scene_ious(image_hw, box, crops, device="cpu", ignore_crop=False) -> list[float]:
    maps = box_map(box, image_hw).expand(len(crops), G, G).to(device)
    full = CropBox(0, 0, image_hw[0], image_hw[1], False)
    read = [full._replace(flip=c.flip) for c in crops] if ignore_crop else crops
    weights = crop_maps(maps, read, [image_hw] * len(crops), GRID).cpu()
    return [iou(w > 0.5, box_patches_in_crop(box, image_hw, c)) for w, c in zip(weights, crops)]


def scaled_scene(index: int, image_hw) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """A demo scene's object box, rescaled to an image of ``image_hw`` (H, W)."""
    scene = make_scene(0, index, 192)
    height, width = image_hw
    x0, y0, x1, y1 = scene.box
    sx, sy = width / scene.image.width, height / scene.image.height
    return (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)), image_hw


# ---------------------------------------------------------------- the demo-scene contract


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_hw", [(192, 192), (160, 240), (256, 144)])
def test_map_weights_land_on_the_object_patches(image_hw, device):
    ious, misaligned = [], []
    for index in range(8):
        box, hw = scaled_scene(index, image_hw)
        g = gen(index)
        crops = [sample_crop_box(*hw, g) for _ in range(40)]
        ious += scene_ious(hw, box, crops, device)
        misaligned += scene_ious(hw, box, crops, device, ignore_crop=True)
    assert np.mean(ious) >= 0.9, np.mean(ious)
    assert np.mean(misaligned) < 0.6  # the check has power: a map not cropped fails it


@pytest.mark.parametrize("device", DEVICES)
def test_flip_mirrors_map_and_image_exactly(device):
    box, hw = scaled_scene(3, (160, 240))
    maps = box_map(box, hw).expand(20, G, G).to(device) * torch.rand(20, G, G, device=device)
    crops = [sample_crop_box(*hw, gen(s)) for s in range(20)]
    straight = crop_maps(maps, [c._replace(flip=False) for c in crops], [hw] * 20, GRID)
    flipped = crop_maps(maps, [c._replace(flip=True) for c in crops], [hw] * 20, GRID)
    assert torch.equal(flipped, straight.flip(-1))
    image = torch.rand(3, *hw, device=device)
    a = crop_image(image, crops[0]._replace(flip=False), 64)
    b = crop_image(image, crops[0]._replace(flip=True), 64)
    assert torch.equal(b, a.flip(-1))


# ---------------------------------------------------------------- exact alignment on ramps


def ramp_maps(image_hw, cells: int) -> torch.Tensor:
    """``[2, G, G]``: each cell holds the image x (map 0) and y (map 1) of its centre."""
    height, width = image_hw
    centres = torch.arange(cells, dtype=torch.float32) + 0.5
    x = (centres * width / cells).expand(cells, cells)
    y = (centres * height / cells)[:, None].expand(cells, cells)
    return torch.stack([x, y])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_hw, cells, grid", [((120, 200), 10, 8), ((192, 192), 14, 14)])
def test_map_and_image_agree_on_every_patch_position(image_hw, cells, grid, device):
    """Patch centres read from the cropped map equal those read from the cropped image."""
    height, width = image_hw
    maps = ramp_maps(image_hw, cells).to(device)
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    image = torch.stack([xx, yy, torch.zeros_like(xx)]).float().to(device)  # pixel centres
    size = 8 * grid
    checked = 0
    for seed in range(30):
        crop = sample_crop_box(height, width, gen(seed), scale=(0.1, 1.0))
        weights = crop_maps(maps, [crop, crop], [image_hw] * 2, grid).cpu()  # [2, grid, grid]
        from_image = F.avg_pool2d(crop_image(image, crop, size)[:2], 8).cpu()  # [2, grid, grid]
        j = torch.arange(grid) + 0.5
        jx = (grid - j) if crop.flip else j
        expected_x = (crop.left + jx * crop.width / grid).expand(grid, grid)
        expected_y = (crop.top + j * crop.height / grid)[:, None].expand(grid, grid)
        inside = _away_from_map_border(crop, image_hw, cells, grid)
        # in image pixels: the map path is exact, the image path within a tenth of a pixel
        assert torch.allclose(weights[0][inside], expected_x[inside], atol=1e-3)
        assert torch.allclose(weights[1][inside], expected_y[inside], atol=1e-3)
        assert torch.allclose(weights[:, inside], from_image[:, inside], atol=0.1)
        checked += int(inside.sum())
    assert checked > 200


def _away_from_map_border(crop: CropBox, image_hw, cells: int, grid: int) -> torch.Tensor:
    """Patches whose map samples all lie between the outer cell centres (no edge clamping)."""
    height, width = image_hw
    j = torch.arange(grid)
    x_lo = (crop.left + j * crop.width / grid) * cells / width
    x_hi = (crop.left + (j + 1) * crop.width / grid) * cells / width
    y_lo = (crop.top + j * crop.height / grid) * cells / height
    y_hi = (crop.top + (j + 1) * crop.height / grid) * cells / height
    ok_x = (x_lo >= 0.5) & (x_hi <= cells - 0.5)
    ok_y = (y_lo >= 0.5) & (y_hi <= cells - 0.5)
    if crop.flip:
        ok_x = ok_x.flip(0)
    return ok_y[:, None] & ok_x[None, :]


# ---------------------------------------------------------------- the box law


def test_box_law_matches_torchvision_random_resized_crop():
    height, width, n = 150, 260, 4000
    image = torch.zeros(3, height, width)
    tv = v2.RandomResizedCrop(SIZE, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    torch.manual_seed(0)
    theirs = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in
                       (tv.make_params([image]) for _ in range(n))], dtype=float)  # fmt: skip
    g = gen(1)
    boxes = [sample_crop_box(height, width, g) for _ in range(n)]
    ours = np.array([b[:4] for b in boxes], dtype=float)

    def stats(b):  # area fraction, log aspect, relative centre x and y
        top, left, h, w = b.T
        return np.stack([h * w / (height * width), np.log(w / h),
                         (left + w / 2) / width, (top + h / 2) / height], 1)  # fmt: skip

    a, b = stats(ours), stats(theirs)
    z = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / n + b.var(0) / n)
    assert np.abs(z).max() < 4.5, z
    assert all(t >= 0 and left >= 0 and t + h <= height and left + w <= width
               for t, left, h, w, _ in boxes)  # fmt: skip
    assert abs(np.mean([b.flip for b in boxes]) - 0.5) < 0.03


def test_box_sampling_is_reproducible_and_falls_back_like_torchvision():
    assert [sample_crop_box(100, 80, gen(5)) for _ in range(3)] == [
        sample_crop_box(100, 80, gen(5)) for _ in range(3)
    ]
    g = gen(0)
    assert len({sample_crop_box(100, 80, g) for _ in range(20)}) > 15
    tv = v2.RandomResizedCrop(SIZE)  # a 10x1000 strip never fits: central fallback
    for hw in ((10, 1000), (1000, 10)):
        want = tv.make_params([torch.zeros(3, *hw)])
        got = sample_crop_box(*hw, gen(0), scale=(0.08, 1.0))
        assert got[:4] == (want["top"], want["left"], want["height"], want["width"])
    assert not any(sample_crop_box(50, 50, gen(s), flip_p=0.0).flip for s in range(20))


# ---------------------------------------------------------------- weights


def test_normalize_weights_min_max_plus_eps():
    w = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]], dtype=torch.float16)
    out = normalize_weights(w, eps=1e-3)
    assert out.shape == (2, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor([0.0, 0.5, 0.25, 1.0]) + 1e-3)
    assert torch.allclose(out[1], torch.full((4,), 1e-3))  # constant map: uniform weights
    assert torch.isnan(normalize_weights(torch.full((1, 3), math.nan))).all()


def test_whole_image_weights_min_max_the_whole_map_before_any_crop():
    maps = torch.tensor([[[0.2, 0.5], [0.3, 1.0]], [[0.1, 0.4], [0.2, 0.3]]])
    out = whole_image_weights(maps)
    assert out.shape == (2, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.375], [0.125, 1.0]]))
    assert torch.allclose(out[1], torch.tensor([[0.0, 1.0], [1 / 3, 2 / 3]]))
    assert torch.equal(whole_image_weights(maps, minmax=False), maps)  # minmax_mean maps
    assert (whole_image_weights(torch.full((1, 3, 3), 7.0)) == 0).all()  # constant: uniform
    assert torch.isnan(whole_image_weights(torch.full((1, 2, 2), math.nan))).all()


def test_crops_are_bicubic_like_mae_and_bilinear_on_request():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 90, 120), dtype=np.uint8))
    box = CropBox(5, 7, 60, 80, False)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for name, mode in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        expected = np.asarray(pil.crop((7, 5, 87, 65)).resize((40, 40), mode), np.int32)
        got = crop_image(image, box, 40, interpolation=name).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(np.int32) - expected).max() <= 1  # PIL's (MAE's) resampling
    bicubic, bilinear = crop_image(image, box, 40), crop_image(image, box, 40, "bilinear")
    assert not torch.equal(bicubic, bilinear)  # the default is bicubic (MAE: interpolation=3)
    with pytest.raises(CropError, match="interpolation must be one of bicubic, bilinear"):
        crop_image(image, box, 40, interpolation="nearest")


def test_maps_in_float16_and_several_image_sizes_in_one_batch():
    hws = [(192, 192), (100, 300), (300, 100)]
    boxes = [sample_crop_box(*hw, gen(i)) for i, hw in enumerate(hws)]
    maps = torch.stack([box_map((10, 20, 90, 80), hw) for hw in hws])
    one_by_one = torch.cat(
        [crop_maps(maps[i : i + 1], [boxes[i]], [hws[i]], GRID) for i in range(3)]
    )
    together = crop_maps(maps.half(), boxes, hws, GRID)
    assert together.dtype == torch.float32
    assert torch.allclose(together, one_by_one, atol=2e-3)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sample_crop_box(0, 10, gen(0)), "height"),
        (lambda: sample_crop_box(10, 10, gen(0), scale=(0.5, 0.2)), "scale"),
        (lambda: sample_crop_box(10, 10, gen(0), scale=(0.0, 1.0)), "scale"),
        (lambda: sample_crop_box(10, 10, gen(0), ratio=(2.0, 1.0)), "ratio"),
        (lambda: sample_crop_box(10, 10, gen(0), flip_p=1.5), "flip_p"),
        (lambda: crop_image(torch.zeros(3, 10, 10), CropBox(5, 0, 6, 4, False), 8), "inside"),
        (lambda: crop_image(torch.zeros(10, 10), CropBox(0, 0, 4, 4, False), 8), r"\[C, H, W\]"),
        (lambda: crop_image(torch.zeros(3, 10, 10), CropBox(0, 0, 4, 4, False), 0), "size"),
        (lambda: crop_maps(torch.zeros(2, 4, 4), [CropBox(0, 0, 4, 4, False)], [(8, 8)], 4), "one box"),
        (lambda: crop_maps(torch.zeros(1, 4, 5), [CropBox(0, 0, 4, 4, False)], [(8, 8)], 4), r"\[B, G, G\]"),
        (lambda: crop_maps(torch.zeros(1, 4, 4, dtype=torch.uint8), [CropBox(0, 0, 4, 4, False)], [(8, 8)], 4), "floating"),
        (lambda: crop_maps(torch.zeros(1, 4, 4), [CropBox(0, 6, 4, 4, False)], [(8, 8)], 4), "inside"),
        (lambda: crop_maps(torch.zeros(1, 4, 4), [CropBox(0, 0, 4, 4, False)], [(8, 8)], 0), "grid"),
        (lambda: normalize_weights(torch.zeros(5)), r"\[B, \.\.\.\]"),
    ],
)  # fmt: skip
def test_bad_crop_inputs_raise(call, match):
    with pytest.raises(CropError, match=match):
        call()
    assert issubclass(CropError, SalientError)


def test_crop_draws_of_neighbouring_ids_are_unrelated():
    """Each sample's draws are a pure function of (key, id, k), and id + 1's are not id's
    shifted by one column (a Weyl sequence in id + k would make them so)."""
    from salient.pipeline.crops import CROP_DRAWS, crop_draws

    ids = np.arange(4000)
    draws = crop_draws(7, ids, 50)
    assert draws.shape == (4000, 50) and draws.min() >= 0 and draws.max() < 1
    assert np.array_equal(crop_draws(7, ids), draws[:, :CROP_DRAWS])  # count only appends
    assert np.array_equal(crop_draws(7, ids[::-1]), draws[::-1, :CROP_DRAWS])  # per id
    assert not (draws[1:, :-1] == draws[:-1, 1:]).any()  # the old law: all equal
    bound = 4.5 / np.sqrt(draws[1:].size)  # correlations of independent uniforms
    for a, b in (
        (draws[1:, :-1], draws[:-1, 1:]),
        (draws[1:], draws[:-1]),
        (draws[:, 1:], draws[:, :-1]),
    ):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < bound
    assert not (crop_draws(8, ids, 50) == draws).any()  # another key, other draws
