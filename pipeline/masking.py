"""Mask strategies: which patches are masked, thrown or visible, from patch weights.

Contract (the rules of each strategy, their sources and the sampling law:
docs/ARCHITECTURE.md, "Mask strategies"):

- A strategy in :data:`STRATEGIES` is a pure function ``(weights [B, N], counts, *,
  generator, progress, **options) -> MaskPlan``; call it through :func:`plan_masks`, which
  checks the inputs (negative or non-finite weights raise :class:`MaskError`, zero rows
  become uniform), applies AttMask's schedule options and mask units, and dispatches.
- A :class:`MaskPlan`'s ``visible_idx``, ``mask_idx`` and ``throw_idx`` partition
  ``0..N−1`` with counts fixed per batch (:func:`mask_counts`: ``M = int(N·r)``,
  ``T = int(N·(r+t)) − M``); within a set, indices come in the strategy's order.
- The same weights, generator state and options give the same plan. ``random`` and
  ``block`` read only the weights' shape and device.
- :data:`DEFAULT_RATIOS` holds each strategy's paper ratios, :data:`NORMALIZED_OVER`
  whether its map is normalised over the whole image or over the crop. They, the names and
  :func:`mask_counts` are defined without torch in ``salient.pipeline.strategies`` and
  re-exported here.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from salient.pipeline.sampling import (
    column_order,
    first_rectangle,
    host_column_order,
    host_random_bits,
    race_values,
    random_keys,
    random_order,
    smallest,
    uniform,
    unit_uniform,
    weight_keys,
    weighted_order,
)
from salient.pipeline.strategies import (
    DEFAULT_RATIOS,
    NEEDS_SALIENCY,
    NORMALIZED_OVER,
    SCHEDULE_OPTIONS,
    STRATEGY_NAMES,
    MaskCounts,
    MaskError,
    check_strategy,
    default_ratios,
    mask_counts,
    resolve_ratios,
)

__all__ = [
    "DEFAULT_RATIOS",
    "NEEDS_SALIENCY",
    "NORMALIZED_OVER",
    "SCHEDULE_OPTIONS",
    "STRATEGIES",
    "THROW_MODES",
    "MaskCounts",
    "MaskError",
    "MaskPlan",
    "check_options",
    "default_ratios",
    "mask_counts",
    "plan_mask_flags",
    "plan_masks",
    "resolve_ratios",
]

THROW_MODES = ("middle", "low", "random")
_MAX_CANDIDATES = 30  # block: one bit per rectangle in an int32, sign bit left alone


class MaskPlan(NamedTuple):
    """Patch indices of one batch; the three sets partition ``0..N-1`` per row."""

    visible_idx: Tensor  # [B, V] int64
    mask_idx: Tensor  # [B, M] int64
    throw_idx: Tensor  # [B, T] int64


# ---------------------------------------------------------------- shared steps


def _split(order: Tensor, counts: MaskCounts) -> MaskPlan:
    """Cut a row-wise order into masked (first M), thrown (next T) and visible (rest)."""
    _, masked, thrown = counts
    return MaskPlan(
        visible_idx=order[:, masked + thrown :].contiguous(),
        mask_idx=order[:, :masked].contiguous(),
        throw_idx=order[:, masked : masked + thrown].contiguous(),
    )


def _split_throw_random(order: Tensor, counts: MaskCounts, generator, keep_last: int = 0):
    """Masked = first M of ``order``; T thrown uniformly among the rest but its last
    ``keep_last``."""
    _, masked, thrown = counts
    if not thrown:
        return _split(order, counts)
    rest = order[:, masked : order.shape[1] - keep_last]  # [B, L]
    rest = rest.gather(1, random_order(rest.shape, generator, order.device))  # shuffled
    return MaskPlan(
        visible_idx=torch.cat([rest[:, thrown:], order[:, order.shape[1] - keep_last :]], dim=1),
        mask_idx=order[:, :masked].contiguous(),
        throw_idx=rest[:, :thrown].contiguous(),
    )


def _share(alpha: float, count: int) -> int:
    return int(alpha * count + 1e-9)  # floor, robust to 0.3 * 10 == 2.9999999999999996


# ---------------------------------------------------------------- strategies


def random_masking(weights: Tensor, counts: MaskCounts, *, generator, progress) -> MaskPlan:
    """MAE: a uniform random permutation per image; first M masked, next T thrown."""
    return _split(random_order(weights.shape, generator, weights.device), counts)


def block_masking(
    weights: Tensor,
    counts: MaskCounts,
    *,
    generator,
    progress,
    min_patches: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    grid: tuple[int, int] | None = None,
    candidates: int = 16,
) -> MaskPlan:
    """BEiT's block-wise masking, vectorised over the batch, to exactly M masked patches.

    ``min_patches`` None: the smallest block follows the grid, ``(min(rows, cols) // 3)²``
    (iBOT's ``loader.py`` ImageFolderMask); that is BEiT's fixed 16 on a 14 × 14 grid.

    Block masks never read the weights: the order is index work on a few numbers per image,
    done with NumPy on the host from one draw of the generator (on its own device), then
    moved to the weights' device for the shared split and throw.
    """
    height, width = _block_grid(weights.shape[1], grid)
    if min_patches is None:
        min_patches = max((min(height, width) // 3) ** 2, 1)  # iBOT loader.py: low
    _check_block_options(min_patches, aspect, candidates)
    (batch, n), masked = weights.shape, counts.mask
    low, k4 = min(min_patches, max(masked, 1)), 4 * candidates
    bits = host_random_bits((batch, k4 + n), generator)  # [B, 4K + N]
    r = unit_uniform(bits[:, :k4]).astype(np.float32)  # uniform in (0, 1)
    r = r.reshape(batch, 4, candidates).transpose(1, 0, 2)  # [4, B, K] area, aspect, top, left
    first = first_rectangle(r, low, max(masked, low), aspect, height, width)  # [B, N]
    uncovered = np.maximum(first - (candidates - 1), 0)  # [B, N] 1 where no rectangle does
    # Rectangle by rectangle, raster order inside (ties keep column order), then uniform:
    # K + 1 + 22 random bits (a tie among the fill keeps column order).
    order = host_column_order(first + uncovered * ((bits[:, k4:] >> 1) + 1))  # [B, N]
    order = torch.from_numpy(order).to(weights.device, torch.int64)
    return _split_throw_random(order, counts, generator)


def amt_masking(
    weights: Tensor, counts: MaskCounts, *, generator, progress, throw: str = "middle"
) -> MaskPlan:
    """AMT Alg. 1: mask the first M of a weighted draw order; throw per ``throw``."""
    if throw not in THROW_MODES:
        raise MaskError(f"amt throw must be one of {', '.join(THROW_MODES)} (got {throw!r})")
    order = weighted_order(weights, generator)  # [B, N]
    _, masked, thrown = counts
    if throw == "low" and thrown:  # AMT Table 4: throw the least attended (last drawn)
        n = order.shape[1]
        order = torch.cat(
            [order[:, :masked], order[:, n - thrown :], order[:, masked : n - thrown]], 1
        )
    elif throw == "random":
        return _split_throw_random(order, counts, generator)
    return _split(order, counts)


def attmask_high(weights: Tensor, counts: MaskCounts, *, generator, progress) -> MaskPlan:
    """AttMask-High: mask the M most attended patches."""
    order = column_order(weight_keys(weights, descending=True))  # [B, N] highest first
    return _split_throw_random(order, counts, generator)


def attmask_low(weights: Tensor, counts: MaskCounts, *, generator, progress) -> MaskPlan:
    """AttMask-Low: mask the M least attended patches."""
    return _split_throw_random(column_order(weight_keys(weights)), counts, generator)


def attmask_hint(
    weights: Tensor,
    counts: MaskCounts,
    *,
    generator,
    progress,
    hint: float | None = None,
    hint_pool: float = 0.10,
) -> MaskPlan:
    """AttMask-Hint: mask the top M, then reveal H of them drawn among the most attended,
    so ``M − H`` stay masked (AttMask's ``attmask.py``: ``get_mask`` then ``show_hints``).

    ``hint`` None: ``hint_pool × r`` (AttMask's ``show_max · pred_ratio``); ``plan_masks``
    passes ``hint_pool × r′`` (:func:`_default_hint`), a direct call uses ``r = M / N``.
    """
    batch, n = weights.shape
    if hint is None:
        hint = hint_pool * counts.mask / n
    hints, pool = _hint_counts(n, counts, hint, hint_pool)
    order = column_order(weight_keys(weights, descending=True))  # [B, N] most attended first
    if not hints:
        return _split_throw_random(order, counts, generator)
    chosen = random_order((batch, pool), generator, weights.device)[:, :hints]
    revealed = torch.zeros((batch, pool), dtype=torch.int64, device=weights.device)
    revealed.scatter_(1, chosen, 1)  # [B, pool] over the first positions of `order`
    top = order[:, :pool].gather(1, column_order(revealed))  # kept, then revealed, by rank
    # The revealed hints go last: always visible. The first M − H are the masked.
    order = torch.cat([top[:, : pool - hints], order[:, pool:], top[:, pool - hints :]], dim=1)
    shown = MaskCounts(counts.visible + hints, counts.mask - hints, counts.throw)
    return _split_throw_random(order, shown, generator, keep_last=hints)


def gpa_masking(
    weights: Tensor,
    counts: MaskCounts,
    *,
    generator,
    progress,
    hard: tuple[float, float] = (0.0, 0.5),
    soft: tuple[float, float] = (0.5, 0.0),
) -> MaskPlan:
    """GPA eq. 6: soft-to-hard masking; ``hard``/``soft`` = (share at p=0, share at p=1)."""
    _check_gpa_shares(hard, soft)
    alpha_hard = hard[0] + progress * (hard[1] - hard[0])
    alpha_soft = soft[0] + progress * (soft[1] - soft[0])
    n_hard, n_soft = _share(alpha_hard, counts.mask), _share(alpha_soft, counts.mask)
    ranked = []  # (values, count), ascending = first: hard = the top by weight, soft = ∝ w
    if n_hard:
        ranked.append((weights.neg(), n_hard))
    if n_soft:
        ranked.append((race_values(weights, generator), n_soft))
    keys = random_keys(weights.shape, generator, weights.device)  # [B, N] >= 0
    if ranked:
        batch = weights.shape[0]
        count = torch.tensor([c for _, c in ranked], device=weights.device)
        values = torch.cat([v for v, _ in ranked])  # [parts * B, N]
        chosen = smallest(values, count.repeat_interleave(batch)[:, None])
        chosen = functools.reduce(operator.or_, chosen.split(batch))  # [B, N] hard ∪ soft
        keys.bitwise_or_(chosen.to(keys.dtype).neg_())  # chosen -> -1 (all bits set)
    # The chosen (-1) first, then the rest in uniform random order: the fill up to M, then
    # the throw.
    return _split(column_order(keys), counts)


STRATEGIES: dict[str, Callable[..., MaskPlan]] = {
    "random": random_masking,
    "block": block_masking,
    "amt": amt_masking,
    "attmask_high": attmask_high,
    "attmask_low": attmask_low,
    "attmask_hint": attmask_hint,
    "gpa": gpa_masking,
}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # the names a flag accepts are declared without torch
    raise ImportError(f"STRATEGIES {tuple(STRATEGIES)} must match strategies.STRATEGY_NAMES")
_SCHEDULED = frozenset({"attmask_high", "attmask_low", "attmask_hint"})
_OPTIONS = {  # name -> the keyword options it takes
    name: tuple(
        p
        for p in inspect.signature(fn).parameters
        if p not in ("weights", "counts", "generator", "progress")
    )
    + (SCHEDULE_OPTIONS if name in _SCHEDULED else ())
    for name, fn in STRATEGIES.items()
}


# ---------------------------------------------------------------- entry point


def plan_masks(
    strategy: str,
    weights: Tensor,
    mask_ratio: float,
    throw_ratio: float = 0.0,
    *,
    generator: torch.Generator,
    progress: float = 0.0,
    unit: int = 1,
    random_rows: Tensor | None = None,
    **options,
) -> MaskPlan:
    """Plan masked / thrown / visible patches for a batch.

    weights: ``[B, N]`` non-negative patch weights (float, any device); ``generator`` on the
    same device type; ``progress`` in [0, 1] is the training progress (used by ``gpa``);
    ``unit``: patches per side of a mask unit (the weights then form a square grid whose side
    ``unit`` divides); ``random_rows`` (bool ``[B]``): rows planned uniformly at random with
    the batch's counts whatever their weights (samples without a map); ``options`` are the
    strategy's keyword options (``throw`` for ``amt``, ``hint`` and ``hint_pool`` for
    ``attmask_hint``, ``mask_prob`` and ``ratio_var`` for the ``attmask_*`` strategies,
    ``hard`` and ``soft`` for ``gpa``, ``min_patches``, ``aspect``, ``grid`` and
    ``candidates`` for ``block``).

    Returns a MaskPlan of int64 ``[B, V]``, ``[B, M]``, ``[B, T]`` on the weights' device.
    Raises MaskError for an unknown strategy or option, bad ratios or progress, bad weights.
    """
    fn = _strategy(strategy, options)
    options = dict(options)
    mask_prob, ratio_var = options.pop("mask_prob", 1.0), options.pop("ratio_var", 0.0)
    side = _unit_side(_num_patches(weights), unit)
    weights = _unit_weights(weights, side, unit)  # [B, N / unit²]
    _check_generator(generator, weights)
    if not isinstance(progress, numbers.Real) or not 0.0 <= progress <= 1.0:
        raise MaskError(f"progress must be in [0, 1] (got {progress!r}); pass epoch / epochs")
    counts = mask_counts(weights.shape[1], mask_ratio, throw_ratio)
    _check_schedule(mask_prob, ratio_var, mask_ratio, throw_ratio)
    base_ratio = mask_ratio
    if ratio_var:
        mask_ratio = _batch_ratio(mask_ratio, ratio_var, generator)
        counts = mask_counts(weights.shape[1], mask_ratio, throw_ratio)
    if strategy == "attmask_hint":
        _check_hint_types(options)
        _default_hint(options, base_ratio, ratio_var, generator)
    weights = _checked_weights(weights, strategy in NEEDS_SALIENCY)
    plan = fn(weights, counts, generator=generator, progress=float(progress), **options)
    if mask_prob < 1.0 or random_rows is not None:
        plan = _mix_random(plan, mask_prob, generator, weights, random_rows)
    return _expand_units(plan, side, unit)


def plan_mask_flags(
    strategy: str,
    weights: Tensor,
    mask_ratio: float,
    *,
    generator: torch.Generator,
    mask_prob: float = 1.0,
    ratio_var: float = 0.0,
    progress: float = 0.0,
    random_rows: Tensor | None = None,
    **options,
) -> Tensor:
    """iBOT's masks: bool ``[B, N]``, True where a patch token is replaced by the mask token.

    One ratio for the batch, drawn from ``U(r − ratio_var, r + ratio_var)`` (AttMask's
    ``main_attmask.py``: one ``get_pred_ratio()`` per batch); ``strategy`` plans every row
    through :func:`plan_masks` (nothing thrown; ``options`` as there, ``random_rows`` planned
    uniformly at random); then each row keeps its plan with probability ``mask_prob`` and is
    otherwise left unmasked (AttMask's ``masking_prob``; iBOT's ``pred_ratio`` of (0, 0.3)
    picks ratio 0 for half the images). Unlike MAE's schedule (``plan_masks``'s
    ``mask_prob``), a row that is not picked has no masked patch: iBOT still trains it
    through its [CLS] loss. Raises MaskError as :func:`plan_masks`.
    """
    mask_counts(_num_patches(weights), mask_ratio)  # the ratio's own checks first
    _check_schedule(mask_prob, ratio_var, mask_ratio, 0.0)
    _check_generator(generator, weights)
    base_ratio = mask_ratio
    if ratio_var:
        mask_ratio = _batch_ratio(mask_ratio, ratio_var, generator)
    if strategy == "attmask_hint":
        options = dict(options)
        _check_hint_types(options)
        _default_hint(options, base_ratio, ratio_var, generator)
    plan = plan_masks(
        strategy,
        weights,
        mask_ratio,
        generator=generator,
        progress=progress,
        random_rows=random_rows,
        **options,
    )
    flags = torch.zeros(weights.shape, dtype=torch.bool, device=weights.device)
    flags.scatter_(1, plan.mask_idx, True)  # [B, N]
    if mask_prob < 1.0:
        flags &= uniform((weights.shape[0], 1), generator, weights.device) < mask_prob
    return flags


def check_options(
    strategy: str,
    options: dict,
    num_patches: int = 196,
    mask_ratio: float = 0.5,
    throw_ratio: float = 0.0,
    unit: int = 1,
    flags: bool = False,
) -> None:
    """Plan one batch of uniform weights with ``options``; raises MaskError naming the
    strategy, the options and what is wrong (each strategy checks its options' types and
    values; anything else it raises is a bug and propagates as itself). ``flags``: the
    options of iBOT's :func:`plan_mask_flags` (every strategy takes ``mask_prob`` and
    ``ratio_var`` there; nothing is thrown)."""
    if not isinstance(options, dict):
        raise MaskError(f"strategy options must be a dict (got {type(options).__name__})")
    takes = _OPTIONS.get(strategy, ())
    if flags:
        takes = tuple(dict.fromkeys(takes + SCHEDULE_OPTIONS))
        _strategy(strategy, {k: v for k, v in options.items() if k not in SCHEDULE_OPTIONS})
    else:
        _strategy(strategy, options)  # an unknown strategy or option name: its own message
    generator = torch.Generator().manual_seed(0)
    try:
        if flags:
            plan_mask_flags(
                strategy, torch.ones(1, num_patches), mask_ratio, generator=generator, **options
            )
        else:
            plan_masks(
                strategy,
                torch.ones(1, num_patches),
                mask_ratio,
                throw_ratio,
                generator=generator,
                unit=unit,
                **options,
            )
    except MaskError as exc:
        raise MaskError(
            f"bad option value for mask strategy {strategy!r} (options {options}): {exc}; "
            f"it takes {', '.join(takes) or 'no options'}"
        ) from None


def _strategy(name: str, options: dict) -> Callable[..., MaskPlan]:
    check_strategy(name)
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        takes = ", ".join(_OPTIONS[name]) or "no options"
        raise MaskError(f"mask strategy {name!r} takes {takes}; got unknown {', '.join(unknown)}")
    return STRATEGIES[name]


def _unit_side(num_patches: int, unit: int) -> int | None:
    """The patch grid's side when planning on mask units (None for ``unit`` 1)."""
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise MaskError(f"unit must be a positive int of patches per side (got {unit!r})")
    if unit == 1:
        return None
    side = math.isqrt(num_patches)
    if side * side != num_patches or side % unit:
        raise MaskError(
            f"mask units of {unit}x{unit} patches need a square patch grid whose side they "
            f"divide (got {num_patches} patches); change the mask unit or the image size"
        )
    return side


def _unit_weights(weights: Tensor, side: int | None, unit: int) -> Tensor:
    """``[B, N]`` patch weights -> ``[B, N / unit²]``: the area mean over each unit (AMT
    Eq. 5: P_A summarises a_w inside each token; SimMIM's 32 px units of 16 px patches)."""
    if side is None:
        return weights
    grid = weights.reshape(weights.shape[0], 1, side, side)
    return F.avg_pool2d(grid, unit).flatten(1)  # [B, (side / unit)²], NaN stays NaN


def _expand_units(plan: MaskPlan, side: int | None, unit: int) -> MaskPlan:
    """Unit indices -> the ``unit²`` patch indices of each unit, unit by unit (raster order
    inside a unit): ``[B, K] -> [B, K·unit²]``."""
    if side is None:
        return plan
    units = side // unit
    device = plan.mask_idx.device
    step = torch.arange(unit, device=device)
    offsets = (step[:, None] * side + step[None, :]).flatten()  # [unit²] inside one unit
    return MaskPlan(
        *(
            ((idx // units) * unit * side + (idx % units) * unit)[..., None].add(offsets).flatten(1)
            for idx in plan
        )
    )


def _check_schedule(mask_prob, ratio_var, mask_ratio, throw_ratio) -> None:
    if not isinstance(mask_prob, numbers.Real) or not 0.0 < mask_prob <= 1.0:
        raise MaskError(
            f"mask_prob must be a probability in (0, 1] (got {mask_prob!r}); AttMask uses 0.5"
        )
    if not isinstance(ratio_var, numbers.Real) or not 0.0 <= ratio_var <= mask_ratio:
        raise MaskError(
            f"ratio_var must lie in [0, mask_ratio = {mask_ratio}] (got {ratio_var!r}); "
            "AttMask draws U(0.3 - 0.2, 0.3 + 0.2)"
        )
    if ratio_var and mask_ratio + ratio_var + throw_ratio >= 1.0:
        raise MaskError(
            f"mask_ratio + ratio_var + throw_ratio must be < 1 (got {mask_ratio} + "
            f"{ratio_var} + {throw_ratio}); lower one so some patches stay visible"
        )


def _default_hint(options: dict, mask_ratio: float, ratio_var: float, generator) -> None:
    """attmask_hint's ``hint`` when not given: ``hint_pool × r′``, ``r′`` a ratio drawn for the
    batch apart from its mask ratio (AttMask's ``main_attmask.py`` passes
    ``args.show_max * get_pred_ratio()``, a second call of ``get_pred_ratio``; without
    ``ratio_var`` both are ``r``). Drawn after the mask ratio, from the same generator, as
    there."""
    if options.get("hint") is None:
        ratio = _batch_ratio(mask_ratio, ratio_var, generator) if ratio_var else mask_ratio
        options["hint"] = options.get("hint_pool", 0.10) * ratio


def _batch_ratio(mask_ratio: float, ratio_var: float, generator: torch.Generator) -> float:
    """The batch's mask ratio: ``U(r − var, r + var)`` drawn once (AttMask's code)."""
    u = uniform((1, 1), generator, generator.device).item()
    return mask_ratio - ratio_var + 2.0 * ratio_var * u


def _mix_random(
    plan: MaskPlan,
    mask_prob: float,
    generator,
    weights: Tensor,
    random_rows: Tensor | None,
) -> MaskPlan:
    """Each row keeps ``plan`` with probability ``mask_prob`` (AttMask's ``masking_prob``)
    unless it is one of ``random_rows``; the others get a uniform random plan with the
    plan's counts (``attmask_hint`` masks ``M − H``)."""
    counts = MaskCounts(*(idx.shape[1] for idx in plan))  # both (visible, mask, throw)
    batch = weights.shape[0]
    keep = torch.ones((batch, 1), dtype=torch.bool, device=weights.device)
    if mask_prob < 1.0:
        keep = uniform((batch, 1), generator, weights.device) < mask_prob  # [B, 1]
    if random_rows is not None:
        if random_rows.shape != (batch,) or random_rows.dtype != torch.bool:
            raise MaskError(f"random_rows must be a bool [{batch}] tensor")
        keep = keep & ~random_rows.to(weights.device)[:, None]
    other = random_masking(weights, counts, generator=generator, progress=0.0)
    return MaskPlan(*(torch.where(keep, a, b) for a, b in zip(plan, other)))


def _num_patches(weights) -> int:
    if not isinstance(weights, Tensor) or weights.ndim != 2 or weights.shape[1] < 1:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise MaskError(f"weights must be a [B, N] tensor with N >= 1 (got {shape})")
    if not weights.is_floating_point():
        raise MaskError(f"weights must be floating point (got {weights.dtype})")
    return weights.shape[1]


def _checked_weights(weights: Tensor, needed: bool) -> Tensor:
    """float32 weights; all-zero rows replaced by uniform ones. Raises MaskError if bad."""
    weights = weights.detach().float()
    if not needed:
        return weights
    row_max = weights.amax(1, keepdim=True)  # [B, 1]; min / max propagate NaN
    low, high = torch.stack([weights.amin(), row_max.amax()]).tolist()  # one sync
    if not (low >= 0 and high < math.inf):
        bad = ~(weights >= 0) | ~weights.isfinite()
        rows = bad.any(1).nonzero().flatten().tolist()
        raise MaskError(
            f"weights must be finite and >= 0 (got {weights[bad][0].item()} in rows {rows[:8]}); "
            "normalise maps with crops.normalize_weights and drop samples without a valid map"
        )
    if low > 0:
        return weights
    return torch.where(row_max == 0, 1.0, weights)  # a row without saliency: uniform


def _check_generator(generator, weights: Tensor) -> None:
    if not isinstance(generator, torch.Generator):
        raise MaskError(f"generator must be a torch.Generator (got {type(generator).__name__})")
    if generator.device.type != weights.device.type:
        raise MaskError(
            f"generator is on {generator.device} but weights are on {weights.device}; "
            "create it with torch.Generator(device=weights.device)"
        )


def _block_grid(num_patches: int, grid) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise MaskError(
                f"block masking needs the patch grid: {num_patches} patches is not a square; "
                "pass grid=(rows, cols)"
            )
        return side, side
    if len(grid) != 2 or grid[0] < 1 or grid[1] < 1 or grid[0] * grid[1] != num_patches:
        raise MaskError(f"block grid {tuple(grid)} does not hold {num_patches} patches")
    return int(grid[0]), int(grid[1])


def _check_block_options(min_patches: int, aspect, candidates: int) -> None:
    if not isinstance(min_patches, int) or min_patches < 1:
        raise MaskError(f"block min_patches must be a positive int (got {min_patches!r})")
    if len(aspect) != 2 or not 0 < aspect[0] <= aspect[1]:
        raise MaskError(f"block aspect must be (low, high) with 0 < low <= high (got {aspect!r})")
    if not isinstance(candidates, int) or not 1 <= candidates <= _MAX_CANDIDATES:
        raise MaskError(
            f"block candidates must be an int in [1, {_MAX_CANDIDATES}] (got {candidates!r})"
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_hint_types(options: dict) -> None:
    """attmask_hint's ``hint`` (None or a share) and ``hint_pool`` (a share) are numbers."""
    hint, pool = options.get("hint"), options.get("hint_pool", 0.10)
    if not _is_number(pool) or not (hint is None or _is_number(hint)):
        raise MaskError(f"hint and hint_pool must be numbers (got {hint!r}, {pool!r})")


def _hint_counts(n: int, counts: MaskCounts, hint: float, hint_pool: float) -> tuple[int, int]:
    """``(H, pool)`` for attmask_hint: ``H = int(N·hint)`` revealed among the ``int(N·hint_pool)``
    most attended (AttMask's ``show_hints``), the pool clipped to the masked top M. Raises
    MaskError when they cannot fit."""
    if not (_is_number(hint) and _is_number(hint_pool)) or not (
        0.0 <= hint < 1.0 and 0.0 < hint_pool <= 1.0
    ):
        raise MaskError(f"hint must be in [0, 1) and hint_pool in (0, 1] (got {hint}, {hint_pool})")
    hints = int(n * hint)
    pool = min(max(int(n * hint_pool), 1), counts.mask)  # revealed among the masked top M
    if hints > pool:
        raise MaskError(
            f"attmask_hint reveals {hints} patches but its pool holds {pool} "
            f"(hint={hint}, hint_pool={hint_pool}, N={n}, {counts.mask} masked); "
            "lower hint or raise hint_pool or the mask ratio"
        )
    return hints, pool


def _check_gpa_shares(hard, soft) -> None:
    for name, pair in (("hard", hard), ("soft", soft)):
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(_is_number(a) and 0.0 <= a <= 1.0 for a in pair)
        ):
            raise MaskError(f"gpa {name} must be (start, end) shares in [0, 1] (got {pair!r})")
    for end in (0, 1):  # linear schedules: checking both ends covers every progress
        if hard[end] + soft[end] > 1.0 + 1e-9:
            raise MaskError(
                f"gpa hard + soft shares exceed 1 at progress {end} "
                f"({hard[end]} + {soft[end]}); lower one"
            )
