"""Which teacher made a generation's maps: read from the ``teacher`` attr a refresh records.

A refresh records its teacher's metadata in every generation (``trainer.teacher_load``):
``source`` (``checkpoint``: a salient training checkpoint; ``timm``: a timm ViT, with its
weights file or random), ``path`` (the checkpoint, or the timm weights file), ``sha256`` (of
that file; ``"random"`` for random weights), ``name`` (the checkpoint's model, or the timm
name), ``epoch`` (the checkpoint's), and the map's ``kind``, ``block``, ``head``, ``reduce``.
Generations recorded before ``source`` existed are told apart by their ``epoch``: only a
checkpoint has one.

These functions read that record for people (``salient gc``, ``salient inspect``) and for
training, which states which teacher's maps each epoch used and, with ``--maps own``, binds
only generations its own checkpoints made (docs/ARCHITECTURE.md, "Trainer", "Whose maps").
Importing this module touches no disk and imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["describe_teacher", "made_by_run", "provenance", "teacher_source"]


def teacher_source(meta: dict | None) -> str | None:
    """``"checkpoint"``, ``"timm"`` or None (no teacher recorded)."""
    if not isinstance(meta, dict):
        return None
    source = meta.get("source")
    if source in ("checkpoint", "timm"):
        return source
    return "checkpoint" if meta.get("epoch") is not None else "timm"  # recorded before source


def provenance(generation: str | None, meta: dict | None) -> dict | None:
    """``{"generation", "path" | "name", "sha256"}`` of the teacher behind ``generation``
    (``meta``: its ``teacher`` attr): a checkpoint by its path, a timm ViT by its name
    (``timm:NAME``); None without a generation."""
    if generation is None:
        return None
    source = teacher_source(meta)
    meta = meta or {}
    who = (
        {"path": meta.get("path")}
        if source == "checkpoint"
        else {"name": f"timm:{meta.get('name')}"}
        if source == "timm"
        else {"name": None}
    )
    return {"generation": generation, **who, "sha256": meta.get("sha256")}


def describe_teacher(meta: dict | None) -> str:
    """One phrase for people: ``checkpoint runs/amt/checkpoint-00040.pt (sha256 1a2b3c4d…,
    cls_attn, minmax_mean)`` or ``timm:vit_base_patch16_224 weights mae.pth (sha256 …)``."""
    source = teacher_source(meta)
    if source is None:
        return "no teacher recorded"
    sha = str(meta.get("sha256") or "")
    digest = "random weights" if sha == "random" else f"sha256 {sha[:12]}…"
    how = ", ".join(str(v) for v in (meta.get("kind"), meta.get("reduce")) if v)
    extra = f", {how}" if how else ""
    if source == "checkpoint":
        return f"checkpoint {meta.get('path')} ({digest}{extra})"
    weights = f" weights {Path(meta['path']).name}" if meta.get("path") else ""
    return f"timm:{meta.get('name')}{weights} ({digest}{extra})"


def made_by_run(meta: dict | None, run_dir: str | os.PathLike) -> bool:
    """Whether the teacher is a checkpoint of the training run in ``run_dir`` (an absolute
    path, as training resolves it): its file lies directly in that folder."""
    if teacher_source(meta) != "checkpoint" or not meta.get("path"):
        return False
    return Path(meta["path"]).parent == Path(run_dir)
