"""Settings that check themselves: each field's type and range declared once, next to it.

A config dataclass (a job's, or the loader's) declares a field's range in its metadata::

    batch_size: int = field(default=64, metadata=ranged(ge=1))
    mask_ratio: float = field(default=0.45, metadata=ranged(gt=0, lt=1))

and calls :func:`check_fields` first thing in ``__post_init__``. Every field's value must
have its annotated type (``int`` is never a ``bool`` or a ``str``; ``float`` takes an
``int``; an ``X | None`` takes ``None``), lie in its range, and be among its ``"choices"``
(a zero-argument callable returning the allowed names from a registry). The message names
the field as the user spells it (``spell``: a job's flag, ``--batch-size``, or a library
field, ``batch_size``), so one check serves both. ``__post_init__`` keeps only the checks
that involve several fields. The CLI shows each range in its help (``salient.jobs.flags``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DATASET", "Range", "check_fields", "field_name", "flag_name", "flag_of", "ranged"]

# The metadata of a field naming a dataset the job reads (a path or URL written by ingest or
# index): the CLI reads a local one's manifest before the job's module (torch) loads, so a
# mistyped path answers at once (salient.jobs.cli).
DATASET = {"dataset": True}


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``ge`` / ``gt`` below, ``le`` / ``lt`` above (None: open)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, integer: bool) -> str:
        """``a positive integer``, ``an integer >= 0``, ``> 0``, ``in (0, 1)``, …"""
        low = (f"[{_num(self.ge)}" if self.ge is not None else None) or (
            f"({_num(self.gt)}" if self.gt is not None else None
        )
        high = (f"{_num(self.le)}]" if self.le is not None else None) or (
            f"{_num(self.lt)})" if self.lt is not None else None
        )
        if low and high:
            return f"in {low}, {high}"
        if integer and self.ge == 1 and not high:
            return "a positive integer"
        bound = (
            f">= {_num(self.ge)}"
            if self.ge is not None
            else f"> {_num(self.gt)}"
            if self.gt is not None
            else f"<= {_num(self.le)}"
            if self.le is not None
            else f"< {_num(self.lt)}"
        )
        return f"an integer {bound}" if integer else bound


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def ranged(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    """Field metadata holding a :class:`Range` (plus any other metadata given)."""
    return {**metadata, "range": Range(ge, gt, le, lt)}


def flag_name(field: dataclasses.Field) -> str:
    """A job setting as a flag: ``--batch-size`` (or the field's ``"flag"`` metadata)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name`` of the config class ``cls``."""
    return flag_name(cls.__dataclass_fields__[name])


def field_name(field: dataclasses.Field) -> str:
    """A library setting by its field name: ``batch_size``."""
    return field.name


def _base(hint: Any) -> tuple[Any, bool]:
    """The type of ``hint`` without ``None``, and whether ``None`` is allowed."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _type_error(value: Any, base: Any) -> str | None:
    """Why ``value`` is not a ``base`` (int, float, str, bool), or None."""
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "an integer"
    if base is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        return "a number"
    if base is bool and not isinstance(value, bool):
        return "true or false"
    if base is str and not isinstance(value, str):
        return "a string"
    return None


def check_fields(
    config: Any,
    error: type[Exception],
    spell: Callable[[dataclasses.Field], str] = flag_name,
) -> None:
    """Raise ``error`` naming the first field whose value is not of its type or out of range."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        base, optional = _base(hints[field.name])
        if value is None and optional:
            continue
        wanted = _type_error(value, base)
        if wanted is not None:
            raise error(f"{spell(field)} must be {wanted} (got {value!r})")
        bounds = field.metadata.get("range")
        if bounds is not None and not bounds.holds(value):
            raise error(f"{spell(field)} must be {bounds.describe(base is int)} (got {value!r})")
        choices = field.metadata.get("choices")
        if choices is not None and value not in (names := list(choices())):
            flag = spell(field)
            raise error(f"unknown {flag} {value!r}; {flag} must be one of {', '.join(names)}")
