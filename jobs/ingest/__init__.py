"""``salient ingest``: an image folder, or the bundled demo set, into webdataset shards
(``driver``), its flags in ``config``. The names below load their module on first use
(``salient.lazy``), so parsing the flags loads no torch."""

from salient.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        ".config": ["IngestConfig"],
        ".driver": ["run_ingest"],
    },
)
