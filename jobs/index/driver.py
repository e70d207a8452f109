"""``salient index``: existing webdataset shards adopted in place, without rewriting a tar.

The work is :func:`salient.pipeline.adopt.index_shards` (docs/ARCHITECTURE.md, "Data model",
"Adopted shards"); this module is the job around it: the progress bar and the summary (its
flags: ``config``). Only ``manifest.json`` and ``ids.tsv`` are written: beside the shards, or
into ``--out`` when the shards' location is read-only (http(s), a bucket without write access),
whose manifest then names the shards' location as its ``root``.
"""

from __future__ import annotations

from salient import urls
from salient.jobs.index.config import IndexConfig
from salient.jobs.runtime.progress import progress_bar
from salient.pipeline.adopt import index_shards
from salient.pipeline.manifest import MANIFEST_NAME

__all__ = ["render_index", "run_index"]


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
        f"indexed {summary['samples']} samples in {summary['shards']} "
        f"shard{'s' if summary['shards'] != 1 else ''} of "
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
