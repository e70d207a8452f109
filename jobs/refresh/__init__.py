"""``salient refresh``: the driver (generation, resume, lease, publish) and the teacher actor."""

from salient.jobs.refresh.driver import RefreshConfig, RefreshError, run_refresh

__all__ = ["RefreshConfig", "RefreshError", "run_refresh"]
