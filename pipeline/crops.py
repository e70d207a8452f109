"""Joint crops: one RandomResizedCrop box and flip, applied to the image and its map alike.

A saliency map ``[G, G]`` covers the whole image linearly (the teacher saw the image
squashed to S×S): map cell ``(u, v)`` is the image region ``[u·W/G, (u+1)·W/G) ×
[v·H/G, (v+1)·H/G)``. A crop box in image pixels is therefore the map region
``[left·G/W, (left+width)·G/W) × [top·G/H, (top+height)·G/H)``, which RoIAlign resamples
onto the output patch grid: each output patch is the mean of bilinear samples of the map
spread evenly over the patch (area-averaged), and the result is flipped with the image.
This is the step AMT's official code gets wrong (it slices the map with pixel indices
divided by the image size, so it always reads the top-left cells; docs/ARCHITECTURE.md, "Loader").

Images are resampled bicubic by default, as MAE's ``RandomResizedCrop(..., interpolation=3)``
(SimMIM keeps torchvision's bilinear default): ``loader_config.INTERPOLATIONS``. Sampling
weights are normalised where each strategy's paper does it (``masking.NORMALIZED_OVER``):
:func:`whole_image_weights` before the crop (AMT), :func:`normalize_weights` after it.

Everything here runs on CPU and CUDA tensors with the same code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

from salient.errors import SalientError
from salient.pipeline.loader_config import INTERPOLATIONS, check_scale

__all__ = [
    "CROP_DRAWS",
    "CropBox",
    "CropError",
    "crop_box_from",
    "crop_draws",
    "crop_head_maps",
    "crop_image",
    "crop_maps",
    "crop_pil",
    "normalize_weights",
    "sample_crop_box",
    "whole_image_weights",
]

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback
# Each resampling filter (``loader_config.INTERPOLATIONS``) as torchvision's mode (GPU crops) and
# as PIL's filter (the CPU workers' crops).
_MODES = {name: InterpolationMode[name.upper()] for name in INTERPOLATIONS}
_PIL_FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}
CROP_DRAWS = 4 * _ATTEMPTS + 1  # uniforms one box and its flip consume


class CropError(SalientError):
    """Bad crop input: sizes, scale / ratio ranges, boxes outside the image, shapes."""


class CropBox(NamedTuple):
    """A crop in image pixels, and whether the crop is flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> CropBox:
    """A RandomResizedCrop box (torchvision's law) and a flip, drawn from ``generator``.

    All random numbers come from one draw of ``generator``; see :func:`crop_box_from`.
    Raises CropError for a bad size, range or flip probability.
    """
    draws = torch.rand(CROP_DRAWS, generator=generator, device=generator.device).tolist()
    return crop_box_from(draws, height, width, scale, ratio, flip_p)


