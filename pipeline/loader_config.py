"""The loader's config: ``LoaderConfig`` (one rank's loader) and the checks it runs on itself.

Every check raises ``LoaderError`` with a message that says what to change; the masking
ratios also go through ``masking.mask_counts`` so the two agree. Importing this module
touches no disk, GPU or Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.pipeline.crops import INTERPOLATIONS
from salient.pipeline.masking import STRATEGIES, mask_counts

__all__ = ["LoaderConfig", "LoaderError"]


class LoaderError(SalientError):
    """A loader that cannot run: bad config, a dataset too small for the batch, no samples."""


@dataclass(frozen=True)
class LoaderConfig:
    """One loader (one rank). Ratios are shares of the ``N = (S / P)²`` patches.

    ``strategy_options`` go to ``plan_masks`` as keywords (e.g. ``{"throw": "low"}`` for
    ``amt``). ``epochs`` sets the training progress ``epoch / epochs`` that ``gpa`` schedules
    on. ``mask_unit`` (pixels, a multiple of ``patch_size``; None = one patch) is the side of
    a mask unit: ratios count units, and each masked / thrown unit covers its patches
    (SimMIM: 32 px on a 16 px ViT). ``interpolation`` resamples image crops (``"bicubic"``,
    MAE's; ``"bilinear"``, SimMIM's). ``gpa_target`` adds ``gpa_target [B, N]`` to every
    batch: the bound generation's map (it must be of kind ``gpa``) under the crop,
    standardised per image (GPA Sec. 3.3, the target of its second loss). ``head_maps``
    (None, or the number of heads H) adds ``head_maps [B, H, g, g]`` to every batch: the bound
    generation's per-head maps (it must hold H heads: ``refresh --kind heads``), cropped
    with the image, each head rescaled to its whole-image sum over the crop (AutoMAE's
    generator input); samples without a map carry zeros and ``has_saliency`` False, and
    are counted as fallbacks. ``decode`` is
    ``"auto"`` (``"device"`` on CUDA, ``"worker"`` on CPU), ``"worker"`` or ``"device"``.
    ``shuffle_buffer`` is in samples per worker (0 or 1: no shuffle); ``chunk_size`` is how
    many samples a worker sends at a time; ``prefetch`` how many samples a background thread
    of each worker reads ahead of its decoding (0: reads inline).
    """

    data: str
    store: str | None = None
    image_size: int = 224
    patch_size: int = 16
    batch_size: int = 64
    strategy: str = "amt"
    mask_ratio: float = 0.45
    throw_ratio: float = 0.40
    strategy_options: dict = field(default_factory=dict)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0
    num_workers: int = 2
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    decode: str = "auto"
    shuffle_buffer: int = 1000
    chunk_size: int = 32
    prefetch: int = 64
    epochs: int | None = None
    mask_unit: int | None = None
    interpolation: str = "bicubic"
    gpa_target: bool = False
    head_maps: int | None = None

    def __post_init__(self):
        _check_sizes(self)
        _check_masking(self)
        _check_crop(self)
        _check_topology(self)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def unit(self) -> int:
        """Patches per side of a mask unit (1 without ``mask_unit``)."""
        return 1 if self.mask_unit is None else self.mask_unit // self.patch_size

    @property
    def decode_on(self) -> str:
        """Where images are decoded: ``"worker"`` or ``"device"``."""
        if self.decode != "auto":
            return self.decode
        return "device" if self.device.startswith("cuda") else "worker"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(c: LoaderConfig) -> None:
    if not isinstance(c.data, (str, os.PathLike)) or not str(c.data):
        raise LoaderError(f"the loader needs a dataset directory (got data={c.data!r})")
    for name in ("image_size", "patch_size", "batch_size", "chunk_size"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            raise LoaderError(f"{name} must be a positive integer (got {value!r})")
    if c.image_size % c.patch_size:
        raise LoaderError(
            f"image_size {c.image_size} is not a multiple of patch_size "
            f"{c.patch_size}; use e.g. {max(1, c.grid) * c.patch_size}"
        )
    for name in ("num_workers", "shuffle_buffer", "seed", "prefetch"):
        value = getattr(c, name)
        if not _is_int(value) or value < 0:
            raise LoaderError(f"{name} must be an integer >= 0 (got {value!r})")
    if c.epochs is not None and (not _is_int(c.epochs) or c.epochs < 1):
        raise LoaderError(f"epochs must be a positive integer or None (got {c.epochs!r})")


def _check_masking(c: LoaderConfig) -> None:
    if c.strategy not in STRATEGIES:
        raise LoaderError(
            f"unknown strategy {c.strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        )
    if not 0 <= c.mask_ratio < 1 or not 0 <= c.throw_ratio < 1:
        raise LoaderError(
            f"mask_ratio and throw_ratio must lie in [0, 1) (got {c.mask_ratio}, {c.throw_ratio})"
        )
    if c.mask_ratio + c.throw_ratio >= 1:
        raise LoaderError(
            f"mask_ratio + throw_ratio must be < 1 (got {c.mask_ratio} + "
            f"{c.throw_ratio}); lower one so some patches stay visible"
        )
    if not isinstance(c.strategy_options, dict):
        raise LoaderError(
            f"strategy_options must be a dict of plan_masks keywords "
            f"(got {type(c.strategy_options).__name__})"
        )
    if c.mask_unit is not None and (
        not _is_int(c.mask_unit)
        or c.mask_unit < c.patch_size
        or c.mask_unit % c.patch_size
        or c.image_size % c.mask_unit
    ):
        raise LoaderError(
            f"mask_unit must be a multiple of patch_size {c.patch_size} that divides "
            f"image_size {c.image_size} (got {c.mask_unit!r}); SimMIM uses 32 with 16 px patches"
        )
    mask_counts((c.grid // c.unit) ** 2, c.mask_ratio, c.throw_ratio)  # masking's own checks
    if c.head_maps is not None and (not _is_int(c.head_maps) or c.head_maps < 1):
        raise LoaderError(
            f"head_maps must be None or the teacher's number of heads (got {c.head_maps!r})"
        )
    if c.head_maps is not None and c.gpa_target:
        raise LoaderError(
            "gpa_target needs a gpa generation and head_maps a heads generation; "
            "turn one of them off"
        )


def _check_crop(c: LoaderConfig) -> None:
    (lo, hi), (rlo, rhi) = c.crop_scale, c.crop_ratio
    if not 0 < lo <= hi <= 1:
        raise LoaderError(
            f"crop_scale must satisfy 0 < min <= max <= 1 (got {c.crop_scale}); MAE uses (0.2, 1.0)"
        )
    if not 0 < rlo <= rhi:
        raise LoaderError(
            f"crop_ratio must satisfy 0 < min <= max (got {c.crop_ratio}); the usual is (3/4, 4/3)"
        )
    if not 0 <= c.flip_p <= 1:
        raise LoaderError(f"flip_p must lie in [0, 1] (got {c.flip_p})")
    if c.interpolation not in INTERPOLATIONS:
        raise LoaderError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)} (got {c.interpolation!r})"
        )


def _check_topology(c: LoaderConfig) -> None:
    if not _is_int(c.world_size) or c.world_size < 1:
        raise LoaderError(f"world_size must be a positive integer (got {c.world_size!r})")
    if not _is_int(c.rank) or not 0 <= c.rank < c.world_size:
        raise LoaderError(f"rank must lie in 0..{c.world_size - 1} (got {c.rank!r})")
    if c.device != "cpu" and not c.device.startswith("cuda"):
        raise LoaderError(f"device must be 'cpu' or 'cuda[:N]' (got {c.device!r})")
    if c.decode not in ("auto", "worker", "device"):
        raise LoaderError(f"decode must be 'auto', 'worker' or 'device' (got {c.decode!r})")
