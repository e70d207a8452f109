"""``salient bench``'s dispatch and the AutoMAE bench at ``--quick`` size. The quality bench is
``salient compare`` on the demo preset: its pieces are tested in tests/test_compare.py, its
result is recorded in BENCHMARKS.md."""

from __future__ import annotations

import pytest

from salient.errors import SalientError
from salient.jobs.bench.driver import BENCHES, run_bench
from salient.jobs.bench.quality import bench_quality
from salient.jobs.cli import main
from salient.jobs.compare import CompareError


def test_run_bench_refuses_options_a_bench_does_not_take():
    assert BENCHES["quality"] is bench_quality
    with pytest.raises(SalientError, match="salient bench masking takes no --epochs, --n"):
        run_bench("masking", quick=True, epochs=3, n=10)
    with pytest.raises(SalientError, match="on your data: salient compare --data D --val V"):
        run_bench("quality", quick=True, data="/somewhere")  # the demo preset; compare is not


def test_quality_bench_takes_compares_arms_and_refuses_an_unknown_one_before_any_work(
    tmp_path, capsys
):
    keep = tmp_path / "kept"
    with pytest.raises(CompareError, match="unknown arm 'ibot-typo'"):
        run_bench("quality", device="cpu", arms=("random", "ibot-typo"), keep=str(keep))
    # the flag as compare's: a comma-separated list, parsed by the same flag machinery
    argv = ["bench", "quality", "--arms", "random,ibot-typo", "--keep", str(keep)]
    assert main(argv) == 2
    assert "unknown arm 'ibot-typo'" in capsys.readouterr().err
    assert not keep.exists()  # refused by the config: no data composed, nothing trained


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
