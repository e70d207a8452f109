"""Who is writing a generation: a driver's lease, renewed while it runs, stale when it stops.

An unpublished generation carries the attribute ``writer``: ``{"host", "pid", "token",
"renewed"}``, set by the driver that begins or resumes it and renewed every ``RENEW_S``
seconds by a thread of that driver (:class:`Lease`). Other drivers read it:

- **live** (renewed less than ``STALE_S`` ago, and on this host its process still runs): the
  generation is someone else's; a second driver with the same teacher waits or refuses
  (``GenerationBusyError``), never writes beside it;
- **stale** or absent: its driver is gone; the next refresh with the same teacher resumes it,
  and ``gc`` collects it once it is older than the grace period.

Only drivers write this attribute (actors write array chunks only), so it never races a
publish. Importing this module touches no disk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable

from salient.store.paths import age_s, now

__all__ = ["RENEW_S", "STALE_S", "Lease", "describe_writer", "holder", "lease_state"]

STALE_S = 60.0  # a lease not renewed for this long is stale: its driver stopped
RENEW_S = 10.0  # how often a live driver renews it


def holder() -> dict:
    """A new lease record for this process."""
    return {
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
    """``pid 123 on host h, renewed 4 s ago`` for messages."""
    return (
        f"pid {writer.get('pid')} on host {writer.get('host')}, renewed "
        f"{age_s(writer['renewed']):.0f} s ago"
    )


class Lease:
    """Renews ``record`` through ``write(record)`` every ``renew_s`` seconds until stopped.

    ``stop()`` ends the renewals (call it before the driver's last attribute writes, the
    publish, so no renewal races them); ``release`` clears the lease through ``clear()``.
    """

    def __init__(
        self,
        record: dict,
        write: Callable[[dict], None],
        clear: Callable[[], None],
        renew_s: float = RENEW_S,
    ) -> None:
        self.record, self._write, self._clear, self._renew_s = record, write, clear, renew_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="salient-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._renew_s):
            self.record = {**self.record, "renewed": now()}
            # a failed renewal is retried next time; a lapse only lets another driver take
            # over, which resumes the same shards
            with contextlib.suppress(Exception):
                self._write(self.record)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def release(self) -> None:
        """Stop renewing and clear the lease (the generation is free for the next driver)."""
        self.stop()
        self._clear()
