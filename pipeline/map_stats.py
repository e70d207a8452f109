"""Comparing saliency maps: rank correlation per map, and the fidelity of stored per-head maps.

Pure NumPy / SciPy functions of arrays; importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["head_map_fidelity", "spearman"]


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair of ``a, b [B, N]`` -> ``[B]``: the Pearson
    correlation of average ranks (ties share the mean of the ranks they span); NaN where a
    row is constant (no ranking to correlate)."""
    ra = rankdata(np.asarray(a, dtype=np.float64), method="average", axis=1)
    rb = rankdata(np.asarray(b, dtype=np.float64), method="average", axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), denom, out=np.full(len(ra), np.nan), where=denom > 0)


def head_map_fidelity(stored: np.ndarray, recomputed: np.ndarray) -> float:
    """How well cropped stored per-head maps stand in for the teacher's attention recomputed
    on the crop: the mean Spearman rank correlation over every (sample, head) pair.

    ``stored``, ``recomputed``: ``[B, H, g, g]`` (or ``[B, H, N]``) arrays or tensors of the
    same shape, e.g. a loader batch's ``head_maps`` and ``teacher.saliency(..., kind="heads")``
    of the batch's images. Pairs with a constant map (no ranking) are left out; NaN when
    none is left. Raises ValueError for shapes that differ or are not per-head maps.
    """
    stored, recomputed = np.asarray(stored), np.asarray(recomputed)
    if stored.shape != recomputed.shape or stored.ndim not in (3, 4):
        raise ValueError(
            f"stored {stored.shape} and recomputed {recomputed.shape} must be the same "
            "[B, H, g, g] per-head maps"
        )
    pairs = stored.shape[0] * stored.shape[1]
    rho = spearman(stored.reshape(pairs, -1), recomputed.reshape(pairs, -1))
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
