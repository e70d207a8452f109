"""``salient inspect``: samples and maps read back, their statistics, and the HTML report."""

from salient.jobs.inspect.driver import (
    InspectConfig,
    InspectError,
    generation_stats,
    render_inspect,
    run_inspect,
    verify_store,
)

__all__ = [
    "InspectConfig",
    "InspectError",
    "generation_stats",
    "render_inspect",
    "run_inspect",
    "verify_store",
]
