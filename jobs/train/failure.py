"""How a training run ends when something goes wrong: one line, and no pointless restarts.

Ray Train restarts the workers after any failure, up to ``max_failures`` times; it cannot tell
a lost worker (worth a restart) from one of our errors (a diverged loss, a store that names a
missing generation: a restart only repeats it). So a worker that stops on a
:class:`~salient.errors.SalientError` first writes it to ``RUN/error.json``
(:func:`record_failure`); the workers of a restart find it and return at once
(:func:`failure_recorded`), and the driver raises it as the job's one-line error
(:func:`raise_failure`). A run that lost workers more often than ``max_failures``, or whose
workers Ray could not place again, also ends in one line naming what to do.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

from salient.errors import SalientError
from salient.jobs.runtime.placement import PlacementError
from salient.jobs.runtime.ray_env import user_error
from salient.trainer.checkpoint import latest_checkpoint
from salient.trainer.specs import TrainError

__all__ = [
    "clear_failure",
    "failure_recorded",
    "raise_failure",
    "record_failure",
    "recorded_error",
    "request_stop",
    "stop_requested",
]

FILE = "error.json"
STOP_FILE = "interrupted"  # a driver stopped by Ctrl-C: its workers stop at their next step


def record_failure(run_dir: str | os.PathLike, error: SalientError) -> None:
    """Keep ``error`` for the driver (written beside, then renamed: never torn)."""
    path = Path(run_dir) / FILE
    partial = path.with_name(FILE + f".{os.getpid()}.partial")
    body = {
        "module": type(error).__module__,
        "type": type(error).__qualname__,
        "message": str(error),
    }
    partial.write_text(json.dumps(body))
    os.replace(partial, path)


def failure_recorded(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / FILE).is_file()


def clear_failure(run_dir: str | os.PathLike) -> None:
    """Forget what an earlier run of the directory left: its error, its stop request."""
    (Path(run_dir) / FILE).unlink(missing_ok=True)
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


def request_stop(run_dir: str | os.PathLike) -> None:
    """Ask the run's workers to stop at their next step (the driver was stopped by Ctrl-C;
    its workers would otherwise train on, and checkpoint, until Ray notices it is gone)."""
    (Path(run_dir) / STOP_FILE).touch()


def stop_requested(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / STOP_FILE).is_file()


def recorded_error(run_dir: str | os.PathLike) -> SalientError | None:
    """The error a worker recorded, as its own class when that is one of ours."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    try:
        cls = getattr(importlib.import_module(body["module"]), body["type"])
    except (ImportError, AttributeError, KeyError):
        cls = SalientError
    if not (isinstance(cls, type) and issubclass(cls, SalientError)):
        cls = SalientError
    try:
        return cls(body["message"])
    except TypeError:  # a class with another signature: the message is what matters
        return SalientError(body["message"])


def _failures(exc: BaseException) -> list[BaseException]:
    failures = getattr(exc, "worker_failures", None)
    found = list(failures.values()) if isinstance(failures, dict) else []
    controller = getattr(exc, "controller_failure", None)
    return found + ([controller] if isinstance(controller, BaseException) else [])


def _out_of_memory(exc: BaseException) -> BaseException | None:
    """Ray's ``OutOfMemoryError`` (its memory monitor killed a worker) inside ``exc``, or None."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current).__name__ == "OutOfMemoryError":
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
        todo += _failures(current)
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def raise_failure(run_dir: str | os.PathLike, exc: BaseException | None, config) -> None:
    """After ``fit``: raise the error a worker recorded, else our error inside ``exc``, else
    one line for lost or unplaceable workers; returns when ``exc`` is none of those (a bug:
    the caller re-raises it with its traceback)."""

    recorded = recorded_error(run_dir)
    if recorded is not None:
        raise recorded from None
    if exc is None:
        return
    ours = user_error(exc)
    if ours is not None:
        raise ours from None
    failures = _failures(exc)
    resume = f"`--resume` continues from {latest_checkpoint(run_dir) or 'the start'}"
    memory = _out_of_memory(exc)
    if memory is not None:  # the node, not the run: one line, not Ray's report of each kill
        used = re.search(r"[\d.]+GB used / [\d.]+GB limit", str(memory))
        raise TrainError(
            "training stopped: Ray's memory monitor killed its processes, the node being out "
            f"of memory ({used[0] if used else 'over 95 %'}); free memory or lower "
            f"--batch-size, --loader-workers or --workers, then {resume}"
        ) from None
    if any(type(f).__name__ == "WorkerGroupStartupTimeoutError" for f in failures):
        raise PlacementError(
            f"Ray could not start the {config.workers} train workers within "
            f"{config.placement_timeout_s:g} s, {config.max_failures + 1} times (a node lost "
            "and no room elsewhere?); add capacity or lower --workers, then "
            f"{resume}"
        ) from None
    lost = [f for f in failures if type(f).__name__ in ("ActorDiedError", "RayActorError")]
    if lost:
        raise TrainError(
            f"training stopped: train workers were lost more than --max-failures "
            f"{config.max_failures} times (last: {_first_line(lost[-1])}); {resume}"
        ) from None
