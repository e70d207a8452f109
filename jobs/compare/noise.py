"""Seeds to figures: each arm's mean ± sd over its seeds, and whether two arms differ by more
than their noise.

The rule (README, Decisions, "When a difference is real"), for two arms' values ``a`` and
``b`` of one probe (K runs each, one per seed):

- **K ≥ 3**: Welch's two-sided t-test (unequal variances); the difference is real when
  p < 0.05. Seeds vary the model's initialisation, the crops, the masks and the data order
  together, so the seed-to-seed spread is the noise a user meets when rerunning.
- **K = 2**: two values give a poor t-test (about 1 degree of freedom), so the difference is
  real when it exceeds 2 × the pooled sd, ``sqrt((sd_a² + sd_b²) / 2)``.
- **K = 1**: no seed spread is known; the difference is real when it exceeds 2 × the sd of a
  difference of two top-1 accuracies measured on ``n`` held-out images,
  ``sqrt(p_a (1 - p_a) / n + p_b (1 - p_b) / n)`` — held-out sampling noise only, a lower
  bound on the real noise, said so in the verdict.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import math
import statistics

from scipy.stats import ttest_ind

__all__ = ["ALPHA", "difference", "equal_time_epoch", "summarise"]

ALPHA = 0.05  # the two-sided significance level of Welch's test


def summarise(values: list[float]) -> dict:
    """``{"mean", "sd", "n", "values"}`` of one arm's runs; ``sd`` is the sample sd (K - 1 in
    the denominator), None for a single run."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values), "values": values}


def difference(a: list[float], b: list[float], held_out: int | None = None) -> dict:
    """Arm ``a`` minus arm ``b`` (their means) and whether it exceeds the noise (module
    docstring): ``{"diff", "rule", "noise", "p", "exceeds"}``. ``noise`` is the threshold the
    difference is held against (K ≤ 2) or None; ``p`` Welch's p-value (K ≥ 3) or None.
    ``held_out``: the held-out images of a top-1 accuracy, for K = 1 (None: no verdict)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    k = min(len(a), len(b))
    if k >= 3:
        p = _welch_p(a, b)
        return _verdict(diff, "welch", None, p, p < ALPHA)
    if k == 2:
        noise = 2 * math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
        return _verdict(diff, "2sd", noise, None, abs(diff) > noise)
    if not held_out:
        return _verdict(diff, "none", None, None, None)
    pa, pb = statistics.fmean(a), statistics.fmean(b)
    noise = 2 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / held_out)
    return _verdict(diff, "binomial", noise, None, abs(diff) > noise)


def _verdict(diff: float, rule: str, noise, p, exceeds) -> dict:
    return {"diff": diff, "rule": rule, "noise": noise, "p": p, "exceeds": exceeds}


def _welch_p(a: list[float], b: list[float]) -> float:
    """Welch's two-sided p-value; two spread-free samples differ surely when their means do."""
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def equal_time_epoch(epoch_end_s: list[float], budget_s: float) -> tuple[int, bool]:
    """The number of epochs a run had finished within ``budget_s`` seconds of its start (at
    least 1), and whether it finished every epoch within it."""
    done = sum(1 for t in epoch_end_s if t <= budget_s)
    return max(done, 1), done == len(epoch_end_s)
