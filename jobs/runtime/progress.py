"""Progress for long jobs: tqdm bars on a terminal, one plain line every few seconds elsewhere.

On a terminal (or with ``SALIENT_PROGRESS=1``) jobs draw tqdm bars. Without one — a log file,
``ray job submit``, CI — bars would be a wall of carriage returns, and silence for minutes
reads as a hang, so jobs print one line to stderr at most every ``SALIENT_PROGRESS_EVERY``
seconds (default 5): job, where it is (epoch / step, shard), img/s, loss, generation.
``SALIENT_PROGRESS=0`` turns both off.

Warnings read like the jobs' own lines (:func:`plain_warnings`): ``salient JOB: warning: …``,
without the source file and line Python adds (an internal path means nothing to a user).

While a storage call of the job waits (an endpoint that stalls), a heartbeat line says so
(``salient refresh: waiting on s3://… for 60 s``; ``salient.urls.on_wait``), every
``SALIENT_WAIT_EVERY`` seconds (default 60) until the call ends or fails within the
storage patience: :func:`storage_heartbeat` around a job on the driver (the CLI runs every
job inside it), :func:`process_heartbeat` in the job's other processes (refresh and eval
actors, train ranks), whose stderr Ray forwards to the driver.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator

from tqdm import tqdm

from salient import urls

__all__ = [
    "ProgressLines",
    "plain_warnings",
    "process_heartbeat",
    "progress_bar",
    "progress_lines",
    "progress_mode",
    "progress_wanted",
    "storage_heartbeat",
]

_EVERY_S = 5.0


def progress_mode() -> str:
    """``"bar"`` (a terminal, or SALIENT_PROGRESS=1), ``"lines"`` (no terminal) or ``"off"``
    (SALIENT_PROGRESS=0)."""
    wanted = os.environ.get("SALIENT_PROGRESS")
    if wanted == "0":
        return "off"
    return "bar" if wanted == "1" or sys.stderr.isatty() else "lines"


def progress_wanted() -> bool:
    """Bars on a terminal, or anywhere with SALIENT_PROGRESS=1; never in logs and CI."""
    return progress_mode() == "bar"


@contextlib.contextmanager
def progress_bar(total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a tqdm bar on a terminal (or with SALIENT_PROGRESS=1), else a
    line every few seconds (``salient: 500/2000 demo scenes``)."""
    mode = progress_mode()
    lines = ProgressLines("") if mode == "lines" else None
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if lines is not None:
            lines.update(**{unit: f"{done}/{total}" if total else done})

    with tqdm(total=total, unit=" " + unit, disable=mode != "bar", dynamic_ncols=True) as bar:
        yield advance


def _key(name: str) -> str:
    return name.replace("_per_", "/").replace("_", " ")  # img_per_s -> img/s


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressLines:
    """``salient JOB: key value · key value …`` on stderr, at most every ``every_s`` seconds.

    ``update(**fields)`` prints when the last line is older than ``every_s``; ``line``
    always prints. Fields whose value is None are left out.
    """

    def __init__(self, job: str, every_s: float | None = None, stream=None) -> None:
        self.job = job
        self.every_s = (
            float(os.environ.get("SALIENT_PROGRESS_EVERY", _EVERY_S))
            if every_s is None
            else every_s
        )
        self._stream = stream
        self._last = time.monotonic()

    def update(self, **fields) -> bool:
        """Print when the last line is ``every_s`` old; returns whether it printed."""
        if time.monotonic() - self._last < self.every_s:
            return False
        self.line(**fields)
        return True

    def line(self, **fields) -> None:
        stream = self._stream or sys.stderr
        head = f"salient {self.job}:" if self.job else "salient:"
        print(f"{head} {self.text(**fields)}", file=stream, flush=True)
        self._last = time.monotonic()

    @staticmethod
    def text(**fields) -> str:
        """``key value · key value`` (``img_per_s`` → ``img/s``), the fields that are not None."""
        return " · ".join(f"{_key(key)} {_text(v)}" for key, v in fields.items() if v is not None)


def progress_lines(job: str, enabled: bool = True) -> ProgressLines | None:
    """A :class:`ProgressLines` when the job shows progress and there is no terminal."""
    return ProgressLines(job) if enabled and progress_mode() == "lines" else None


def plain_warnings(job: str) -> None:
    """Show this process's warnings as ``salient JOB: warning: MESSAGE`` on stderr: the CLI's
    process, and the Ray workers and actors of a job (they print through Ray to the driver's
    console). Python's filters still apply (each warning once per place by default)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        print(f"salient {job}: warning: {text}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    # PIL's decompression-bomb warning (over 89.5 M pixels) comes before salient's pixel
    # budget refuses the image and says so itself (ingest lists it, readers count it)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


# ---------------------------------------------------------------- waiting on storage


def _wait_every() -> float:
    value = os.environ.get("SALIENT_WAIT_EVERY", "")
    try:
        return float(value) if float(value) > 0 else urls.WAIT_REPORT_S
    except ValueError:
        return urls.WAIT_REPORT_S


def process_heartbeat(job: str) -> None:
    """From now on, one line on stderr (``salient JOB: waiting on URL for 60 s``) each time
    a storage call of this process has waited another ``SALIENT_WAIT_EVERY`` seconds;
    nothing with SALIENT_PROGRESS=0. For a job's worker processes, which live as long as
    their work."""
    if progress_mode() == "off":
        return
    lines = ProgressLines(job)
    urls.on_wait(lambda url, s: lines.line(waiting=f"on {url} for {s:g} s"), _wait_every())


@contextlib.contextmanager
def storage_heartbeat(job: str) -> Iterator[None]:
    """:func:`process_heartbeat` for the length of the block (a job on the driver)."""
    process_heartbeat(job)
    try:
        yield
    finally:
        urls.on_wait(None)
