"""Connect a job to Ray: a cluster named by ``--address`` / ``RAY_ADDRESS``, else an embedded one.

Every job (refresh, train, demo) calls :func:`ensure_ray` before it schedules work. An already
initialised Ray (a test session, a notebook, a second job in one process) is reused as is.
The embedded local Ray starts with its dashboard on 127.0.0.1 (no extra start time here):
Ray Train's placement-group cleaner, ``ray list`` and ``ray status`` need the State API it
serves; without it the cleaner logs a warning every second of a training run.

Ray's own console noise is kept out without weakening it (README, Decisions, "A console an
operator can read"): Ray Train's PreemptionWatcher (which logs an error line on machines
without a cloud metadata server) is off, and a new local Ray gets token authentication by
setting it explicitly, which is what Ray does by default minus its warning.

:func:`user_error` finds our :class:`~salient.errors.SalientError` inside Ray's wrappers
(a task's or actor's ``RayTaskError``, an actor's creation failure, Ray Train's
``TrainingFailedError``), so the CLI prints it as one line wherever it was raised.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from salient.errors import SalientError

__all__ = ["RayConnectError", "RayInfo", "ensure_ray", "quiet_ray_env", "user_error"]


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


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def quiet_ray_env(embedded: bool) -> None:
    """Environment for a quiet Ray that keeps its token authentication.

    Ray reads ``RAY_AUTH_MODE`` when it is imported, so the mode is only set before that
    (and never over a value the user set). An embedded Ray creates its token when missing;
    joining a cluster keeps token mode only when a token is at hand, as Ray itself does.
    Ray Train passes the PreemptionWatcher switch from the driver to its workers.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if "ray" not in sys.modules and (embedded or _token_available()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> RayInfo:
    """Initialise Ray once: reuse a running session, join ``address``, or start a local one.

    ``address`` (else ``RAY_ADDRESS``) joins an existing cluster, e.g. ``"10.0.0.5:6379"`` or
    ``"auto"``; with neither, an embedded local Ray starts with ``num_cpus`` CPUs (all by
    default) and its dashboard on 127.0.0.1.

    Raises:
        RayConnectError: no Ray cluster answers at the address.
    """
    target = address or os.environ.get("RAY_ADDRESS") or None
    quiet_ray_env(embedded=not target)
    import ray

    if ray.is_initialized():
        return _info(started=False)
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
                dashboard_port=_dashboard_port(),
                logging_config=quiet,
            )
    except ConnectionError as exc:
        where = "--address" if address else "RAY_ADDRESS"
        raise RayConnectError(
            f"no Ray cluster answers at {target} ({where}), or it refused this client's "
            f"token ({exc}); start it with `ray start --head`, fix the address, give this "
            "client the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token), or leave the "
            "address unset to run on an embedded local Ray"
        ) from None
    return _info(started=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_port() -> int:
    """The embedded dashboard's port, named in ``RAY_API_SERVER_ADDRESS`` before Ray starts,
    so every Ray process inherits it: Ray's own State API clients (Ray Train's placement-group
    cleaner, an actor) otherwise search for their cluster and fail with "Found multiple active
    Ray instances" on a machine running several Rays."""
    named = os.environ.get("RAY_API_SERVER_ADDRESS", "")
    if named.startswith("http://127.0.0.1:"):
        return int(named.rsplit(":", 1)[1])
    port = _free_port()
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    return port


# ---------------------------------------------------------------- errors from inside Ray


def _inner(exc: BaseException) -> list[BaseException]:
    """The exceptions Ray wrapped in ``exc``: a task's cause, a dead actor's creation error,
    Ray Train's per-worker failures and controller failure, then the ``__cause__`` chain."""
    found = []
    cause = getattr(exc, "cause", None)  # RayTaskError, ActorDiedError (creation failure)
    if isinstance(cause, BaseException):
        found.append(cause)
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError
    if isinstance(failures, dict):
        found.extend(failures[rank] for rank in sorted(failures))
    controller = getattr(exc, "controller_failure", None)  # Ray Train's ControllerError
    if isinstance(controller, BaseException):
        found.append(controller)
    if exc.__cause__ is not None:
        found.append(exc.__cause__)
    return found


def user_error(exc: BaseException) -> SalientError | None:
    """Our error inside Ray's wrappers (the innermost one), or None when there is none.

    A ``RayTaskError`` re-raised by ``ray.get`` is also an instance of its cause's class,
    but its text is the whole remote traceback: the cause itself carries the one line.
    """
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = _inner(current)
        if isinstance(current, SalientError) and not any(
            isinstance(e, SalientError) for e in inner
        ):
            return current
        todo.extend(inner)
    return None
