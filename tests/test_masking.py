"""Mask strategies: exact counts, a partition of the patches, reproducibility, and each law.

The laws are checked through independent paths: ``amt`` against a slow sequential sampler
(one index at a time with probability ∝ the remaining weights), ``attmask_*`` against
``torch.topk``, ``gpa`` against the shares its schedule promises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salient.errors import SalientError
from salient.pipeline.masking import (
    DEFAULT_RATIOS,
    NEEDS_SALIENCY,
    NORMALIZED_OVER,
    STRATEGIES,
    MaskError,
    MaskPlan,
    check_options,
    default_ratios,
    mask_counts,
    plan_mask_flags,
    plan_masks,
)

SHAPES = [(1, 16), (3, 49), (6, 196), (2, 64), (4, 1)]
RATIOS = [(0.0, 0.0), (0.45, 0.40), (0.75, 0.0), (0.5, 0.2), (0.3, 0.1), (0.9, 0.05)]
Z_MAX = 4.5  # two-sided z bound per comparison: ~7e-6 false alarms each, fixed seeds anyway


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def weights_for(batch: int, n: int, seed: int) -> torch.Tensor:
    """Random weights with some exact zeros and, from 3 rows on, one all-zero row."""
    w = torch.rand(batch, n, generator=gen(seed))
    w[w < 0.1] = 0.0
    if batch >= 3:
        w[1] = 0.0
    return w


def membership(plan: MaskPlan, n: int) -> torch.Tensor:
    """``[B, N]`` set of each patch: 0 masked, 1 thrown, 2 visible (−1 if in none)."""
    label = torch.full((plan.mask_idx.shape[0], n), -1)
    for value, idx in enumerate((plan.mask_idx, plan.throw_idx, plan.visible_idx)):
        label.scatter_(1, idx, value)
    return label


def set_frequencies(plans_label: torch.Tensor) -> np.ndarray:
    """``[N, 3]`` fraction of rows in which each patch is masked / thrown / visible."""
    return np.stack([(plans_label == s).double().mean(0).numpy() for s in range(3)], 1)


def sequential_orders(w: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """Reference sampler: draw one index at a time with probability ∝ the remaining weights.

    Vectorised over independent draws only; the steps are sequential. Once only zero
    weights remain, they are drawn uniformly.
    """
    rng = np.random.default_rng(seed)
    n = len(w)
    alive = np.ones((draws, n), dtype=bool)
    orders = np.empty((draws, n), dtype=np.int64)
    rows = np.arange(draws)
    for step in range(n):
        p = np.where(alive, w, 0.0)
        p = np.where(p.sum(1, keepdims=True) > 0, p, alive.astype(float))
        cdf = np.cumsum(p, axis=1)
        u = rng.random(draws) * cdf[:, -1]
        pick = (u[:, None] < cdf).argmax(1)
        orders[:, step] = pick
        alive[rows, pick] = False
    return orders


def labels_from_orders(orders: np.ndarray, counts, throw: str = "middle") -> torch.Tensor:
    _, m, t = counts
    n = orders.shape[1]
    label = np.full(orders.shape, 2)
    rows = np.arange(orders.shape[0])[:, None]
    label[rows, orders[:, :m]] = 0
    thrown = orders[:, m : m + t] if throw == "middle" else orders[:, n - t :]
    label[rows, thrown] = 1
    return torch.from_numpy(label)


def z_scores(p1: np.ndarray, p2: np.ndarray, n1: int, n2: int) -> np.ndarray:
    """Two-proportion z statistics (pooled), element-wise."""
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return np.where(se > 0, (p1 - p2) / np.where(se > 0, se, 1), 0.0)


def z_one(p_hat: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """z of observed frequencies against known probabilities."""
    se = np.sqrt(p * (1 - p) / n)
    return np.where(se > 0, (p_hat - p) / np.where(se > 0, se, 1), 0.0)


# ---------------------------------------------------------------- counts and invariants


def test_mask_counts_follow_amt_code():
    assert mask_counts(196, 0.45, 0.40) == (30, 88, 78)
    assert mask_counts(196, 0.75) == (49, 147, 0)
    assert mask_counts(196, 0.44, 0.26) == (59, 86, 51)
    v, m, t = mask_counts(10, 0.3, 0.4)
    assert (m, t, v) == (int(10 * 0.3), int(10 * 0.7) - int(10 * 0.3), 10 - int(10 * 0.7))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_partitions_the_patches(strategy):
    for batch, n in SHAPES:
        for r, t in RATIOS:
            counts = mask_counts(n, r, t)
            hints = int(n * 0.1 * r) if strategy == "attmask_hint" else 0  # revealed (AttMask)
            for seed in range(3):
                w = weights_for(batch, n, seed)
                plan = plan_masks(strategy, w, r, t, generator=gen(seed), progress=seed / 2)
                assert [x.shape for x in plan] == [
                    (batch, counts.visible + hints),
                    (batch, counts.mask - hints),
                    (batch, counts.throw),
                ]
                assert all(x.dtype == torch.int64 for x in plan)
                every = torch.cat(list(plan), dim=1).sort(1).values
                assert torch.equal(every, torch.arange(n).expand(batch, n)), (strategy, n, r, t)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_same_seed_same_plan_other_seed_other_plan(strategy):
    w = weights_for(8, 196, 0)
    a = plan_masks(strategy, w, 0.45, 0.40, generator=gen(7), progress=0.3)
    b = plan_masks(strategy, w, 0.45, 0.40, generator=gen(7), progress=0.3)
    c = plan_masks(strategy, w, 0.45, 0.40, generator=gen(8), progress=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(membership(a, 196), membership(c, 196))


def test_weights_of_random_and_block_are_not_read():
    w = torch.full((2, 16), float("nan"))
    for strategy in ("random", "block"):
        plan = plan_masks(strategy, w, 0.5, 0.25, generator=gen(0))
        assert plan.mask_idx.shape == (2, 8) and plan.throw_idx.shape == (2, 4)
    assert {"random", "block"}.isdisjoint(NEEDS_SALIENCY)
    assert set(STRATEGIES) - {"random", "block"} == NEEDS_SALIENCY


# ---------------------------------------------------------------- amt: the sampling law

AMT_W = np.array([8.0, 4.0, 2.0, 1.0, 1.0, 0.5, 0.25, 3.0, 0.0, 6.0])
DRAWS = 40_000


@pytest.fixture(scope="module")
def reference_orders():
    return sequential_orders(AMT_W, DRAWS, seed=1)


def amt_labels(throw: str, w=AMT_W, r=0.3, t=0.4, seed=2) -> torch.Tensor:
    weights = torch.tensor(w, dtype=torch.float32).expand(DRAWS, len(w))
    plan = plan_masks("amt", weights, r, t, generator=gen(seed), throw=throw)
    return plan, membership(plan, len(w))


@pytest.mark.parametrize("throw", ["middle", "low"])
def test_amt_inclusion_matches_sequential_sampler(reference_orders, throw):
    counts = mask_counts(len(AMT_W), 0.3, 0.4)
    _, ours = amt_labels(throw)
    ref = labels_from_orders(reference_orders, counts, throw)
    z = z_scores(set_frequencies(ours), set_frequencies(ref), DRAWS, DRAWS)
    assert np.abs(z).max() < Z_MAX, z
    assert (ours[:, 8] == 0).sum() == 0  # the zero-weight patch is never masked ...
    assert (ours[:, 8] == (1 if throw == "low" else 2)).all()  # ... it is drawn last


def test_amt_first_draw_is_proportional_to_weight():
    plan, _ = amt_labels("middle")
    first = np.bincount(plan.mask_idx[:, 0].numpy(), minlength=len(AMT_W)) / DRAWS
    z = z_one(first, AMT_W / AMT_W.sum(), DRAWS)
    assert np.abs(z).max() < Z_MAX, z


def test_amt_law_check_detects_a_wrong_law(reference_orders):
    """The z test has power: sampling ∝ w² instead of w fails it by far."""
    counts = mask_counts(len(AMT_W), 0.3, 0.4)
    _, wrong = amt_labels("middle", w=AMT_W**2)
    ref = labels_from_orders(reference_orders, counts)
    assert np.abs(z_scores(set_frequencies(wrong), set_frequencies(ref), DRAWS, DRAWS)).max() > 20


def test_amt_throw_random_throws_uniformly_among_unmasked(reference_orders):
    counts = mask_counts(len(AMT_W), 0.3, 0.4)
    _, ours = amt_labels("random")
    ref = set_frequencies(labels_from_orders(reference_orders, counts))
    freq = set_frequencies(ours)
    assert np.abs(z_scores(freq[:, 0], ref[:, 0], DRAWS, DRAWS)).max() < Z_MAX
    expected_throw = (1 - ref[:, 0]) * counts.throw / (len(AMT_W) - counts.mask)
    assert np.abs(freq[:, 1] - expected_throw).max() < 0.015


def test_all_zero_row_is_sampled_uniformly():
    w = torch.zeros(DRAWS, 8)
    plan = plan_masks("amt", w, 0.25, 0.25, generator=gen(3))
    freq = set_frequencies(membership(plan, 8))
    assert np.abs(z_one(freq[:, 0], np.full(8, 0.25), DRAWS)).max() < Z_MAX
    assert np.abs(z_one(freq[:, 1], np.full(8, 0.25), DRAWS)).max() < Z_MAX


def test_zero_weights_come_after_every_positive_one():
    w = torch.tensor([[0.0, 1e-6, 0.0, 5.0, 0.0, 1e-30, 0.0, 0.0]]).expand(2000, 8)
    plan = plan_masks("amt", w, 0.375, 0.25, generator=gen(4))  # M=3, T=2
    assert (plan.mask_idx.sort(1).values == torch.tensor([1, 3, 5])).all()
    thrown = np.bincount(plan.throw_idx.flatten().numpy(), minlength=8) / 2000
    assert np.abs(thrown[[0, 2, 4, 6, 7]] - 0.4).max() < 0.05  # 2 of the 5 zeros, uniformly


# ---------------------------------------------------------------- attmask


def distinct_weights(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen(seed + b)) for b in range(batch)]) + 1.0


def as_sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in idx.tolist()]


@pytest.mark.parametrize("r, t", [(0.45, 0.40), (0.75, 0.0), (0.1, 0.3)])
def test_attmask_high_and_low_mask_exactly_the_extreme_weights(r, t):
    w = distinct_weights(16, 196, 0)
    m = mask_counts(196, r, t).mask
    high = plan_masks("attmask_high", w, r, t, generator=gen(0))
    low = plan_masks("attmask_low", w, r, t, generator=gen(0))
    assert as_sets(high.mask_idx) == as_sets(w.topk(m, 1).indices)
    assert as_sets(low.mask_idx) == as_sets(w.topk(m, 1, largest=False).indices)


def test_attmask_hint_reveals_hints_among_the_most_attended():
    batch, n, r = 4000, 100, 0.4  # M=40, H=int(100*0.05)=5 revealed, pool=int(100*0.1)=10
    w = distinct_weights(batch, n, 1)
    plan = plan_masks("attmask_hint", w, r, 0.3, generator=gen(5), hint=0.05, hint_pool=0.1)
    rank = w.argsort(1, descending=True).argsort(1)  # [B, N] 0 = most attended
    mask_rank = rank.gather(1, plan.mask_idx)
    assert plan.mask_idx.shape[1] == 35  # AttMask's attmask.py: top M masked, then H revealed
    assert (mask_rank < 40).all()  # masked ⊂ top M
    shown = (rank < 40) & (membership(plan, n) == 2)  # top M left visible = the hints
    assert (shown.sum(1) == 5).all()
    assert (rank[shown] < 10).all()  # hints come from the pool of the top 10 %
    assert (rank.gather(1, plan.throw_idx) >= 40).all()  # hints are never thrown
    per_rank = torch.zeros(10)
    per_rank.index_add_(0, rank[shown], torch.ones(int(shown.sum())))
    assert np.abs(z_one(per_rank.numpy() / batch, np.full(10, 0.5), batch)).max() < Z_MAX


def test_attmask_hint_keeps_53_of_196_masked_at_ratio_03_as_attmask_counts():
    """AttMask's attmask.py at N = 196, r = 0.3, show_max 0.1: int(0.3·196) = 58 masked,
    then int(0.1·0.3·196) = 5 of them revealed from the top int(0.1·196) = 19: 53 masked."""
    w = distinct_weights(64, 196, 2)
    plan = plan_masks("attmask_hint", w, 0.3, generator=gen(0))
    rank = w.argsort(1, descending=True).argsort(1)
    masked = torch.zeros(64, 196, dtype=torch.bool).scatter_(1, plan.mask_idx, True)
    revealed = (rank < 58) & ~masked
    assert plan.mask_idx.shape == (64, 53) and (revealed.sum(1) == 5).all()
    assert (rank[revealed] < 19).all()
    assert (masked | revealed).sum(1).eq(58).all() and (rank[masked] < 58).all()


# ---------------------------------------------------------------- gpa


def gpa_labels(w: torch.Tensor, r: float, progress: float, t=0.0, seed: int = 6, **options):
    plan = plan_masks("gpa", w, r, t, generator=gen(seed), progress=progress, **options)
    return membership(plan, w.shape[1])


def test_gpa_at_progress_1_is_half_hard_half_random():
    batch, n, r = DRAWS, 100, 0.4  # M=40: 20 hard (top by weight), 20 uniform; T=30
    w = torch.linspace(1.0, 0.01, n).expand(batch, n)  # patch i has rank i
    masked, thrown, _ = set_frequencies(gpa_labels(w, r, 1.0, t=0.3)).T
    assert (masked[:20] == 1.0).all()
    assert np.abs(z_one(masked[20:], np.full(80, 20 / 80), batch)).max() < Z_MAX
    # thrown uniformly among the 60 unmasked: (1 - 1/4) * 30/60 for every non-hard patch
    assert np.abs(z_one(thrown[20:], np.full(80, 0.75 * 0.5), batch)).max() < Z_MAX


def test_gpa_at_progress_0_is_half_soft_half_random():
    m, soft = 3, 1  # N=10, r=0.3: soft int(0.5*3)=1 drawn ∝ w, then 2 uniform among 9
    w = torch.tensor(AMT_W, dtype=torch.float32).expand(DRAWS, 10)
    masked = set_frequencies(gpa_labels(w, 0.3, 0.0))[:, 0]
    first = AMT_W / AMT_W.sum()  # P(the soft draw picks i)
    expected = first + (1 - first) * (m - soft) / (10 - soft)
    assert np.abs(z_one(masked, expected, DRAWS)).max() < Z_MAX


def test_gpa_configurable_shares():
    w = distinct_weights(64, 196, 2)
    m = mask_counts(196, 0.6).mask
    hard = plan_masks("gpa", w, 0.6, generator=gen(0), progress=0.3, hard=(1, 1), soft=(0, 0))
    assert as_sets(hard.mask_idx) == as_sets(w.topk(m, 1).indices)
    half = gpa_labels(w, 0.6, 0.5, hard=(0.0, 0.5), soft=(0.5, 0.0))
    top = w.topk(int(0.25 * m), 1).indices  # at p=0.5 the hard share is 0.25
    assert (half.gather(1, top) == 0).all()


def test_gpa_hard_part_breaks_exact_ties_by_position():
    # Weights from float16 maps tie often; the hard part must still take exactly the top
    # int(a_h * M), ties in column order, as a stable descending sort does.
    w = torch.randint(0, 5, (64, 196), generator=gen(3)).float() / 4  # 5 levels: many ties
    m = mask_counts(196, 0.6).mask
    hard = plan_masks("gpa", w, 0.6, generator=gen(0), progress=0.3, hard=(1, 1), soft=(0, 0))
    stable = w.sort(dim=1, descending=True, stable=True).indices[:, :m]
    assert as_sets(hard.mask_idx) == as_sets(stable)


def test_gpa_soft_only_follows_the_amt_mask_law(reference_orders):
    w = torch.tensor(AMT_W, dtype=torch.float32).expand(DRAWS, 10)
    ours = set_frequencies(gpa_labels(w, 0.3, 0.7, hard=(0, 0), soft=(1, 1)))[:, 0]
    ref = set_frequencies(labels_from_orders(reference_orders, mask_counts(10, 0.3)))[:, 0]
    assert np.abs(z_scores(ours, ref, DRAWS, DRAWS)).max() < Z_MAX


# ---------------------------------------------------------------- block


def masked_neighbours(label: torch.Tensor, side: int) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    masked = (label == 0).view(-1, side, side).float()
    padded = torch.nn.functional.pad(masked, (1, 1, 1, 1))
    around = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float((around * masked).sum() / masked.sum())


def test_block_masks_are_blocks():
    w = torch.ones(256, 196)
    block = plan_masks("block", w, 0.4, generator=gen(0))
    random = plan_masks("random", w, 0.4, generator=gen(0))
    assert masked_neighbours(membership(block, 196), 14) > 2.8
    assert masked_neighbours(membership(random, 196), 14) < 1.8


def test_block_rectangles_match_a_per_patch_reference():
    # The vectorised geometry (bit spans, lowest set bit) against a plain loop per patch.
    from salient.pipeline.sampling import first_rectangle

    r = torch.rand((4, 32, 16), generator=gen(4)).numpy()
    low, high, aspect, height, width = 16, 88, (0.3, 1 / 0.3), 7, 14
    first = first_rectangle(r, low, high, aspect, height, width)
    for b in range(r.shape[1]):
        rects = []
        for k in range(r.shape[2]):
            area = low + (high - low) * float(r[0, b, k])
            ratio = math.exp(
                math.log(aspect[0]) + math.log(aspect[1] / aspect[0]) * float(r[1, b, k])
            )
            rows = min(max(round(math.sqrt(area * ratio)), 1), height)
            cols = min(max(round(math.sqrt(area / ratio)), 1), width)
            top = math.floor(float(r[2, b, k]) * (height - rows + 1))
            left = math.floor(float(r[3, b, k]) * (width - cols + 1))
            rects.append((top, left, rows, cols))
        for y in range(height):
            for x in range(width):
                covering = [
                    k
                    for k, (t, le, h, w_) in enumerate(rects)
                    if t <= y < t + h and le <= x < le + w_
                ]
                assert first[b, y * width + x] == (covering[0] if covering else 16)


@pytest.mark.parametrize("side, low", [(8, 4), (14, 16), (16, 25)])
def test_block_smallest_block_follows_the_grid_as_ibot(side, low):
    # iBOT's loader.py: low = (min(H, W) // 3) ** 2, BEiT's 16 on 224 px / 16 only.
    w = torch.ones(64, side * side)
    default = plan_masks("block", w, 0.3, generator=gen(2))
    assert torch.equal(
        default.mask_idx, plan_masks("block", w, 0.3, generator=gen(2), min_patches=low).mask_idx
    )
    other = plan_masks("block", w, 0.3, generator=gen(2), min_patches=low + 5)
    assert not torch.equal(default.mask_idx, other.mask_idx)


def test_block_on_a_rectangular_grid():
    plan = plan_masks("block", torch.ones(4, 98), 0.5, 0.2, generator=gen(0), grid=(7, 14))
    assert torch.equal(torch.cat(list(plan), 1).sort(1).values, torch.arange(98).expand(4, 98))
    with pytest.raises(MaskError, match="grid"):
        plan_masks("block", torch.ones(4, 98), 0.5, generator=gen(0))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "r, t, match",
    [
        (0.6, 0.5, "mask_ratio \\+ throw_ratio must be < 1"),
        (0.5, 0.5, "must be < 1"),
        (1.0, 0.0, "mask_ratio must be in"),
        (-0.1, 0.0, "mask_ratio must be in"),
        (0.2, 1.0, "throw_ratio must be in"),
        (math.nan, 0.0, "mask_ratio must be in"),
    ],
)
def test_bad_ratios_raise(r, t, match):
    with pytest.raises(MaskError, match=match):
        plan_masks("amt", torch.ones(2, 16), r, t, generator=gen(0))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_weights_raise(bad):
    w = torch.ones(3, 16)
    w[2, 5] = bad
    for strategy in sorted(NEEDS_SALIENCY):
        with pytest.raises(MaskError, match="finite and >= 0.*rows \\[2\\]"):
            plan_masks(strategy, w, 0.5, generator=gen(0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plan_masks("nope", torch.ones(2, 4), 0.5, generator=gen(0)), "unknown mask"),
        (lambda: plan_masks("amt", torch.ones(4), 0.5, generator=gen(0)), r"\[B, N\]"),
        (lambda: plan_masks("amt", torch.ones(2, 4, dtype=torch.int64), 0.5, generator=gen(0)), "floating"),
        (lambda: plan_masks("amt", torch.ones(2, 4), 0.5, generator=None), "torch.Generator"),
        (lambda: plan_masks("amt", torch.ones(2, 4), 0.5, generator=gen(0), throw="x"), "throw must"),
        (lambda: plan_masks("random", torch.ones(2, 4), 0.5, generator=gen(0), throw="low"), "unknown throw"),
        (lambda: plan_masks("gpa", torch.ones(2, 4), 0.5, generator=gen(0), progress=1.5), "progress"),
        (lambda: plan_masks("gpa", torch.ones(2, 4), 0.5, generator=gen(0), hard=(0.6, 0.6)), "exceed 1"),
        (lambda: plan_masks("attmask_hint", torch.ones(2, 100), 0.5, generator=gen(0), hint=0.2), "pool"),
        (lambda: plan_masks("attmask_hint", torch.ones(2, 100), 0.05, generator=gen(0), hint=0.08), "pool holds 5"),
        (lambda: plan_masks("block", torch.ones(2, 16), 0.5, generator=gen(0), candidates=40), "candidates"),
    ],
)  # fmt: skip
def test_bad_calls_raise(call, match):
    with pytest.raises(MaskError, match=match):
        call()
    assert issubclass(MaskError, SalientError)


# ---------------------------------------------------------------- paper defaults, options


def test_default_ratios_are_the_papers():
    assert set(DEFAULT_RATIOS) == set(STRATEGIES)
    assert set(NORMALIZED_OVER) == set(NEEDS_SALIENCY)
    assert default_ratios("amt") == (0.45, 0.40)  # AMT Sec. 4.1, MAE
    assert default_ratios("amt", "simmim") == (0.44, 0.26)  # AMT Sec. 4.1, SimMIM
    assert default_ratios("random") == (0.75, 0.0)  # MAE
    assert default_ratios("random", "simmim") == (0.6, 0.0)  # SimMIM
    assert default_ratios("gpa") == default_ratios("gpa", "simmim") == (0.75, 0.0)  # GPA 4.1
    assert default_ratios("attmask_hint") == (0.3, 0.0)  # AttMask's --pred_ratio
    assert NORMALIZED_OVER["amt"] == "image" and NORMALIZED_OVER["gpa"] == "crop"
    with pytest.raises(MaskError, match="unknown mask strategy"):
        default_ratios("nope")


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("amt", {"throw": "low"}),
        ("amt", {"throw": "random"}),
        ("attmask_hint", {"hint": 0.05, "hint_pool": 0.2}),
        ("attmask_high", {"mask_prob": 0.5, "ratio_var": 0.2}),
        ("gpa", {"hard": [0.0, 0.5], "soft": [0.5, 0.0]}),  # lists, as JSON gives them
        ("block", {"min_patches": 4, "aspect": [0.5, 2.0], "grid": [14, 14], "candidates": 8}),
    ],
)
def test_every_option_works_from_json_values(strategy, options):
    check_options(strategy, options, 196, 0.3, 0.1)
    plan = plan_masks(strategy, weights_for(4, 196, 1), 0.3, 0.1, generator=gen(0), **options)
    every = torch.cat(list(plan), dim=1).sort(1).values
    assert torch.equal(every, torch.arange(196).expand(4, 196))


@pytest.mark.parametrize(
    "strategy, options, match",
    [
        ("amt", {"hint": 0.1}, "takes throw; got unknown hint"),
        ("amt", {"throw": "high"}, "throw must be one of middle, low, random"),
        ("attmask_hint", {"hint": "many"}, "bad option value.*attmask_hint"),
        ("gpa", {"hard": 0.5}, "bad option value.*gpa.*takes hard, soft"),
        ("block", {"aspect": "wide"}, "block aspect must be"),
        ("attmask_low", {"mask_prob": 0.0}, "mask_prob must be a probability"),
        ("attmask_low", {"ratio_var": 0.4}, r"ratio_var must lie in \[0, mask_ratio"),
        ("random", {"mask_prob": 0.5}, "takes no options; got unknown mask_prob"),
    ],
)
def test_bad_options_are_clear_errors(strategy, options, match):
    with pytest.raises(MaskError, match=match):
        check_options(strategy, options, 196, 0.3)


# ---------------------------------------------------------------- AttMask's schedule


def test_attmask_ratio_is_drawn_once_per_batch_within_its_range():
    n, counts = 196, []
    for seed in range(200):
        plan = plan_masks(
            "attmask_high", weights_for(4, n, seed), 0.3, generator=gen(seed), ratio_var=0.2
        )
        assert plan.mask_idx.shape[0] == 4  # one count for the whole batch: [B, M]
        counts.append(plan.mask_idx.shape[1])
    ratios = np.array(counts) / n
    assert ratios.min() >= int(n * 0.1) / n and ratios.max() <= 0.5  # U(0.1, 0.5)
    assert abs(ratios.mean() - 0.3) < 4.5 * 0.4 / math.sqrt(12 * 200)  # its mean, ±z
    assert len(set(counts)) > 30  # the ratio varies from batch to batch


def test_attmask_mask_prob_keeps_the_attention_plan_for_that_share_of_images():
    batch, n = 400, 64
    w = torch.arange(n, dtype=torch.float32).expand(batch, n) + 1.0  # the top M are known
    plan = plan_masks("attmask_high", w, 0.25, generator=gen(3), mask_prob=0.5)
    top = set(range(n - 16, n))
    kept = np.array([set(row.tolist()) == top for row in plan.mask_idx])
    assert abs(kept.mean() - 0.5) < Z_MAX * 0.5 / math.sqrt(batch)  # AttMask: p = 0.5
    assert plan.mask_idx.shape == (batch, 16)  # the others are masked at random, same count


def test_attmask_hint_count_follows_the_batch_ratio():
    n = 196
    w = torch.rand(8, n, generator=gen(0)) + 0.01
    for r in (0.2, 0.4):
        plan = plan_masks("attmask_hint", w, r, generator=gen(1))
        rank = w.argsort(1, descending=True).argsort(1)
        masked, hints = int(n * r), int(n * 0.1 * r)  # AttMask: show_max · pred_ratio
        top = rank < masked  # the top M by attention
        revealed = (top & (membership(plan, n) != 0)).sum(1)  # of them, not masked
        assert plan.mask_idx.shape[1] == masked - hints and (revealed == hints).all()


def test_attmask_hint_draws_its_hint_ratio_apart_from_the_mask_ratio():
    # AttMask's main_attmask.py passes show_max · get_pred_ratio(), a second draw: with
    # pred_ratio_var the hint count is not a function of the batch's mask count.
    n = 196
    w = torch.rand(4, n, generator=gen(0)) + 0.01
    rank = w.argsort(1, descending=True).argsort(1)
    hints_by_masked: dict[int, set[int]] = {}
    for seed in range(200):
        plan = plan_masks("attmask_hint", w, 0.3, generator=gen(seed), ratio_var=0.2)
        masked_ranks = rank.gather(1, plan.mask_idx)
        top = int(masked_ranks.max()) + 1  # M: hints come from the top 10 %, so rank M-1 stays
        hints = top - plan.mask_idx.shape[1]
        assert int(n * 0.1 * 0.1) <= hints <= int(n * 0.1 * 0.5)  # int(N · 0.1 · U(0.1, 0.5))
        hints_by_masked.setdefault(top, set()).add(hints)
    assert max(len(h) for h in hints_by_masked.values()) > 1


def test_random_rows_are_planned_uniformly():
    n = 64
    w = torch.zeros(300, n)
    w[:, :8] = 1.0  # attmask_high would always mask these 8
    rows = torch.zeros(300, dtype=torch.bool)
    rows[::2] = True
    plan = plan_masks("attmask_high", w + 1e-6, 0.125, generator=gen(0), random_rows=rows)
    on_top = (plan.mask_idx < 8).all(1)
    assert on_top[~rows].all() and on_top[rows].float().mean() < 0.05


# ---------------------------------------------------------------- mask units


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_mask_units_cover_whole_units(strategy):
    side, unit = 14, 2  # a 224 px image of 16 px patches, 32 px units
    n, units = side * side, (side // 2) ** 2
    w = weights_for(5, n, 2)
    plan = plan_masks(strategy, w, 0.44, 0.26, generator=gen(0), unit=unit, progress=0.5)
    counts = mask_counts(units, 0.44, 0.26)  # ratios count units: 21 / 13 / 15 of 49
    hints = int(units * 0.1 * 0.44) if strategy == "attmask_hint" else 0  # revealed units
    shapes = [counts.visible + hints, counts.mask - hints, counts.throw]
    assert [x.shape[1] for x in plan] == [4 * k for k in shapes]
    every = torch.cat(list(plan), dim=1).sort(1).values
    assert torch.equal(every, torch.arange(n).expand(5, n))
    rows, cols = plan.mask_idx // side, plan.mask_idx % side
    unit_of = (rows // 2) * (side // 2) + cols // 2  # [B, 4M] every masked patch's unit
    for row in unit_of:
        assert (torch.bincount(row, minlength=units) % 4 == 0).all()  # 0 or all 4 patches


def test_mask_units_use_the_area_mean_of_their_patches():
    side = 4
    w = torch.zeros(1, side * side)
    w[0, [10, 11, 14, 15]] = 1.0  # the bottom-right 2x2 unit
    plan = plan_masks("attmask_high", w, 0.25, generator=gen(0), unit=2)
    assert sorted(plan.mask_idx[0].tolist()) == [10, 11, 14, 15]
    with pytest.raises(MaskError, match="square patch grid whose side they divide"):
        plan_masks("random", torch.ones(1, 36), 0.5, generator=gen(0), unit=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_cuda_plans_are_partitions_on_the_device(strategy):
    w = weights_for(32, 196, 0).cuda()
    plan = plan_masks(strategy, w, 0.45, 0.40, generator=gen(0, "cuda"), progress=0.5)
    assert all(x.device.type == "cuda" for x in plan)
    every = torch.cat(list(plan), dim=1).sort(1).values
    assert torch.equal(every, torch.arange(196, device="cuda").expand(32, 196))
    with pytest.raises(MaskError, match="generator is on cpu"):
        plan_masks(strategy, w, 0.45, generator=gen(0))


# ---------------------------------------------------------------- iBOT's masks (flags)


def test_mask_flags_mask_the_plan_of_picked_rows_and_leave_the_others_unmasked():
    batch, n = 400, 196
    w = distinct_weights(batch, n, 3)
    flags = plan_mask_flags("attmask_high", w, 0.3, generator=gen(4), mask_prob=0.5)
    counts = flags.sum(1)
    picked = counts > 0
    assert set(counts.tolist()) == {0, 58}  # iBOT: an image not picked has no masked patch
    assert abs(picked.double().mean().item() - 0.5) < Z_MAX * 0.5 / math.sqrt(batch)
    top = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, w.topk(58, 1).indices, True)
    assert torch.equal(flags[picked], top[picked])


@pytest.mark.parametrize("strategy", ["random", "block", "attmask_high", "attmask_hint"])
def test_mask_flags_draw_one_ratio_per_batch(strategy):
    n, seen = 196, set()
    for seed in range(40):
        w = distinct_weights(6, n, seed)
        flags = plan_mask_flags(strategy, w, 0.3, generator=gen(seed), ratio_var=0.2)
        counts = set(flags.sum(1).tolist())
        assert len(counts) == 1  # every row of the batch: one ratio (mask_prob 1)
        (count,) = counts
        hints = int(n * 0.1 * count / n) if strategy == "attmask_hint" else 0
        assert int(n * 0.1) - 5 <= count <= int(n * 0.5)  # U(0.1, 0.5), hints aside
        seen.add(count + hints)
    assert len(seen) > 10
    with pytest.raises(MaskError, match="ratio_var must lie"):
        plan_mask_flags(strategy, torch.ones(2, n), 0.3, generator=gen(0), ratio_var=0.4)
