"""``salient bench``'s dispatch, the quality bench's pieces that need no training run, and the
AutoMAE bench at ``--quick`` size.

The quality bench itself trains two MAE runs on Ray Train (minutes even with ``--quick``), so
its result is recorded in BENCHMARKS.md, not run here.
"""

from __future__ import annotations

import pytest

from salient.errors import SalientError
from salient.jobs.bench.driver import BENCHES, run_bench
from salient.jobs.bench.quality import _setup, bench_quality, equal_time_epoch


def test_equal_time_epoch_counts_the_epochs_ended_within_the_budget():
    ends = [10.0, 20.0, 31.0, 40.0]
    assert equal_time_epoch(ends, 30.0) == (2, False)
    assert equal_time_epoch(ends, 31.0) == (3, False)
    assert equal_time_epoch(ends, 45.0) == (4, True)  # faster than the budget: all of them
    assert equal_time_epoch(ends, 5.0) == (1, False)  # none yet: the first checkpoint


def test_quality_setup_scales_with_its_options():
    default = _setup("cpu", False, None, None, None)
    assert (default.model, default.n, default.val_n, default.image_size) == (
        "mae-tiny",
        2000,
        500,
        64,
    )
    assert default.warmup < default.epochs
    scaled = _setup("cpu", False, 20, 4000, 96)
    assert (scaled.epochs, scaled.n, scaled.val_n, scaled.image_size) == (20, 4000, 1000, 96)
    assert _setup("cpu", False, 1, None, None).warmup == 0  # one epoch: no warmup left


def test_run_bench_refuses_options_a_bench_does_not_take():
    assert BENCHES["quality"] is bench_quality
    with pytest.raises(SalientError, match="salient bench masking takes no --epochs, --n"):
        run_bench("masking", quick=True, epochs=3, n=10)


def test_automae_bench_measures_fidelity_and_saving_quick(ray_session):
    """The whole bench at --quick size: a label teacher, a heads refresh on Ray, fidelity rows
    and step rates of both map sources (figures at full size: BENCHMARKS.md)."""
    result = run_bench("automae", quick=True, device="cpu")
    assert result["bench"] == "automae" and result["heads"] == 2  # mae-micro's label teacher
    crops, whole = result["fidelity"]["crops"], result["fidelity"]["whole"]
    for row in (crops, whole):
        assert row["samples"] == 32 and len(row["per_head"]) == 2
        assert -1 <= row["mean"] <= 1 and -1 <= row["uncropped_mean"] <= 1
    # the heads cropped with each image follow the teacher on that crop better than the
    # whole-image heads do; with the whole image as the crop both nearly match it
    assert crops["mean"] > crops["uncropped_mean"]
    assert whole["mean"] > crops["mean"] and whole["uncropped_mean"] > 0.9
    for source in ("synthetic", "loader"):
        saving = result["saving"][source]
        assert saving["store_img_s"] > 0 and saving["online_img_s"] > 0
        assert saving["store_vs_online"] == pytest.approx(
            saving["store_img_s"] / saving["online_img_s"], rel=0.01
        )
