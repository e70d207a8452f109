"""``salient index``'s flags: :class:`IndexConfig`, without the work (its shard reader and writer,
webdataset, import torch), so a mistyped flag answers at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.pipeline.manifest import AdoptError
from salient.settings import check_fields, ranged

__all__ = ["IndexConfig"]


@dataclass(frozen=True)
class IndexConfig:
    """One index of existing shards. ``salient index SHARDS [--out DIR]``."""

    shards: str | None = field(default=None, metadata={"positional": True})
    """The shards' folder or URL prefix (s3://bucket/imagenet/train, https://host/shards, a
    path); every tar whose name matches --pattern, in name order, becomes one shard."""
    out: str | None = None
    """Folder or URL prefix for manifest.json and ids.tsv; default: beside the shards (give one
    when they are read-only)."""
    pattern: str = "*.tar"
    """Which file names are shards (a glob, e.g. imagenet1k-train-*.tar)."""
    image_field: str | None = None
    """The image field of the samples (jpg, png, webp, …; any case); default: each sample's
    one image field."""
    label_key: str | None = None
    """Labels from this key of each sample's json field (a class index or a class name);
    default: the cls field."""
    classes_from: str | None = None
    """A dataset (e.g. the training split) whose class list the labels keep, so this one can
    be its held-out set."""
    overwrite: bool = False
    """Replace an index `salient index` wrote before (nothing else is ever replaced)."""
    workers: int = field(default=4, metadata=ranged(ge=1))
    """Shards read at a time (threads: reading and hashing release the GIL)."""

    def __post_init__(self):
        if not isinstance(self.shards, str) or not self.shards:
            raise AdoptError("index needs SHARDS, the folder or URL prefix of the tar shards")
        check_fields(self, AdoptError)  # types and ranges, declared with the fields
