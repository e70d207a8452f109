"""Mask strategies' names, paper ratios and patch counts, importable without torch.

What a config may choose and resolve before any mask is planned: the strategy names (a
``--strategy`` flag's choices), which of them read a saliency map, AttMask's schedule options,
each strategy's paper ratios with MAE, SimMIM and iBOT, where each normalises its map, and the
patch counts a ratio gives. ``salient.pipeline.masking`` plans the masks (torch) and re-exports
these names; keeping them here lets a parser, ``--help`` and a bad flag answer before torch
loads (docs/ARCHITECTURE.md, "Start-up").
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

from salient.errors import SalientError

__all__ = [
    "DEFAULT_RATIOS",
    "NEEDS_SALIENCY",
    "NORMALIZED_OVER",
    "SCHEDULE_OPTIONS",
    "STRATEGY_NAMES",
    "MaskCounts",
    "MaskError",
    "check_ratio_sum",
    "check_strategy",
    "default_ratios",
    "mask_counts",
    "resolve_ratios",
]


class MaskError(SalientError):
    """Bad mask-planning input: ratios, weights, progress, strategy or its options."""


class MaskCounts(NamedTuple):
    visible: int
    mask: int
    throw: int


def mask_counts(num_patches: int, mask_ratio: float, throw_ratio: float = 0.0) -> MaskCounts:
    """``(V, M, T)`` for ``N`` patches: ``M = int(N·r)``, ``T = int(N·(r+t)) − M`` (AMT's code).

    Raises MaskError unless both ratios lie in [0, 1) and their sum is below 1.
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise MaskError(f"number of patches must be a positive int (got {num_patches!r})")
    for name, ratio in (("mask_ratio", mask_ratio), ("throw_ratio", throw_ratio)):
        if not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
            raise MaskError(f"{name} must be in [0, 1) (got {ratio!r}); pass a fraction of patches")
    check_ratio_sum(mask_ratio, throw_ratio)
    masked = int(num_patches * mask_ratio)
    thrown = int(num_patches * (mask_ratio + throw_ratio)) - masked
    return MaskCounts(num_patches - masked - thrown, masked, thrown)


def check_ratio_sum(
    mask_ratio: float,
    throw_ratio: float,
    error: type[Exception] = MaskError,
    names: tuple[str, str] = ("mask_ratio", "throw_ratio"),
) -> None:
    """Raises ``error`` unless ``mask_ratio + throw_ratio < 1``, so that some patches stay
    visible: the one check of the pair, which each config runs with its own error and its
    own spelling of the two (``names``: a job's flags, ``("--mask-ratio", "--throw-ratio")``).
    Each ratio's own range is its field's (``salient.settings.ranged``)."""
    if mask_ratio + throw_ratio >= 1.0:
        raise error(
            f"{names[0]} + {names[1]} must be < 1 (got {mask_ratio} + {throw_ratio}); "
            "lower one so that some patches stay visible"
        )


# The strategies ``masking.STRATEGIES`` implements, in its order (README, "Mask strategies").
STRATEGY_NAMES = ("random", "block", "amt", "attmask_high", "attmask_low", "attmask_hint", "gpa")
NEEDS_SALIENCY = frozenset(STRATEGY_NAMES) - {"random", "block"}
SCHEDULE_OPTIONS = ("mask_prob", "ratio_var")  # AttMask's masking_prob, pred_ratio_var

# Each strategy's paper ratios (mask_ratio, throw_ratio) with MAE; SimMIM's where they differ.
DEFAULT_RATIOS: dict[str, tuple[float, float]] = {
    "random": (0.75, 0.0),  # MAE Sec. 4 / Fig. 5: 75 % masked
    "block": (0.4, 0.0),  # BEiT: blockwise masking of at most 40 % (its code: 75 of 196 patches)
    "amt": (0.45, 0.40),  # AMT Sec. 4.1 "Implementation Details": r = 0.45, t = 0.4 with MAE
    # AttMask's code: pred_ratio 0.3 (with pred_ratio_var 0.2: "10-50" of its Table 1)
    "attmask_high": (0.3, 0.0),
    "attmask_low": (0.3, 0.0),
    "attmask_hint": (0.3, 0.0),
    "gpa": (0.75, 0.0),  # GPA Sec. 4.1: overall masking ratio alpha = 0.75, nothing thrown
}
_SIMMIM_RATIOS: dict[str, tuple[float, float]] = {
    # SimMIM's ViT-B config MASK_RATIO 0.6 (AMT Table 1: "SimMIM+Random M 60")
    "random": (0.6, 0.0),
    "amt": (0.44, 0.26),  # AMT Sec. 4.1: r = 0.44, t = 0.26 with SimMIM (its Table 2)
}
# iBOT masks 0.3 (± pred_ratio_var) of the tokens whatever the shape, and throws nothing:
# iBOT main_ibot.py / AttMask main_attmask.py --pred_ratio 0.3, every --pred_shape
_IBOT_RATIOS = (0.3, 0.0)

# Where each strategy's map is min-max normalised to [0, 1] (README, "Decisions"): "image" =
# the whole image's map, then cropped (AMT Sec. 3.2: "we normalize it to [0, 1] ... When the
# image is cropped ... the corresponding area in the attention map is also cropped"; Alg. 1
# P_A = Normalize(a_w)); "crop" = the crop's own map, as the teachers of AttMask and GPA see
# the augmented crop (GPA's code min-max normalises the crop's map). AttMask only ranks, so
# either order gives the same plan.
NORMALIZED_OVER: dict[str, str] = {
    "amt": "image",
    "attmask_high": "crop",
    "attmask_low": "crop",
    "attmask_hint": "crop",
    "gpa": "crop",
}


def check_strategy(name: str) -> None:
    """Raises MaskError unless ``name`` is a strategy."""
    if name not in STRATEGY_NAMES:
        raise MaskError(
            f"unknown mask strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}"
        )


def default_ratios(strategy: str, framework: str = "mae") -> tuple[float, float]:
    """``(mask_ratio, throw_ratio)`` of ``strategy``'s paper with ``framework`` (``"mae"``,
    ``"simmim"`` or ``"ibot"``): see :data:`DEFAULT_RATIOS`. Raises MaskError for an unknown
    strategy."""
    check_strategy(strategy)
    if framework == "simmim" and strategy in _SIMMIM_RATIOS:
        return _SIMMIM_RATIOS[strategy]
    if framework == "ibot":
        return _IBOT_RATIOS
    return DEFAULT_RATIOS[strategy]


def resolve_ratios(
    strategy: str, mask_ratio: float | None, throw_ratio: float | None, framework: str = "mae"
) -> tuple[float, float]:
    """``(mask_ratio, throw_ratio)`` as given, each one left ``None`` replaced by
    ``strategy``'s paper value with ``framework`` (:func:`default_ratios`): the one rule of
    ``salient train``'s config and of the library's ``LoaderConfig``."""
    mask, throw = default_ratios(strategy, framework)
    return (
        mask if mask_ratio is None else mask_ratio,
        throw if throw_ratio is None else throw_ratio,
    )
