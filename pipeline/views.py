"""Multi-crop views (DINO, iBOT): per image G global and L local crops, DINO's colour augmentations.

A loader with ``LoaderConfig.views`` (a :class:`MultiCrop`) gives every image ``global_crops``
crops of ``image_size`` px (scale ``LoaderConfig.crop_scale``) and ``local_crops`` crops of
``local_size`` px (scale ``local_scale``), each with its own RandomResizedCrop box and flip
(``crops.crop_box_from``, torchvision's law, bicubic like iBOT's ``DataAugmentationiBOT``) and
then DINO's colour augmentations on its pixels (:func:`augment_view`). The saliency map is
cropped with each *global* view's box, exactly as the single-view loader crops it
(``crops.crop_maps``), so each global view has its own map and its own masks
(docs/ARCHITECTURE.md, "Loader", "Multi-crop views"). Augmentations touch pixels only.

Per view, ``VIEW_DRAWS`` uniforms (the crop box's ``CROP_DRAWS``, then ``AUGMENT_DRAWS``) come
from ``crops.crop_draws``: a pure function of (seed, epoch, pass, sample id), like the
single-view crop.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps

from salient.pipeline.crops import CROP_DRAWS

__all__ = [
    "AUGMENT_DRAWS",
    "FIRST_GLOBAL",
    "LOCAL",
    "OTHER_GLOBAL",
    "VIEW_DRAWS",
    "Augment",
    "augment_view",
    "view_augment",
]


@dataclass(frozen=True)
class Augment:
    """One view's colour augmentations, with DINO's probabilities (iBOT ``main_ibot.py``
    ``DataAugmentationiBOT``): ``flip_and_color_jitter`` (the flip is the crop box's), then
    Gaussian blur, then (second global view) solarisation."""

    blur_p: float
    solarize_p: float = 0.0
    jitter_p: float = 0.8  # RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    grey_p: float = 0.2  # RandomGrayscale(p=0.2)


FIRST_GLOBAL = Augment(blur_p=1.0)  # global_transfo1: utils.GaussianBlur(1.0)
# global_transfo2 ("the rest of global crops"): utils.GaussianBlur(0.1), utils.Solarization(0.2)
OTHER_GLOBAL = Augment(blur_p=0.1, solarize_p=0.2)
LOCAL = Augment(blur_p=0.5)  # local_transfo: utils.GaussianBlur(p=0.5)
JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
BLUR_RADIUS = (0.1, 2.0)  # utils.GaussianBlur(radius_min=0.1, radius_max=2.)
AUGMENT_DRAWS = 13  # jitter on, its order (4), its factors (4), grey, blur on, radius, solarise
VIEW_DRAWS = CROP_DRAWS + AUGMENT_DRAWS
_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def view_augment(view: int, global_crops: int) -> Augment:
    """The augmentations of view ``view`` (globals first, then locals)."""
    if view >= global_crops:
        return LOCAL
    return FIRST_GLOBAL if view == 0 else OTHER_GLOBAL


def augment_view(image: Image.Image, draws: Sequence[float], augment: Augment) -> Image.Image:
    """DINO's colour augmentations of one cropped view (PIL RGB), from ``AUGMENT_DRAWS``
    uniforms in [0, 1): colour jitter with probability ``jitter_p`` (torchvision's
    ``ColorJitter(0.4, 0.4, 0.2, 0.1)``: brightness and contrast in U(0.6, 1.4), saturation in
    U(0.8, 1.2), hue in U(−0.1, 0.1), in a uniformly random order), grey with ``grey_p``,
    PIL's Gaussian blur of radius U(0.1, 2) with ``blur_p``, PIL's solarisation (threshold
    128) with ``solarize_p``. The same calls as DINO's transforms, with our draws."""
    jitter, *rest = draws
    order, factors = rest[:4], rest[4:8]
    grey, blur, radius, solarize = rest[8:12]
    if jitter < augment.jitter_p:
        image = _jitter(image, order, factors)
    if grey < augment.grey_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if blur < augment.blur_p:
        low, high = BLUR_RADIUS
        image = image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * radius))
    if solarize < augment.solarize_p:
        image = ImageOps.solarize(image)
    return image


def _jitter(image: Image.Image, order: Sequence[float], factors: Sequence[float]) -> Image.Image:
    """torchvision ``ColorJitter.get_params`` from uniforms: ``randperm(4)`` as the argsort of
    four uniforms, factors ``U(1 − j, 1 + j)`` (hue ``U(−j, j)``)."""
    values = [1.0 - j + 2.0 * j * u for j, u in zip(JITTER[:3], factors[:3])]
    values.append(JITTER[3] * (2.0 * factors[3] - 1.0))
    for op in np.argsort(order, kind="stable"):
        image = _ADJUST[op](image, values[op])
    return image
