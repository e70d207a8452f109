"""``salient demo``: the whole flow on the bundled demo data (``driver``), its flags in
``config``. The names below load their module on first use (``salient.lazy``), so parsing the
demo's flags loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".config": ["DemoConfig"],
        ".driver": ["human_summary", "run_demo", "summarize_dataset"],
    },
)
