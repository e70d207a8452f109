"""Who is writing or reading a generation: leases, renewed while their process runs, stale
when it stops.

A lease is a record ``{"host", "pid", "token", "renewed", …}`` that its process renews every
``RENEW_S`` seconds from a thread (:class:`Lease`). Two kinds share this mechanism:

- **writer**: an unpublished generation's attribute ``writer``, set by the driver that begins
  or resumes it. Only drivers write it (actors write array chunks only), so it never races a
  publish.
- **reader**: a record of its own (``readers/<token>`` in the store, with ``generation`` and
  ``holder``: who reads, e.g. a training run), made by ``SaliencyStore.hold``; ``gc`` keeps
  every generation a live reader holds.

Other processes read a lease's state:

- **live** (renewed less than ``STALE_S`` ago, and on this host its process still runs): a
  second driver with the same teacher waits or refuses (``GenerationBusyError``), and ``gc``
  keeps the generation;
- **stale** or absent: its process is gone (``dead``: on this host its pid no longer runs) or
  stopped renewing; the next refresh with the same teacher resumes a writer's generation, and
  ``gc`` collects it once it is older than the grace period.

Importing this module touches no disk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable

from salient.errors import cleanup_after
from salient.store.paths import age_s, now

__all__ = [
    "RENEW_S",
    "STALE_S",
    "Lease",
    "describe_writer",
    "gone",
    "holder",
    "lease_state",
]

STALE_S = 60.0  # a lease not renewed for this long is stale: its driver stopped
RENEW_S = 10.0  # how often a live driver renews it


def holder(**extra) -> dict:
    """A new lease record for this process (``extra``: more fields, e.g. a reader's
    ``generation`` and ``holder``)."""
    return {
        **extra,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "renewed": now(),
    }


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        return False
    return False


def lease_state(writer: dict | None, stale_s: float = STALE_S) -> str:
    """``"none"``, ``"mine"`` (held by this process), ``"live"`` or ``"stale"`` for a
    generation's ``writer`` attribute.

    On this host a lease whose process has ended is stale at once, so a rerun after a crash
    resumes without waiting; elsewhere it goes stale ``stale_s`` after its last renewal.
    """
    if not isinstance(writer, dict) or "renewed" not in writer:
        return "none"
    if writer.get("host") == socket.gethostname():
        pid = writer.get("pid")
        if pid == os.getpid():
            return "mine"
        if not isinstance(pid, int) or _process_gone(pid):
            return "stale"
    return "stale" if age_s(writer["renewed"]) >= stale_s else "live"


def describe_writer(writer: dict) -> str:
    """``pid 123 on host h, renewed 4 s ago`` for messages (any lease record)."""
    return (
        f"pid {writer.get('pid')} on host {writer.get('host')}, renewed "
        f"{age_s(writer['renewed']):.0f} s ago"
    )


def gone(record: dict | None) -> str:
    """Why a lease that is not live holds nothing, for messages: ``dead`` (its process no
    longer runs on this host), ``silent`` (no renewal for ``STALE_S``) or ``none``."""
    if not isinstance(record, dict) or "renewed" not in record:
        return "none"
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and (
        not isinstance(pid, int) or _process_gone(pid)
    ):
        return "dead"
    return "silent"


class Lease:
    """Renews ``record`` through ``write(record)`` every ``renew_s`` seconds until stopped.

    ``stop()`` ends the renewals (call it before the driver's last attribute writes, the
    publish, so no renewal races them); ``release`` clears the lease through ``clear()``.
    As a context manager: leaving the block releases the lease, unless ``stop()`` was called
    in it (the holder finished with it: a publish clears a writer's lease itself). When the
    block raises, a failing release never replaces that error; it is noted on it.
    """

    def __init__(
        self,
        record: dict,
        write: Callable[[dict], None],
        clear: Callable[[], None],
        renew_s: float = RENEW_S,
        name: str = "the lease",
    ) -> None:
        self.record, self._write, self._clear, self._renew_s = record, write, clear, renew_s
        self.name = name  # for messages: "the writer lease of gen-000003"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="salient-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._renew_s):
            self.record = {**self.record, "renewed": now()}
            # a failed renewal is retried next time; a lapse only lets another driver take
            # over a writer's generation (it resumes the same shards) or gc collect a reader's
            # once the grace period is over
            with contextlib.suppress(Exception):
                self._write(self.record)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def release(self) -> None:
        """Stop renewing and clear the lease (the generation is free for the next driver)."""
        self.stop()
        self._clear()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None and self._stopped.is_set():
            return
        if _stalled(error):  # clearing it would wait on that endpoint as long again
            self.stop()
            error.add_note(f"{self.name} was left to go stale: the endpoint stopped answering")
            return
        cleanup_after(error, self.release, f"releasing {self.name}")


def _stalled(error: BaseException | None) -> bool:
    """Whether ``error`` (or what it wraps: a Ray task's ``cause``, a chained exception) is a
    storage endpoint that stopped answering (``StorageError.stalled``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "stalled", False):
            return True
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return False