def crop_box_from(
    draws: Sequence[float],
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> CropBox:
    """The RandomResizedCrop box and flip that ``CROP_DRAWS`` uniforms in [0, 1) give.

    Up to 10 tries of area ``U(scale)·H·W`` and aspect ``exp(U(log ratio))``; a box that fits
    gets a uniform position, else the central crop clipped to ``ratio`` (torchvision's
    ``get_params``); the last uniform decides the flip.
    """
    _check_box_law(height, width, scale, ratio, flip_p)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = draws[4 * attempt : 4 * attempt + 4]
        area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = round(math.sqrt(area * aspect))
        h = round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            return CropBox(top, left, h, w, draws[-1] < flip_p)
    h, w = _central_fallback(height, width, ratio)
    return CropBox((height - h) // 2, (width - w) // 2, h, w, draws[-1] < flip_p)


def crop_draws(key: int, ids: np.ndarray, count: int = CROP_DRAWS) -> np.ndarray:
    """``[n, count]`` uniforms in [0, 1) for sample ids ``ids`` under ``key``, each a pure
    function of ``(key, id, k)``: a whole chunk's boxes in one NumPy call, the same for a
    sample whichever rank or worker draws it. SplitMix64: each id's state is the finaliser of
    ``id·φ + key``, and its k-th draw the finaliser of ``state + k·φ`` (hashing the id first
    keeps neighbouring ids' draws unrelated; ``(id + k)·φ`` would make id + 1's draws id's,
    shifted by one). Hand-written because torch and NumPy generators cost ~10 µs each to
    seed, per sample."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        state = _splitmix(np.asarray(ids, dtype=np.uint64) * golden + np.uint64(key & (2**64 - 1)))
        x = _splitmix(state[:, None] + np.arange(1, count + 1, dtype=np.uint64) * golden)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 bits: [0, 1)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _central_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def crop_image(image: Tensor, box: CropBox, size: int, interpolation: str = "bicubic") -> Tensor:
    """``image [C, H, W]`` cropped to ``box``, resized to ``[C, size, size]``, flipped per box.

    ``interpolation``: ``"bicubic"`` (MAE's crops; within one grey level of PIL's bicubic)
    or ``"bilinear"``, with antialiasing (torchvision's ``resized_crop``); uint8 stays uint8.
    Raises CropError when the box leaves the image, ``size`` is not a positive int or the
    interpolation is unknown.
    """
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise CropError(f"image must be a [C, H, W] tensor (got {_shape(image)})")
    _check_size(size, "size")
    _check_inside(box, tuple(image.shape[-2:]))
    _check_interpolation(interpolation)
    out = TF.resized_crop(
        image,
        box.top,
        box.left,
        box.height,
        box.width,
        [size, size],
        interpolation=_MODES[interpolation],
        antialias=True,
    )
    return TF.hflip(out) if box.flip else out


def crop_pil(
    image: Image.Image, box: CropBox, size: int, interpolation: str = "bicubic"
) -> Image.Image:
    """The CPU workers' crop: PIL ``image`` cropped to ``box``, resized to ``size × size`` and
    flipped per box, all in PIL (one resampling pass over the box, antialiased, which
    torchvision's ``antialias=True`` reproduces up to rounding; ``interpolation`` as in
    :func:`crop_image`). Per-sample torch ops would pay torch's per-op overhead and its
    intra-op threads; PIL pays neither."""
    _check_size(size, "size")
    _check_inside(box, (image.height, image.width))
    _check_interpolation(interpolation)
    region = (box.left, box.top, box.left + box.width, box.top + box.height)
    out = image.resize((size, size), _PIL_FILTERS[interpolation], box=region)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if box.flip else out


def crop_maps(
    maps: Tensor,
    boxes: Sequence[CropBox],
    image_hw: Sequence[tuple[int, int]],
    grid: int,
) -> Tensor:
    """The map region under each crop box, resampled to ``[B, grid, grid]`` and flipped.

    maps: ``[B, G, G]`` covering the whole image ``image_hw[b]`` each (any float dtype; the
    result is float32 on the maps' device), or ``[B, C, G, G]`` (per-head maps): every
    channel is cropped with its sample's box, the same law, in the same call
    (``[B, C, grid, grid]``). One batched RoIAlign (``aligned=True``): each
    output patch averages ``s×s`` bilinear samples of the map spread over the patch, with
    ``s`` large enough for at least 2 samples per map cell. NaN rows stay NaN.
    Raises CropError for mismatched lengths, a non-square map or a box outside its image.
    """
    cells = _check_maps(maps, boxes, image_hw)
    _check_size(grid, "grid")
    rois = []
    for b, (box, (height, width)) in enumerate(zip(boxes, image_hw)):
        _check_inside(box, (height, width))
        sx, sy = cells / width, cells / height  # map cells per image pixel
        x0, y0 = box.left * sx, box.top * sy
        rois.append((b, x0, y0, x0 + box.width * sx, y0 + box.height * sy))
    rois_t = torch.tensor(rois, dtype=torch.float32, device=maps.device)  # [B, 5]
    bin_cells = max(max(r[3] - r[1], r[4] - r[2]) for r in rois) / grid  # widest patch, cells
    channels = maps.float() if maps.ndim == 4 else maps.float().unsqueeze(1)  # [B, C, G, G]
    out = roi_align(
        channels,
        rois_t,
        output_size=grid,
        spatial_scale=1.0,
        sampling_ratio=max(2, 2 * math.ceil(bin_cells)),
        aligned=True,  # pixel (cell) i spans [i, i + 1): no half-cell shift
    )  # [B, C, grid, grid]
    flip = torch.tensor([box.flip for box in boxes], device=maps.device)
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out if maps.ndim == 4 else out[:, 0]


def crop_head_maps(
    head_maps: Tensor,
    boxes: Sequence[CropBox],
    image_hw: Sequence[tuple[int, int]],
    grid: int,
) -> Tensor:
    """Per-head CLS-attention maps ``[B, H, G, G]`` under each crop box: ``[B, H, grid, grid]``
    float32, each head rescaled so its crop sums to what it summed over the whole image.

    Every head is cropped exactly as a single map (:func:`crop_maps`, one call); the rescale
    keeps each head a softmax row over the view's patches, as the teacher's attention on the
    crop itself is (AutoMAE feeds its mask generator the raw attention rows of the augmented
    image; README, "Decisions", "AutoMAE's maps from the store"). A head whose crop sums to
    zero stays zero; NaN rows stay NaN.
    """
    cropped = crop_maps(head_maps, boxes, image_hw, grid)  # [B, H, grid, grid]
    whole = head_maps.float().sum((-2, -1), keepdim=True)  # [B, H, 1, 1]
    part = cropped.sum((-2, -1), keepdim=True)
    scale = torch.where(part > 0, whole / part.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return cropped * scale


def normalize_weights(w: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image min-max to [0, 1] plus ``eps`` (AMT): ``[B, ...] -> [B, N]`` float32.

    A constant row becomes ``eps`` everywhere (uniform weights); NaN rows stay NaN.
    """
    if not isinstance(w, Tensor) or w.ndim < 2:
        raise CropError(f"weights must be a [B, ...] tensor (got {_shape(w)})")
    w = w.flatten(1).float()  # [B, N]
    low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    return (w - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny) + eps


def whole_image_weights(maps: Tensor, minmax: bool = True) -> Tensor:
    """Whole-image sampling maps, before any crop: ``[B, G, G] -> [B, G, G]`` float32.

    ``minmax``: each map min-max normalised to [0, 1] over the whole image (AMT Sec. 3.2 and
    Alg. 1: ``P_A = Normalize(a_w)``, then cropped). ``minmax=False`` keeps maps that are
    already AMT's [0, 1] weights (a ``minmax_mean`` generation: each head min-max normalised,
    then averaged, as AMT's code). A constant map becomes zeros; NaN maps stay NaN. Cropping
    is linear, so min-max after this is the same as min-max of the raw crop.
    """
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        raise CropError(f"maps must be a [B, G, G] tensor (got {_shape(maps)})")
    maps = maps.float()
    if not minmax:
        return maps
    return normalize_weights(maps, eps=0.0).view(maps.shape)


# ---------------------------------------------------------------- checks


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_size(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CropError(f"{name} must be a positive int (got {value!r})")


def _check_box_law(height, width, scale, ratio, flip_p) -> None:
    _check_size(height, "height")
    _check_size(width, "width")
    check_scale(scale, CropError, "scale")
    if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
        raise CropError(f"ratio must be (low, high) with 0 < low <= high (got {ratio!r})")
    if not 0.0 <= flip_p <= 1.0:
        raise CropError(f"flip_p must be a probability in [0, 1] (got {flip_p!r})")


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise CropError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)} (got {interpolation!r})"
        )


def _check_inside(box: CropBox, image_hw: tuple[int, int]) -> None:
    height, width = image_hw
    if not (
        box.top >= 0
        and box.left >= 0
        and box.height >= 1
        and box.width >= 1
        and box.top + box.height <= height
        and box.left + box.width <= width
    ):
        raise CropError(f"crop box {tuple(box)} does not lie inside the {height}x{width} image")


def _check_maps(maps, boxes, image_hw) -> int:
    """The map side G; raises CropError unless maps is ``[B, G, G]`` or ``[B, C, G, G]`` with
    B boxes and sizes."""
    if not isinstance(maps, Tensor) or maps.ndim not in (3, 4) or maps.shape[-1] != maps.shape[-2]:
        raise CropError(f"maps must be a [B, G, G] or [B, C, G, G] tensor (got {_shape(maps)})")
    if not maps.is_floating_point():
        raise CropError(f"maps must be floating point (got {maps.dtype})")
    if not len(boxes) == len(image_hw) == maps.shape[0]:
        raise CropError(
            f"got {maps.shape[0]} maps, {len(boxes)} boxes and {len(image_hw)} image sizes; "
            "pass one box and one (H, W) per map"
        )
    if maps.shape[0] == 0:
        raise CropError("crop_maps needs at least one map")
    return maps.shape[-1]
