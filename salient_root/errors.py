"""The root of every error a user can fix, and the rule for cleanups on a failure path.

The CLI catches :class:`SalientError`, prints its message as one line and exits 2; anything
else is a bug and keeps its traceback. A library's own long text inside a message (torch's
list of every mismatched tensor) is cut to its first item and a count by :func:`brief`.

A cleanup that runs while an error propagates (releasing a lease, removing a staged file)
never replaces that error: :func:`cleanup_after` runs it and, should it fail too, adds the
failure to the first error as a note (shown under a traceback, not in the one-line message).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["SalientError", "brief", "cleaned_up", "cleanup_after"]


class SalientError(Exception):
    """An error the user can fix: the message says what is wrong and what to do.

    ``names_fields``: its message names a job's settings by their field names, which the CLI
    shows as the job's flags (``batch_size`` as ``--batch-size``). An error about a file's
    own keys (a dataset manifest's ``shard_size``) sets it False and is shown as written."""

    names_fields = True


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


@contextlib.contextmanager
def cleaned_up(cleanup: Callable[[], object], what: str) -> Iterator[None]:
    """Run ``cleanup`` when the block ends. When the block raises, a failure of ``cleanup``
    is a note on the block's error (:func:`cleanup_after`), never the error shown."""
    try:
        yield
    except BaseException as error:
        cleanup_after(error, cleanup, what)
        raise
    cleanup()


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
