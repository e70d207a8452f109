"""Package re-exports that load their module on first use (PEP 562).

A job's package (``salient.jobs.train``) re-exports its public names, so
``salient.jobs.train.TrainConfig`` works; importing the package must not import its driver,
which loads torch, timm and Ray. With :func:`lazy_exports` the package's ``__getattr__``
imports the module that defines a name when the name is first read, and the CLI, which
imports only a job's config module, parses flags before those libraries load
(docs/ARCHITECTURE.md, "Start-up").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], object]]:
    """``(__all__, __getattr__)`` of ``package`` re-exporting ``modules`` (each module, relative
    to the package when it starts with a dot, → the names it defines)."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name], package), name)

    return sorted(home), __getattr__
