"""``salient compare``: masking strategies compared on one dataset, with seeds, equal compute
and a label-aware teacher; its report and its statistics. The names below load their module on
first use (``salient.lazy``), so importing ``salient.jobs.compare.config`` loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {".config": ["CompareConfig", "CompareError"], ".driver": ["render_compare", "run_compare"]},
)
