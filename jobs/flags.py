"""Flags from config dataclasses: every field of a job's frozen config is a command-line flag.

Conventions (a field is a flag without writing one):

- ``mask_ratio: float = 0.45`` is ``--mask-ratio``; its help is the field's attribute
  docstring, the string literal right after it (parsed from the source with ``ast``).
- Types: ``str``, ``int``, ``float``; ``bool`` is ``--gpu`` / ``--no-gpu``; ``X | None`` takes
  an X (``None`` is the default, or ``null`` in a config file); ``tuple[float, float]`` takes
  two values; ``tuple[int, ...]`` and ``tuple[str, ...]`` a comma-separated list; ``dict`` is
  ``--strategy-option KEY=VALUE``, repeatable, with VALUE read as JSON when it parses
  (``0.5``, ``[0, 0.5]``, ``true``) and as a string otherwise.
- ``field(metadata=...)``: ``"choices"`` (a zero-argument callable returning the allowed names,
  called when the parser is built, so registries stay the single source), ``"positional"``,
  ``"hidden"`` (a testing aid: a flag without help), ``"flag"`` (another flag spelling).

Values are layered, later wins: the dataclass defaults, a preset (``--recipe``), ``--config
FILE`` (JSON or YAML; a run's own ``config.json`` works as one), then the flags given. The
config class checks the result in ``__post_init__``. Why a small generator and not tyro or
jsonargparse: README, Decisions ("The CLI is generated from the configs").

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from salient.errors import SalientError
from salient.settings import flag_name

__all__ = [
    "ConfigFileError",
    "add_config_flags",
    "build_config",
    "config_dict",
    "declared_field",
    "field_docs",
    "flag_name",
    "load_config_file",
]


class ConfigFileError(SalientError):
    """A ``--config`` file that cannot be read, or that names settings the job does not have."""


# ---------------------------------------------------------------- help from the source


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the attribute docstrings of ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen binary): flags without help
            continue
        body = ast.parse(source).body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


# ---------------------------------------------------------------- settings declared elsewhere


def declared_field(cls: type, name: str, **changes: Any) -> Any:
    """Field ``name`` of the dataclass ``cls`` (a library's settings) as a field of a job's
    config, the flag that sets it: the same default, unless ``changes`` gives another, and the
    same metadata (range, choices), so they are declared once, with the setting they belong
    to (``TrainConfig``'s iBOT flags take ``IBOTSettings``'s)."""
    declared = cls.__dataclass_fields__[name]
    kwargs: dict[str, Any] = {"metadata": declared.metadata}
    if declared.default is not dataclasses.MISSING:
        kwargs["default"] = declared.default
    else:
        kwargs["default_factory"] = declared.default_factory
    if "default" in changes:
        kwargs.pop("default_factory", None)
    return dataclasses.field(**{**kwargs, **changes})


# ---------------------------------------------------------------- types


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    return key.strip(), _json_or_text(value.strip())


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,5,9 (got {text!r})"
        ) from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _argument(field: dataclasses.Field, hint: Any) -> dict:
    """argparse keywords for one field (type, nargs, action)."""
    base = _unwrap_optional(hint)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base is dict or origin is dict:
        return {"action": "append", "type": _key_value, "metavar": "KEY=VALUE"}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
        return {"type": _name_list, "metavar": "NAME,NAME,..."}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": _int_list, "metavar": "N,N,..."}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args), "metavar": ("LOW", "HIGH")[: len(args)]}
    if base in (int, float, str):
        metavar = {int: "N", float: "X"}.get(base, field.name.upper())
        if "choices" in field.metadata:  # listed in the help (see _help), not in the usage line
            return {"type": base, "choices": sorted(field.metadata["choices"]()), "metavar": "NAME"}
        return {"type": base, "metavar": metavar}
    raise TypeError(f"no flag for field {field.name} of type {hint!r}")  # a bug, not user input


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, bool):
        return f"default: {'on' if value else 'off'}"
    if value in (None, {}, ()):
        return ""
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # as the flag takes it
    return f"default: {value}"


def _help(field: dataclasses.Field, doc: str | None, hint: Any) -> str:
    if field.metadata.get("hidden"):
        return argparse.SUPPRESS
    notes = [_default_text(field)]
    if "range" in field.metadata:
        notes.insert(0, field.metadata["range"].describe(_unwrap_optional(hint) is int))
    if "choices" in field.metadata:
        notes.insert(0, "one of " + ", ".join(sorted(field.metadata["choices"]())))
    notes = "; ".join(n for n in notes if n)
    doc = (doc or "").replace("%", "%%")  # argparse formats help with %
    return f"{doc} ({notes})" if doc and notes else doc or notes


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag (or positional) per field of the dataclass ``cls``; every default is
    ``SUPPRESS`` so the namespace holds exactly the flags given."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kwargs = {
            **_argument(field, hints[field.name]),
            "help": _help(field, docs.get(field.name), hints[field.name]),
        }
        kwargs["default"] = argparse.SUPPRESS
        if field.metadata.get("positional"):
            # argparse checks an omitted positional's SUPPRESS default against its choices:
            # the config's own check names the choices instead.
            kwargs.pop("choices", None)
            kwargs["metavar"] = field.name.upper()
            parser.add_argument(field.name, nargs="?", **kwargs)
        else:
            parser.add_argument(flag_name(field), dest=field.name, **kwargs)


# ---------------------------------------------------------------- values


def _coerce(value: Any, hint: Any) -> Any:
    """A value from JSON / YAML / argparse as the field's type wants it (lists → tuples,
    ``[KEY, VALUE]`` pairs → a dict)."""
    base = _unwrap_optional(hint)
    if value is None:
        return None
    if typing.get_origin(base) is tuple and isinstance(value, list):
        return tuple(value)
    if (base is dict or typing.get_origin(base) is dict) and isinstance(value, list):
        return dict(value)  # --x K=V pairs from argparse
    return value


def load_config_file(path: str) -> dict:
    """The settings in a JSON or YAML file (a mapping of field names to values)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigFileError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors
        raise ConfigFileError(f"--config {path} is not valid JSON / YAML: {exc}") from None
    if not isinstance(body, dict):
        raise ConfigFileError(
            f"--config {path} must hold a mapping of settings (got a {type(body).__name__})"
        )
    return body


