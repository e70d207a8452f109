"""The root of every error a user can fix, and the rule for cleanups on a failure path.

The CLI catches :class:`SalientError`, prints its message as one line and exits 2; anything
else is a bug and keeps its traceback. A library's own long text inside a message (torch's
list of every mismatched tensor) is cut to its first item and a count by :func:`brief`.

A cleanup that runs while an error propagates (releasing a lease, removing a staged file)
never replaces that error: :func:`cleanup_after` runs it and, should it fail too, adds the
failure to the first error as a note (shown under a traceback, not in the one-line message).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SalientError", "brief", "cleanup_after"]


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


def brief(text: str | BaseException, limit: int = 160) -> str:
    """A library's message as one short clause: its first line, or for a header followed by a
    list (torch's ``Error(s) in loading state_dict …:`` and a line per tensor) the first item
    and how many more; at most ``limit`` characters (cut with "…")."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return type(text).__name__ if isinstance(text, BaseException) else ""
    listed = lines[0].endswith(":") and len(lines) > 1
    first = lines[1] if listed else lines[0]
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return first + (f" (and {len(lines) - 2} more)" if listed and len(lines) > 2 else "")
