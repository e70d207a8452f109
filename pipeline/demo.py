"""The bundled demo dataset: scenes composed from photos that ship inside scikit-image.

Each scene pastes one object photo (astronaut, chelsea, coffee, …) at a random position,
scale and flip, with a mild colour jitter, onto a texture background (brick, grass,
gravel, …). The object's box is known exactly, so saliency quality can be measured: how
much of a teacher's saliency mass falls inside the box (docs/ARCHITECTURE.md, "Data model").

Nothing is downloaded: only ``skimage.data`` images that are part of the wheel are used.
A scene is a pure function of ``(seed, index, image_size, split, variant)``. The ``val`` split
draws from another random stream than ``train`` (the seed sequence gains a split word), so a
held-out set has the same classes and never a training scene, whatever ``n`` each split has.

Variants (``DEMO_VARIANTS``): ``plain`` keeps each photo's own colours, so colour statistics
alone nearly name the class (a random-initialised ViT's features already separate them);
``colour-random`` recolours the object of every scene at random — its hue rotated, or made
grey, or grey under a strong tint, then its tones remapped (a random gamma and black and white
levels) — so what tells the classes apart is the object's shape and texture. Its draws come
after every draw of ``plain``, so a scene of either variant has the same background, object,
box and label; only the object's colours and tones differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

__all__ = [
    "DEMO_BACKGROUNDS",
    "DEMO_OBJECTS",
    "DEMO_SPLITS",
    "DEMO_VARIANTS",
    "DemoScene",
    "make_scene",
]

# Class names in label order. Each maps to a skimage.data loader; all ship in the wheel.
DEMO_OBJECTS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "clock", "colorwheel")
DEMO_BACKGROUNDS = ("brick", "grass", "gravel", "moon")
_LOADER = {"motorcycle": "stereo_motorcycle"}
# Split -> extra word of the seed sequence; train has none, so its scenes are those of before.
DEMO_SPLITS = {"train": (), "val": (1,)}
DEMO_VARIANTS = ("plain", "colour-random")
_SOURCE_MAX_SIDE = 384  # sources are downscaled once; scenes are at most a few hundred px


@dataclass(frozen=True)
class DemoScene:
    """One composed scene: RGB image, object box (x0, y0, x1, y1) in pixels, label, name."""

    image: Image.Image
    box: tuple[int, int, int, int]
    label: int
    name: str


@functools.cache
def _source(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, _LOADER.get(name, name))()
    if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
        array = array[0]
    image = Image.fromarray(np.asarray(array))
    image = image.convert("RGB") if image.mode != "L" else image
    image.thumbnail((_SOURCE_MAX_SIDE, _SOURCE_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    texture = _source(DEMO_BACKGROUNDS[rng.integers(len(DEMO_BACKGROUNDS))])
    side = int(rng.integers(min(texture.size) // 2, min(texture.size) + 1))
    x0 = int(rng.integers(0, texture.width - side + 1))
    y0 = int(rng.integers(0, texture.height - side + 1))
    gray = texture.crop((x0, y0, x0 + side, y0 + side)).resize((size, size))
    tint = rng.uniform(0.6, 1.0, size=3)  # a mild colour cast so backgrounds are not grey
    rgb = np.asarray(gray, dtype=np.float32)[..., None] * tint
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.85, 1.15)))
    return image


def _recolour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The object under a random change of its colours and tones: one of hue rotation (the
    HSV hue shifted by a uniform share of the circle), grey, or grey under a strong tint; then
    its tones remapped by a gamma in [0.5, 2] (log-uniform) and black and white levels drawn
    from [0, 0.3] and [0.7, 1] — monotonic, so every edge and shape stays where it was."""
    mode, shift, tint = int(rng.integers(3)), int(rng.integers(256)), rng.uniform(0.3, 1.0, 3)
    gamma = float(np.exp(rng.uniform(-np.log(2), np.log(2))))  # log-uniform in [0.5, 2]
    black, white = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
    if mode == 0:
        hue, saturation, value = image.convert("HSV").split()
        hue = hue.point(lambda h: (h + shift) % 256)
        rgb = np.asarray(Image.merge("HSV", (hue, saturation, value)).convert("RGB"), np.float32)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None]  # [h, w, 1]
        rgb = grey * (tint / tint.max() if mode == 2 else np.ones(3))  # the brightest channel kept
    tones = black + (white - black) * (rgb / 255) ** gamma
    return Image.fromarray((tones * 255).clip(0, 255).astype(np.uint8), "RGB")


def make_scene(
    seed: int, index: int, image_size: int = 192, split: str = "train", variant: str = "plain"
) -> DemoScene:
    """Compose scene ``index`` of the demo set's ``split`` for ``seed``; deterministic.

    The object covers 30–65 % of the image side, lies fully inside the image, and is
    flipped horizontally with probability 1/2; ``variant="colour-random"`` recolours it.
    Raises ValueError for an unknown split or variant.
    """
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; use one of {', '.join(DEMO_SPLITS)}")
    if variant not in DEMO_VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; use one of {', '.join(DEMO_VARIANTS)}")
    rng = np.random.default_rng([seed, index, *DEMO_SPLITS[split]])
    label = int(rng.integers(len(DEMO_OBJECTS)))
    canvas = _background(rng, image_size)
    obj = _source(DEMO_OBJECTS[label]).convert("RGB")
    longest = rng.uniform(0.30, 0.65) * image_size
    scale = longest / max(obj.size)
    w, h = max(1, round(obj.width * scale)), max(1, round(obj.height * scale))
    obj = _jitter(obj.resize((w, h), Image.Resampling.BILINEAR), rng)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x0 = int(rng.integers(0, image_size - w + 1))
    y0 = int(rng.integers(0, image_size - h + 1))
    if variant == "colour-random":  # drawn last: the scene is plain's but for these colours
        obj = _recolour(obj, rng)
    canvas.paste(obj, (x0, y0))
    return DemoScene(canvas, (x0, y0, x0 + w, y0 + h), label, DEMO_OBJECTS[label])
