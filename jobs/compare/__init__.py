"""``salient compare``: masking strategies compared on one dataset, with seeds, equal compute
and a label-aware teacher; its report and its statistics."""

from salient.jobs.compare.config import CompareConfig, CompareError
from salient.jobs.compare.driver import render_compare, run_compare

__all__ = ["CompareConfig", "CompareError", "render_compare", "run_compare"]
