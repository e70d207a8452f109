"""Ctrl-C in a job: what it kept and the command that continues it.

A job that is stopped by Ctrl-C (``KeyboardInterrupt``) raises :class:`Interrupted` from it,
naming what stays usable (a checkpoint, the shards a refresh wrote) and, when it is not the
same command line again, the command that continues; the CLI prints both as one line and
exits 130 (README, "Ctrl-C").
"""

from __future__ import annotations

__all__ = ["Interrupted"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with ``kept`` (what stays usable) and ``resume`` (the command that continues,
    or None: the same command line, plus ``flags`` it lacks, less ``drop``: flags that would
    undo what was kept, such as ``--fresh``)."""

    def __init__(
        self,
        kept: str,
        resume: str | None = None,
        flags: tuple[str, ...] = (),
        drop: tuple[str, ...] = (),
    ) -> None:
        super().__init__(kept)
        self.kept, self.resume, self.flags, self.drop = kept, resume, flags, drop
