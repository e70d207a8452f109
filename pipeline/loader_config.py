"""The loader's config: ``LoaderConfig`` (one rank's loader), its multi-crop views
(``MultiCrop``), and the checks it runs on itself.

Every check raises ``LoaderError`` with a message that says what to change; the masking
ratios also go through ``masking.mask_counts`` so the two agree. The two checks that other
settings share live here and in ``strategies`` once: a crop scale's (:func:`check_scale`)
and the ratio pair's (``strategies.check_ratio_sum``). Importing this module
touches no disk, GPU or Ray, and imports no torch (docs/ARCHITECTURE.md, "Start-up").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.pipeline.strategies import (
    STRATEGY_NAMES,
    check_ratio_sum,
    mask_counts,
    resolve_ratios,
)
from salient.settings import check_fields, field_name, ranged

__all__ = [
    "DECODE_ON",
    "INTERPOLATIONS",
    "LoaderConfig",
    "LoaderError",
    "MultiCrop",
    "check_scale",
]

DECODE_ON = ("auto", "worker", "device")  # where images are decoded (``LoaderConfig.decode``)


class LoaderError(SalientError):
    """A loader that cannot run: bad config, a dataset too small for the batch, no samples."""


# Resampling filters of the crops (``crops`` maps each to torchvision's and PIL's): MAE's
# RandomResizedCrop(interpolation=3), PIL bicubic; SimMIM keeps torchvision's bilinear default.
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class MultiCrop:
    """The views of one image (``LoaderConfig.views``): iBOT's ViT-S/16 multi-crop by default.

    ``masks_online``: the trainer plans the masks from its own teacher inside the step
    (AttMask's online source), so the loader plans none and reads no map. ``augment`` False
    keeps the crops' pixels as cropped (tests, benchmarks of the crops alone).
    """

    global_crops: int = field(default=2, metadata=ranged(ge=1))  # iBOT main_ibot.py
    # --global_crops_number 2
    local_crops: int = field(default=10, metadata=ranged(ge=0))  # AttMask / iBOT README
    # ViT-S/16: --local_crops_number 10
    local_size: int = field(default=96, metadata=ranged(ge=1))  # DataAugmentationiBOT:
    # RandomResizedCrop(96, ...) beside 224
    local_scale: tuple[float, float] = (0.05, 0.25)  # README: --local_crops_scale 0.05 0.25
    augment: bool = True
    masks_online: bool = False

    @property
    def views(self) -> int:
        return self.global_crops + self.local_crops


@dataclass(frozen=True)
class LoaderConfig:
    """One loader (one rank). Ratios are shares of the ``N = (S / P)²`` patches; left
    ``None`` they are the strategy's paper values with MAE (``masking.resolve_ratios``, as
    ``salient train`` resolves them: amt 0.45 / 0.40, random 0.75 / 0, …; with SimMIM give
    AMT's 0.44 / 0.26 or SimMIM's 0.6 yourself).

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
    of each worker reads ahead of its decoding (0: reads inline). ``views`` (a
    ``MultiCrop``) turns on multi-crop batches (iBOT's): global crops of ``image_size``
    at ``crop_scale``, local crops, DINO's colour augmentations, the map cropped with each
    global view and masks planned per global view (``plan_mask_flags``); it decodes in the
    workers and takes no throw ratio, mask unit or GPA target.
    """

    data: str
    store: str | None = None
    image_size: int = field(default=224, metadata=ranged(ge=1))
    patch_size: int = field(default=16, metadata=ranged(ge=1))
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    strategy: str = field(default="amt", metadata={"choices": lambda: STRATEGY_NAMES})
    mask_ratio: float | None = field(default=None, metadata=ranged(ge=0, lt=1))
    throw_ratio: float | None = field(default=None, metadata=ranged(ge=0, lt=1))
    strategy_options: dict = field(default_factory=dict)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = field(default=0.5, metadata=ranged(ge=0, le=1))
    seed: int = field(default=0, metadata=ranged(ge=0))
    num_workers: int = field(default=2, metadata=ranged(ge=0))
    rank: int = field(default=0, metadata=ranged(ge=0))
    world_size: int = field(default=1, metadata=ranged(ge=1))
    device: str = "cpu"
    decode: str = field(default="auto", metadata={"choices": lambda: DECODE_ON})
    shuffle_buffer: int = field(default=1000, metadata=ranged(ge=0))
    chunk_size: int = field(default=32, metadata=ranged(ge=1))
    prefetch: int = field(default=64, metadata=ranged(ge=0))
    epochs: int | None = field(default=None, metadata=ranged(ge=1))
    mask_unit: int | None = field(default=None, metadata=ranged(ge=1))
    interpolation: str = field(default="bicubic", metadata={"choices": lambda: INTERPOLATIONS})
    gpa_target: bool = False
    views: MultiCrop | None = None
    head_maps: int | None = field(default=None, metadata=ranged(ge=1))

    def __post_init__(self):
        if not isinstance(self.data, str | os.PathLike) or not str(self.data):
            raise LoaderError(f"the loader needs a dataset directory (got data={self.data!r})")
        check_fields(self, LoaderError, field_name)  # types, ranges, choices (with the fields)
        ratios = resolve_ratios(self.strategy, self.mask_ratio, self.throw_ratio)  # as the CLI
        object.__setattr__(self, "mask_ratio", ratios[0])
        object.__setattr__(self, "throw_ratio", ratios[1])
        _check_sizes(self)
        _check_masking(self)
        _check_crop(self)
        _check_topology(self)
        _check_views(self)

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
        if self.views is not None:  # DINO's augmentations are PIL ops in the workers
            return "worker"
        return "device" if self.device.startswith("cuda") else "worker"


def _check_sizes(c: LoaderConfig) -> None:
    if c.image_size % c.patch_size:
        raise LoaderError(
            f"image_size {c.image_size} is not a multiple of patch_size "
            f"{c.patch_size}; use e.g. {max(1, c.grid) * c.patch_size}"
        )


def _check_masking(c: LoaderConfig) -> None:
    check_ratio_sum(c.mask_ratio, c.throw_ratio, LoaderError)
    if not isinstance(c.strategy_options, dict):
        raise LoaderError(
            f"strategy_options must be a dict of plan_masks keywords "
            f"(got {type(c.strategy_options).__name__})"
        )
    if c.mask_unit is not None and (
        c.mask_unit < c.patch_size or c.mask_unit % c.patch_size or c.image_size % c.mask_unit
    ):
        raise LoaderError(
            f"mask_unit must be a multiple of patch_size {c.patch_size} that divides "
            f"image_size {c.image_size} (got {c.mask_unit!r}); SimMIM uses 32 with 16 px patches"
        )
    mask_counts((c.grid // c.unit) ** 2, c.mask_ratio, c.throw_ratio)  # masking's own checks
    if c.head_maps is not None and c.gpa_target:
        raise LoaderError(
            "gpa_target needs a gpa generation and head_maps a heads generation; "
            "turn one of them off"
        )


def check_scale(
    scale: tuple[float, float], error: type[Exception], name: str, usual: str = ""
) -> None:
    """Raises ``error`` unless ``scale`` is an area range ``(min, max)`` of a random resized
    crop, ``0 < min <= max <= 1``: the one check of a crop scale (the loader's, the crops',
    a job's flags). ``name`` spells the setting (``crop_scale``, ``--crop-scale``);
    ``usual``, when given, says what the papers use."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        hint = f"; {usual}" if usual else ""
        raise error(f"{name} must satisfy 0 < min <= max <= 1 (got {scale}){hint}")


def _check_crop(c: LoaderConfig) -> None:
    check_scale(c.crop_scale, LoaderError, "crop_scale", "MAE uses (0.2, 1.0)")
    rlo, rhi = c.crop_ratio
    if not 0 < rlo <= rhi:
        raise LoaderError(
            f"crop_ratio must satisfy 0 < min <= max (got {c.crop_ratio}); the usual is (3/4, 4/3)"
        )


def _check_topology(c: LoaderConfig) -> None:
    if not c.rank < c.world_size:
        raise LoaderError(f"rank must lie in 0..{c.world_size - 1} (got {c.rank!r})")
    if c.device != "cpu" and not c.device.startswith("cuda"):
        raise LoaderError(f"device must be 'cpu' or 'cuda[:N]' (got {c.device!r})")


def _check_views(c: LoaderConfig) -> None:
    v = c.views
    if v is None:
        return
    if not isinstance(v, MultiCrop):
        raise LoaderError(f"views must be a MultiCrop (got {type(v).__name__})")
    check_fields(v, LoaderError, lambda f: f"views.{f.name}")
    if c.head_maps is not None:
        raise LoaderError("multi-crop views carry no per-head maps; set views or head_maps")
    if v.local_size < c.patch_size or v.local_size % c.patch_size:
        raise LoaderError(
            f"views.local_size must be a multiple of patch_size {c.patch_size} "
            f"(got {v.local_size!r}); iBOT uses 96 with 16 px patches"
        )
    check_scale(v.local_scale, LoaderError, "views.local_scale", "iBOT uses (0.05, 0.25)")
    if c.throw_ratio or c.mask_unit is not None or c.gpa_target:
        raise LoaderError(
            "multi-crop views mask tokens only (iBOT): set throw_ratio 0, no mask_unit and "
            f"no gpa_target (got {c.throw_ratio}, {c.mask_unit}, {c.gpa_target})"
        )
    if c.decode == "device":
        raise LoaderError(
            "multi-crop views decode in the workers (PIL augmentations); set decode='worker'"
        )
