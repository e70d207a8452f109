"""``salient index``: existing webdataset shards adopted in place, without rewriting a tar.

The work is :func:`salient.pipeline.adopt.index_shards` (docs/ARCHITECTURE.md, "Data model",
"Adopted shards"); this module is the job around it: its config (the flags), the progress
bar, and the summary. Only ``manifest.json`` and ``ids.tsv`` are written: beside the shards,
or into ``--out`` when the shards' location is read-only (http(s), a bucket without write
access), whose manifest then names the shards' location as its ``root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient import urls
from salient.jobs.runtime.progress import progress_bar
from salient.pipeline.adopt import AdoptError, index_shards
from salient.pipeline.manifest import MANIFEST_NAME
from salient.settings import check_fields, ranged

__all__ = ["IndexConfig", "render_index", "run_index"]


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


def run_index(config: IndexConfig) -> dict:
    """Index the shards; returns the summary: ``manifest`` (where it was written), ``root``
    (where the shards are), ``shards``, ``samples``, ``shard_size`` (the id stride),
    ``unused_ids`` (ids after short shards), ``skipped`` (samples without a usable image,
    and files that are no shard), ``first_skipped`` (up to 3 of them with their reasons),
    ``classes``, ``fingerprint``.

    Raises AdoptError (nothing to index, an unreadable tar, a key twice in a shard, an
    ``out`` that cannot take the manifest) and StorageError, each before the manifest is
    written.
    """
    with progress_bar(None, "samples") as advance:
        manifest = index_shards(
            config.shards,
            config.out,
            pattern=config.pattern,
            image=config.image_field,
            label_key=config.label_key,
            classes_from=config.classes_from,
            overwrite=config.overwrite,
            workers=config.workers,
            progress=advance,
        )
    out = urls.normalise(config.out or config.shards)
    num_ids = manifest.shards[-1].stop_id
    return {
        "manifest": urls.join(out, MANIFEST_NAME),
        "root": manifest.root or out,
        "shards": len(manifest.shards),
        "samples": manifest.num_samples,
        "shard_size": manifest.shard_size,
        "unused_ids": num_ids - manifest.num_samples,
        "skipped": len(manifest.skipped),
        "first_skipped": manifest.skipped[:3],
        "classes": len(manifest.classes or []),
        "fingerprint": manifest.fingerprint,
    }


def render_index(summary: dict) -> str:
    """What ``salient index`` prints: what was adopted, and where the manifest went."""
    lines = [
        f"indexed {summary['samples']} samples in {summary['shards']} shards of "
        f"{summary['root']} (no tar rewritten); {summary['classes']} classes",
        f"manifest: {summary['manifest']} (use its folder as --data)",
        f"ids: shard i holds ids from i × {summary['shard_size']}; "
        f"{summary['unused_ids']} ids after short shards are unused",
    ]
    if summary["skipped"]:
        first = "; ".join(
            f"{s.get('shard')}/{s.get('key', '')}: {s.get('reason')}"
            for s in summary["first_skipped"]
        )
        lines.append(
            f"skipped {summary['skipped']} (kept their ids; readers count them as corrupt): "
            f"{first}" + (" …" if summary["skipped"] > 3 else "")
        )
    return "\n".join(lines) + "\n"
