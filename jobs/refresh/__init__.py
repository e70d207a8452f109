"""``salient refresh``: the config, the driver (generation, resume, lease, publish) and the
teacher actor. The names below load their module on first use (``salient.lazy``), so
importing ``salient.jobs.refresh.config`` loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__, {".config": ["RefreshConfig", "RefreshError"], ".driver": ["run_refresh"]}
)
