"""``salient bench WHAT``: each benchmark in its own module, one dispatcher that stamps the
result with the device, versions and date. The names below load their module on first use
(``salient.lazy``), so parsing bench's flags loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".config": ["BENCH_NAMES", "BenchConfig"],
        ".driver": ["BENCHES", "run_bench", "run_bench_job"],
    },
)
