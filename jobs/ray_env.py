"""Connect a job to Ray: a cluster named by ``--address`` / ``RAY_ADDRESS``, else an embedded one.

Every job (refresh, train, demo) calls :func:`ensure_ray` before it schedules work. An already
initialised Ray (a test session, a notebook, a second job in one process) is reused as is.
The embedded local Ray starts with its dashboard on 127.0.0.1 (no extra start time here):
Ray Train's placement-group cleaner, ``ray list`` and ``ray status`` need the State API it
serves; without it the cleaner logs a warning every second of a training run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from salient.errors import SalientError

__all__ = ["RayConnectError", "RayInfo", "ensure_ray"]


class RayConnectError(SalientError):
    """The Ray cluster at the given address could not be reached."""


@dataclass(frozen=True)
class RayInfo:
    """Where the job runs: the GCS address, whether this call started Ray, and its resources."""

    address: str
    started: bool
    cpus: float
    gpus: float


def _info(started: bool) -> RayInfo:
    import ray

    resources = ray.cluster_resources()
    return RayInfo(
        address=ray.get_runtime_context().gcs_address,
        started=started,
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
    )


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> RayInfo:
    """Initialise Ray once: reuse a running session, join ``address``, or start a local one.

    ``address`` (else ``RAY_ADDRESS``) joins an existing cluster, e.g. ``"10.0.0.5:6379"`` or
    ``"auto"``; with neither, an embedded local Ray starts with ``num_cpus`` CPUs (all by
    default) and its dashboard on 127.0.0.1.

    Raises:
        RayConnectError: no Ray cluster answers at the address.
    """
    import ray

    if ray.is_initialized():
        return _info(started=False)
    target = address or os.environ.get("RAY_ADDRESS") or None
    # Python logging in this job's Ray processes at WARNING: Ray's INFO lines (cluster start,
    # Ray Data progress) are not the job's output. salient warns through ``warnings``.
    quiet = ray.LoggingConfig(log_level="WARNING")
    try:
        if target:
            ray.init(address=target, log_to_driver=True, logging_config=quiet)
        else:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                logging_config=quiet,
            )
    except ConnectionError as exc:
        where = "--address" if address else "RAY_ADDRESS"
        raise RayConnectError(
            f"no Ray cluster answers at {target} ({where}): {exc}; start it "
            "with `ray start --head`, fix the address, or leave it unset to "
            "run on an embedded local Ray"
        ) from None
    return _info(started=True)