def _checked_keys(values: Mapping, cls: type, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        close = {n: difflib.get_close_matches(n, names, 1) for n in unknown}
        hints = [f"'{n}' → '{close[n][0]}'" for n in unknown if close[n]]
        raise ConfigFileError(
            f"{where} sets {', '.join(repr(n) for n in unknown)}, which this job does not have; "
            + (f"did you mean {', '.join(hints)}? " if hints else "")
            + "its settings are the flags of `--help`, spelt with underscores"
        )
    return dict(values)


def build_config(
    cls: type,
    given: Mapping[str, Any],
    config_file: str | None = None,
    preset: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    command: str = "",
) -> Any:
    """``cls(**values)`` from the layers: defaults < ``preset`` < ``config_file`` < ``given``.

    ``preset`` is a mapping, or a function of the values set above it (the file's and the
    flags') returning the preset's values, so a preset can follow what the user set (a
    recipe's schedule follows ``--epochs``: ``salient.jobs.train.recipes.fitted``).

    Raises ConfigFileError (unreadable file, unknown keys), SalientError (a required setting
    missing), and whatever ``cls.__post_init__`` raises for values that do not fit.
    """
    above = {}
    if config_file is not None:
        above.update(_checked_keys(load_config_file(config_file), cls, f"--config {config_file}"))
    above.update(given)
    if callable(preset):
        preset = preset(above)
    values = {**_checked_keys(preset or {}, cls, "the preset"), **above}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [
        flag_name(f) if not f.metadata.get("positional") else f.name.upper()
        for f in fields.values()
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SalientError(
            f"{command or cls.__name__} needs {' and '.join(missing)} "
            f"(see `salient {command} --help`)"
        )
    return cls(**{name: _coerce(value, hints[name]) for name, value in values.items()})


def config_dict(config: Any) -> dict:
    """The config as plain JSON values (what ``--print-config`` shows and ``--config`` reads)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
