"""A training run's records, read in one place: ``RUN/metrics.jsonl`` and its scalars.

Rank 0 writes ``metrics.jsonl`` (one JSON object a line: ``kind`` ``start``, ``epoch``,
``refresh_start``, ``refresh``, ``eval`` and the refresh's progress events) and every rank its
steps in ``metrics/rank-R.jsonl``. Everything that shows a run reads them through here: the
driver's console and summary, the TensorBoard event files (``RUN/tb/``, tags from
:func:`scalars`), and ``salient inspect --run-dir``'s curves.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "STEPS", "Follow", "generation_number", "read_records", "scalars"]

METRICS = "metrics.jsonl"  # rank 0's run records, in the run directory
STEPS = "metrics/rank-{rank}.jsonl"  # each rank's step records

# Fields that place a record (the axis, its run) rather than measure something.
_PLACES = frozenset({"kind", "epoch", "epochs_done", "step", "time", "rank", "run", "pid"})
_GENERATION = re.compile(r"^gen-(\d+)$")


def read_records(path: str | Path) -> list[dict]:
    """Every complete record of a JSONL file (a line still being written is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse(path.read_bytes())


def _parse(data: bytes) -> list[dict]:
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


class Follow:
    """The new complete records of a JSONL file that grows (it may not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path, self._offset = Path(path), 0

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += data.rfind(b"\n") + 1  # a line still being written waits
        return _parse(data)


def generation_number(name: str | None) -> int | None:
    """``gen-000003`` → 3 (a number TensorBoard can plot); None for no generation."""
    found = _GENERATION.match(name or "")
    return int(found.group(1)) if found else None


def scalars(record: dict) -> dict[str, float]:
    """``{tag: value}`` of every finite number in ``record``, tagged ``KIND/FIELD`` (nested
    dicts ``KIND/FIELD/KEY``, e.g. ``eval/knn/cls/top1``), generations as their numbers;
    the fields that place a record (epoch, step, time, …) are its axis, not scalars."""
    kind = record.get("kind", "record")
    found: dict[str, float] = {}
    for key, value in record.items():
        if key in _PLACES:
            continue
        if key == "generation":
            value = generation_number(value)
        _numbers(f"{kind}/{key}", value, found)
    return found


def _numbers(tag: str, value: Any, found: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _numbers(f"{tag}/{key}", inner, found)
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        found[tag] = float(value)
