"""``salient inspect``: samples and maps read back, their statistics, and the HTML report.
The names below load their module on first use (``salient.lazy``), so importing
``salient.jobs.inspect.config`` loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".config": ["InspectConfig", "InspectError"],
        ".driver": ["generation_stats", "render_inspect", "run_inspect", "verify_store"],
    },
)
