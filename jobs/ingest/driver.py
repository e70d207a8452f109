"""``salient ingest``: an image folder, or the bundled demo set, into webdataset shards.

The work is :mod:`salient.pipeline.ingest`; this module is the job around it: the progress
bar and the JSON summary (its flags: ``config``).
"""

from __future__ import annotations

from salient.jobs.ingest.config import IngestConfig
from salient.jobs.runtime.interrupt import Interrupted
from salient.jobs.runtime.progress import progress_bar
from salient.pipeline.ingest import ingest_demo, ingest_folder

__all__ = ["run_ingest"]


def run_ingest(config: IngestConfig) -> dict:
    """Run the ingest; returns the JSON summary (out, images, shards, skipped, classes,
    fingerprint). Raises IngestError for bad input (see :mod:`salient.pipeline.ingest`)."""

    try:
        manifest = _ingest(config)
    except KeyboardInterrupt:
        raise Interrupted(
            "no dataset (its manifest.json comes last, so no job reads the shards written)",
            flags=("--overwrite",),
        ) from None
    return {
        "out": config.out,
        "images": manifest.num_samples,
        "shards": len(manifest.shards),
        "skipped": len(manifest.skipped),
        "classes": len(manifest.classes or []),
        "fingerprint": manifest.fingerprint,
    }


def _ingest(config: IngestConfig):
    if config.demo:
        with progress_bar(config.n, "demo scenes") as bar:
            manifest = ingest_demo(
                config.out,
                n=config.n,
                seed=config.seed,
                overwrite=config.overwrite,
                shard_size=config.shard_size,
                image_size=config.image_size,
                progress=bar,
                split=config.split,
                variant=config.variant,
            )
    else:
        with progress_bar(None, "images") as bar:
            manifest = ingest_folder(
                config.src,
                config.out,
                shard_size=config.shard_size,
                overwrite=config.overwrite,
                progress=bar,
                classes_from=config.classes_from,
            )
    return manifest
