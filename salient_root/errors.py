"""The root of every error a user can fix, and the rule for cleanups on a failure path.

The CLI catches :class:`SalientError`, prints its message as one line and exits 2; anything
else is a bug and keeps its traceback.

A cleanup that runs while an error propagates (releasing a lease, removing a staged file)
never replaces that error: :func:`cleanup_after` runs it and, should it fail too, adds the
failure to the first error as a note (shown under a traceback, not in the one-line message).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SalientError", "cleanup_after"]


class SalientError(Exception):
    """An error the user can fix: the message says what is wrong and what to do."""


def cleanup_after(error: BaseException | None, cleanup: Callable[[], object], what: str) -> None:
    """Run ``cleanup``. With ``error`` (the exception propagating), a failure of ``cleanup``
    becomes a note on ``error`` — ``what`` names the cleanup — and the caller re-raises
    ``error``; without one, the failure raises as usual."""
    if error is None:
        cleanup()
        return
    try:
        cleanup()
    except Exception as failed:
        text = (str(failed).splitlines() or [""])[0][:300]
        error.add_note(f"{what} failed too: {type(failed).__name__}: {text}")
