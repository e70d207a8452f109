"""Sampling primitives of the mask strategies: random bits, sort keys, orders, thresholds.

Everything here works on ``[B, N]`` rows with an explicit :class:`torch.Generator`, on any
device; :mod:`salient.pipeline.masking` builds the strategies from them.

- Orders are one sort of integer keys that carry their column in their low bits (int32 with
  8 bits up to N = 256, else int64 with 16, so ``N <= 65536``), ties kept in column order.
  On CPU the sort is NumPy's SIMD sort of values: ~2x an argsort there, ~10x torch's.
- Weighted sampling without replacement (the sequential law: one index at a time with
  probability ∝ the remaining weights) is an exponential race, ascending ``E / w`` with
  ``E ~ Exp(1)``: the order of Gumbel-top-k (AMT Alg. 1, eq. 5), one sort per batch.
- :func:`smallest` gives membership only (one sort of values, a threshold per row): enough
  for ``gpa``'s hard and soft parts.
- :func:`first_rectangle` is ``block``'s geometry: K rectangles per image, a few thousand
  numbers a batch, computed with NumPy on the host (torch's per-op overhead would dominate).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "column_order",
    "first_rectangle",
    "host_column_order",
    "host_random_bits",
    "race_values",
    "random_keys",
    "random_order",
    "smallest",
    "sorted_values",
    "uniform",
    "unit_uniform",
    "weight_keys",
    "weighted_order",
]

_INDEX_BITS = {4: 8, 8: 16}  # key bytes -> low bits that hold the column (int32, int64)
_INT32_COLUMNS = 1 << 8  # rows this short draw random orders as int32 keys


def _random_int32(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    """int32 with 31 uniform random low bits: two per 64-bit draw, ~30 % cheaper on CPU
    than one 32-bit draw each (``torch.rand`` / ``randint``)."""
    pairs = torch.empty((*shape[:-1], (shape[-1] + 1) // 2), dtype=torch.int64, device=device)
    return pairs.random_(generator=generator).view(torch.int32)[..., : shape[-1]]  # [0, 2**63)


def uniform(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    """float32 uniform in (0, 1) (see :func:`unit_uniform`)."""
    return unit_uniform(_random_int32(shape, generator, device) & 0x7FFFFF)


def unit_uniform(bits):
    """23 random bits (a torch or NumPy int array) as uniforms in (0, 1): the midpoints of a
    grid of 2**-23 (``torch.rand``: 2**-24, 0 included), exact in float32, never 0 or 1."""
    return (bits + 0.5) * 2.0**-23


def random_keys(shape: tuple[int, int], generator: torch.Generator, device) -> Tensor:
    """Uniform random keys >= 0; their order is a uniform permutation of each row.

    23 bits in int32 up to 256 columns (about a float32 uniform's resolution: a tie in a
    row of 196 has probability 0.002, and keeps column order), else 31 bits in int64.
    """
    keys = _random_int32(shape, generator, device)
    if shape[1] <= _INT32_COLUMNS:
        return keys & 0x7FFFFF
    return (keys & 0x7FFFFFFF).long()


def _float_keys(values: Tensor) -> Tensor:
    """int64 keys in the order of float32 ``values`` (-0.0 just below 0.0)."""
    bits = values.view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # IEEE sign-magnitude, same order


def weight_keys(weights: Tensor, descending: bool = False) -> Tensor:
    """int64 keys in the order of weights >= 0 (checked), whose bits sort as integers."""
    keys = (weights.view(torch.int32) & 0x7FFFFFFF).long()  # & drops the sign of -0.0
    return keys.neg_() if descending else keys


def column_order(keys: Tensor) -> Tensor:
    """Columns of each row by ascending integer ``keys [B, N]``; exact ties keep column
    order (a stable argsort). int32 keys: ``N <= 256``, ``|key| < 2**23``; int64 keys:
    ``N <= 2**16``, ``|key| < 2**47``."""
    if keys.device.type == "cpu":
        return torch.from_numpy(host_column_order(keys.numpy())).long()
    shift = _INDEX_BITS[keys.element_size()]
    columns = torch.arange(keys.shape[1], dtype=keys.dtype, device=keys.device)
    packed = (keys << shift).bitwise_or_(columns).sort(-1).values  # [B, N] distinct in a row
    return packed.bitwise_and_((1 << shift) - 1).long()


def host_column_order(keys: np.ndarray) -> np.ndarray:
    """:func:`column_order` of NumPy keys: NumPy's SIMD sort of values. int32 keys of rows
    longer than 256 are widened to int64 (the column needs more than 8 bits)."""
    if keys.dtype == np.int32 and keys.shape[1] > _INT32_COLUMNS:
        keys = keys.astype(np.int64)
    shift = _INDEX_BITS[keys.itemsize]
    packed = (keys << shift) | np.arange(keys.shape[1], dtype=keys.dtype)  # [B, N] distinct
    packed.sort(axis=-1)
    return packed & ((1 << shift) - 1)


def host_random_bits(shape: tuple[int, int], generator: torch.Generator) -> np.ndarray:
    """int32 ``shape`` of 23 uniform random bits each (random sort keys for
    :func:`host_column_order`), drawn on the generator's device and brought to the host."""
    return (_random_int32(shape, generator, generator.device) & 0x7FFFFF).cpu().numpy()


