"""Progress bars for long jobs (tqdm), quiet when stderr is not a terminal and CI is set."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

__all__ = ["progress_bar", "progress_wanted"]


def progress_wanted() -> bool:
    """Bars on a terminal, or anywhere with SALIENT_PROGRESS=1; never in logs and CI."""
    return sys.stderr.isatty() or os.environ.get("SALIENT_PROGRESS") == "1"


@contextlib.contextmanager
def progress_bar(total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a tqdm bar on a terminal (or with SALIENT_PROGRESS=1)."""
    from tqdm import tqdm

    with tqdm(
        total=total, unit=" " + unit, disable=not progress_wanted(), dynamic_ncols=True
    ) as bar:
        yield bar.update
