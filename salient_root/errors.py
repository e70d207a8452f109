"""The root of every error a user can fix.

The CLI catches :class:`SalientError`, prints its message as one line and exits 2; anything
else is a bug and keeps its traceback.
"""

__all__ = ["SalientError"]


class SalientError(Exception):
    """An error the user can fix: the message says what is wrong and what to do."""