def sorted_values(values: Tensor) -> Tensor:
    """Each row of ``values`` sorted ascending (values only, a new tensor)."""
    if values.device.type != "cpu":
        return values.sort(-1).values
    out = values.clone()
    out.numpy().sort(axis=-1)  # NumPy's SIMD sort: ~10x torch's on CPU (see above)
    return out


def random_order(shape: tuple[int, int], generator: torch.Generator, device) -> Tensor:
    """A uniform random permutation of the columns, per row."""
    return column_order(random_keys(shape, generator, device))


def race_values(weights: Tensor, generator: torch.Generator) -> Tensor:
    """float32 values whose ascending order is a sequential draw ∝ weights, without
    replacement.

    Exponential race: ascending E / w, E = -log u ~ Exp(1), is the order of Gumbel-top-k
    (descending log w - log E). A zero weight becomes -1, its value 1 / E > 0: after every
    positive weight (values < 0), in uniform order among the zeros.
    """
    u = uniform(weights.shape, generator, weights.device)
    zero = 1.0 - weights.sign()  # [B, N] 1 where w = 0 (no bool tensor: slow on CPU)
    return (weights - zero).div_(u.log_())  # w / log u = -w / E


def _race_keys(weights: Tensor, generator: torch.Generator) -> Tensor:
    """int64 keys in the order of :func:`race_values` (for :func:`column_order`)."""
    return _float_keys(race_values(weights, generator))


def weighted_order(weights: Tensor, generator: torch.Generator) -> Tensor:
    """All N indices in the order of a sequential draw ∝ weights, without replacement."""
    return column_order(_race_keys(weights, generator))  # AMT Alg. 1 (eq. 5): draw order


def smallest(values: Tensor, count: Tensor) -> Tensor:
    """bool ``[R, N]``: the ``count [R, 1]`` smallest ``values [R, N]`` of each row, exact
    ties taken in column order (as a stable sort would).

    Only membership is needed, so one sort of the float values (no index) gives each row's
    threshold; ties at the threshold are resolved only when a row has them.
    """
    threshold = sorted_values(values).gather(1, count - 1)  # [R, 1] the count-th smallest
    chosen = values <= threshold
    taken = chosen.sum(1, keepdim=True, dtype=torch.int32)  # int32: ~3x faster than int64
    if bool((taken == count).all()):  # no row has more ties at its threshold than it takes
        return chosen
    below, tied = values < threshold, values == threshold
    room = count - below.sum(1, keepdim=True)  # [R, 1] ties to take, in column order
    return below | (tied & (tied.cumsum(1) <= room))


def first_rectangle(r: np.ndarray, low: int, high: int, aspect, height: int, width: int):
    """int32 ``[B, H*W]``: for each patch, the first of the K rectangles that covers it
    (K where none does), from uniforms ``r [4, B, K]`` (area, aspect, top, left).

    The geometry is K rectangles per image, a few thousand numbers a batch: NumPy on the
    host does it ~10x faster than torch's per-op overhead on CPU or kernel launches on GPU.
    """
    candidates = r.shape[-1]
    area = low + (high - low) * r[0]  # [B, K] patches per rectangle (BEiT)
    ratio = np.exp(math.log(aspect[0]) + math.log(aspect[1] / aspect[0]) * r[1])
    limit = np.array([height, width], dtype=np.float32)[:, None, None]
    length = np.minimum(np.sqrt(np.stack([area * ratio, area / ratio])).round().clip(1), limit)
    start = np.floor(r[2:] * (limit - length + 1))  # [2, B, K] top, left
    spans = _span_bits(start.astype(np.int64), length.astype(np.int64), max(height, width))
    bits = spans[0, :, :height, None] & spans[1, :, None, :width]  # [B, H, W] bit k: in rect k
    bits = bits.reshape(len(bits), -1) | (1 << candidates)  # a last bit: "no rectangle covers it"
    lowest = (bits & -bits).astype(np.float32)  # the lowest set bit alone: 2**k, exact
    return (lowest.view(np.int32) >> 23) - 127  # k, read from the float's exponent field


def _span_bits(start: np.ndarray, length: np.ndarray, size: int) -> np.ndarray:
    """int32 ``[..., K] -> [..., size]``: bit k of entry i is set when span k covers i
    (spans inside ``0..size``, K <= 30). One ``bincount`` of +2**k at each start and
    -2**k at each end, then a cumulative sum (float64: sums of powers of two are exact)."""
    lead = start.shape[:-1]
    base = np.arange(math.prod(lead)).reshape(*lead, 1) * (size + 1)  # [..., 1] row offsets
    bit = np.broadcast_to(np.ldexp(1.0, np.arange(start.shape[-1])), start.shape).ravel()
    total = base.size * (size + 1)
    edges = np.bincount((base + start).ravel(), bit, total)
    edges -= np.bincount((base + start + length).ravel(), bit, total)
    return edges.reshape(*lead, size + 1).cumsum(-1)[..., :size].astype(np.int32)
