"""``salient ingest``'s flags: :class:`IngestConfig`, without the work (its shard reader and writer,
webdataset, import torch), so a mistyped flag answers at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.pipeline.demo import DEMO_SPLITS, DEMO_VARIANTS
from salient.pipeline.manifest import IngestError
from salient.settings import check_fields, ranged

__all__ = ["IngestConfig"]


@dataclass(frozen=True)
class IngestConfig:
    """One ingest. ``salient ingest SRC OUT`` for a folder, ``salient ingest --demo OUT``."""

    src: str | None = field(default=None, metadata={"positional": True})
    """Source folder: an ImageFolder tree (class sub-folders give integer labels) or a flat
    folder of images. Omit it with --demo."""
    out: str | None = field(default=None, metadata={"positional": True})
    """Output dataset directory; must be empty unless --overwrite."""
    demo: bool = False
    """Write the bundled demo dataset (scenes composed from scikit-image photos, with object
    boxes) instead of reading SRC."""
    n: int = field(default=2000, metadata=ranged(ge=1))
    """Demo: number of scenes."""
    seed: int = 0
    """Demo: seed of the scenes (the same seed gives byte-identical shards)."""
    image_size: int = field(default=192, metadata=ranged(ge=1))
    """Demo: side of each scene in pixels."""
    split: str = field(default="train", metadata={"choices": lambda: DEMO_SPLITS})
    """Demo: train, or val for held-out scenes (the same classes, scenes that never occur in
    the train split) to probe an encoder on."""
    variant: str = field(default="plain", metadata={"choices": lambda: DEMO_VARIANTS})
    """Demo: plain (each object keeps its photo's colours, which nearly name the class), or
    colour-random (each scene's object recoloured at random: hue rotated, grey, or tinted, so
    the classes differ in shape and texture, not colour)."""
    classes_from: str | None = None
    """Folder ingest: a dataset (e.g. the training split) whose class list and indices the
    labels keep, so this one can be its held-out set; its class folders must match."""
    shard_size: int | None = field(default=None, metadata=ranged(ge=1))
    """Samples per shard (every shard but the last holds exactly this many); default 1000,
    500 with --demo."""
    overwrite: bool = False
    """Replace a dataset that salient wrote before in OUT (nothing else is ever removed)."""

    def __post_init__(self):
        check_fields(self, IngestError)  # types, ranges and choices, declared with the fields
        if self.demo and self.out is None and self.src is not None:
            # `salient ingest --demo OUT`: the one positional given is OUT.
            object.__setattr__(self, "out", self.src)
            object.__setattr__(self, "src", None)
        if self.demo and self.src is not None:
            raise IngestError("give either SRC or --demo, not both")
        if self.out is None:
            raise IngestError("ingest needs SRC and OUT (or --demo OUT)")
        if not self.demo and self.src is None:
            raise IngestError("ingest needs SRC and OUT (or --demo OUT)")
        if self.classes_from is not None and self.demo:
            raise IngestError("--classes-from is for folder ingests; --demo splits share classes")
        if self.variant != "plain" and not self.demo:
            raise IngestError("--variant is for --demo; a folder's images are ingested as read")
        if self.split != "train" and not self.demo:
            raise IngestError("--split is for --demo; a folder's split is the folder you give")
        if self.shard_size is None:
            object.__setattr__(self, "shard_size", 500 if self.demo else 1000)
