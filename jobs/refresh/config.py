"""``RefreshConfig``: one ``salient refresh`` job's settings, checked when built.

Its module imports no torch, timm or Ray, so that a parser, ``--help`` and a bad flag answer
before they load (docs/ARCHITECTURE.md, "Start-up"); the driver (``jobs.refresh.driver``)
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.jobs.runtime.placement import Ask
from salient.settings import DATASET, check_fields, ranged
from salient.trainer.specs import KINDS, REDUCES

__all__ = ["RefreshConfig", "RefreshError"]


class RefreshError(SalientError):
    """A refresh that cannot start or finish (wrong grid, no GPU, a shard that keeps failing)."""


@dataclass(frozen=True)
class RefreshConfig:
    """One refresh job: a teacher over every shard of ``data`` into a new generation of
    ``store``. ``data`` and ``store`` are local paths or URLs (``s3://``, ``gs://``; ``data``
    also ``http(s)://``)."""

    data: str = field(metadata=DATASET)
    """Dataset directory (or URL) written by `salient ingest`."""
    store: str
    """Saliency store path or URL; created when missing."""
    teacher: str
    """The teacher: a salient training checkpoint, or timm:NAME with --weights FILE."""
    weights: str | None = None
    """Local weights file (.safetensors or .pth) of a timm:NAME teacher; nothing is downloaded."""
    allow_random_teacher: bool = False
    """Accept timm:NAME without --weights: a random (seeded) teacher, for tests and benchmarks.
    Its generation is never resumed: random weights have no file sha256 to match, so a rerun
    after a crash starts a new generation."""
    kind: str = field(default="cls_attn", metadata={"choices": lambda: KINDS})
    """Map kind: cls_attn (CLS attention, AMT eq. 3-4), gpa (attention a patch receives, GPA
    eq. 4-5) or heads (per-head cls_attn maps)."""
    reduce: str | None = field(default=None, metadata={"choices": lambda: REDUCES})
    """How heads combine: mean (AMT eq. 4) or minmax_mean (each head min-max normalised, then
    averaged: AMT's code); unset = the kind's default (mean for cls_attn, the last head for gpa,
    GPA Table 5)."""
    block: int = -1
    """Block whose attention is read (negative counts from the end; -1 = the last)."""
    head: int | None = None
    """Read one head instead of combining them (negative counts from the end)."""
    image_size: int = field(default=224, metadata=ranged(ge=1))
    """Side S the teacher sees: each whole image is resized to S x S (maps are S/P cells wide)."""
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per teacher forward."""
    workers: int = field(default=1, metadata=ranged(ge=1))
    """Teacher actors (each holds the teacher and computes one shard at a time)."""
    gpus_per_worker: float = field(default=0.0, metadata=ranged(ge=0))
    """GPUs per actor; > 0 decodes JPEGs with nvjpeg and runs the teacher in bf16."""
    cpus_per_worker: float = field(default=0.5, metadata=ranged(gt=0))
    """Ray CPUs reserved per actor (fractions are fine; torch threads = max(1, int(this)))."""
    address: str | None = None
    """Ray cluster address (e.g. 10.0.0.5:6379 or auto); default: RAY_ADDRESS, else an embedded
    local Ray."""
    max_retries: int = field(default=3, metadata=ranged(ge=0))
    """Retries of a shard whose worker died before the job gives up."""
    placement_timeout_s: float = field(default=60.0, metadata=ranged(gt=0))
    """Seconds to wait for Ray to place the actors before stopping with what is missing."""
    wait_for_other: bool = False
    """When another live refresh is writing the same maps, wait for it and use its generation
    (default: refuse in one line)."""
    prefetch: bool = True
    """Read and decode the next batch in a background thread while the teacher computes."""
    shard_delay_s: float = field(default=0.0, metadata=ranged(ge=0, hidden=True))
    """Testing aid: each worker waits this long before writing a shard."""
    hold_while: str = field(default="", metadata={"hidden": True})
    """Testing aid: after writing a shard, each worker waits while this local file exists."""

    def __post_init__(self):
        for name in ("data", "store", "teacher"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RefreshError(f"refresh needs --{name} (got {getattr(self, name)!r})")
        check_fields(self, RefreshError)  # types, ranges and choices, declared with the fields

    def ask(self):
        """The actors' resources as a placement request."""

        flags = "--workers, --cpus-per-worker or --gpus-per-worker"
        return Ask.of(
            "refresh actor", self.workers, self.cpus_per_worker, self.gpus_per_worker, flags
        )
