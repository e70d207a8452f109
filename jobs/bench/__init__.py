"""``salient bench WHAT``: each benchmark in its own module, one dispatcher that stamps the
result with the device, versions and date."""

from salient.jobs.bench.driver import BENCHES, BenchConfig, run_bench, run_bench_job

__all__ = ["BENCHES", "BenchConfig", "run_bench", "run_bench_job"]
