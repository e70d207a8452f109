"""``salient bench``'s dispatch. The quality bench is ``salient compare`` on the demo preset:
its pieces are tested in tests/test_compare.py, its result is recorded in BENCHMARKS.md."""

from __future__ import annotations

import pytest

from salient.errors import SalientError
from salient.jobs.bench.driver import BENCHES, run_bench
from salient.jobs.bench.quality import bench_quality


def test_run_bench_refuses_options_a_bench_does_not_take():
    assert BENCHES["quality"] is bench_quality
    with pytest.raises(SalientError, match="salient bench masking takes no --epochs, --n"):
        run_bench("masking", quick=True, epochs=3, n=10)
