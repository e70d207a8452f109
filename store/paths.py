"""Where a saliency store lives and how its names and attrs are spelled.

URLs (a local path opens zarr's ``LocalStore``, any other URL its ``FsspecStore`` with the
storage options of ``salient.urls``), generation names ``gen-NNNNNN``, ISO 8601 UTC time
stamps, and the checks on values before they become attrs. Module-level helpers of
:class:`~salient.store.store.SaliencyStore`; importing this module touches no disk.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import zarr
from zarr.storage import FsspecStore

from salient import urls
from salient.store.errors import StoreError
from salient.store.generation import Layout

__all__ = [
    "GENERATION",
    "age_s",
    "dataset_layout",
    "generation_name",
    "json_value",
    "normalise",
    "now",
    "occupied",
    "open_root",
    "orphan_generations",
    "positive_int",
    "same_maps",
    "store_exists",
    "store_like",
]

GENERATION = re.compile(r"^gen-(\d{6,})$")


# ---------------------------------------------------------------- URLs


def normalise(url: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (``salient.urls`` decides which)."""
    return urls.normalise(url)


def store_like(url: str) -> dict:
    """What zarr opens, as keywords: a Path gives LocalStore (atomic writes), a URL zarr's
    FsspecStore on the filesystem of ``salient.urls`` (its storage options, timeouts and retry
    budget; a filesystem without an async API, e.g. ``memory://``, as zarr wraps it)."""
    if not urls.is_remote(url):
        return {"store": Path(url)}
    fs, path = urls.filesystem(url, asynchronous=True)
    if not fs.async_impl:
        return {"store": url, "storage_options": urls.fsspec_options(url)}
    return {"store": FsspecStore(fs, path=path)}


def open_root(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(**store_like(url), mode=mode, zarr_format=3, use_consolidated=False)


def _root_exists(url: str) -> bool:
    if not urls.is_remote(url):
        return (Path(url) / "zarr.json").is_file()
    with urls.storage_errors(url):
        try:
            open_root(url)
        except FileNotFoundError:
            return False
    return True


def orphan_generations(url: str | os.PathLike) -> list[str]:
    """Generation groups (``gen-*/zarr.json``) below ``url``; with no root ``zarr.json`` beside
    them the store is damaged, not absent."""
    url = normalise(url)
    if not urls.is_remote(url):
        paths = Path(url).glob("gen-*/zarr.json") if Path(url).is_dir() else []
        names = [p.parent.name for p in paths]
    else:
        with urls.storage_errors(url):
            names = [n for n in urls.list_names(url) if urls.read_bytes(f"{url}/{n}/zarr.json")]
    return sorted(n for n in names if GENERATION.match(n))


def store_exists(url: str | os.PathLike) -> bool:
    """Whether a store lives at ``url``, whole or damaged (generations without the root's
    ``zarr.json``: ``SaliencyStore.open`` names what is missing); creates nothing."""
    url = normalise(url)
    return _root_exists(url) or bool(orphan_generations(url))


def occupied(url: str) -> bool:
    if urls.is_remote(url):
        return bool(urls.list_names(url))
    path = Path(url)
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


# ---------------------------------------------------------------- small helpers


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")  # sorts as text


def age_s(stamp: str) -> float:
    return time.time() - datetime.fromisoformat(stamp).timestamp()


def generation_name(number: int) -> str:
    return f"gen-{number:06d}"


def json_value(value, what: str):
    """``value`` as zarr attrs will give it back (tuples become lists); StoreError if not JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{what} must be JSON-serialisable ({exc}); pass plain str / int / "
            "float / list / dict values"
        ) from None


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoreError(f"{what} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------- checks against a store


class StoredShard(Protocol):
    """What the store reads of a shard: its id range."""

    first_id: int
    count: int

    @property
    def stop_id(self) -> int: ...


class StoredDataset(Protocol):
    """What the store reads of a dataset (``salient.pipeline.manifest.Dataset`` is one;
    ``salient.store.testing.SyntheticDataset`` another)."""

    root: str

    @property
    def num_samples(self) -> int: ...

    @property
    def shard_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def shards(self) -> Sequence[StoredShard]: ...


def dataset_layout(dataset: StoredDataset, grid: int) -> Layout:
    """The store layout of ``dataset``: shard ``i`` holds ids from ``i · shard_size``, at most
    ``shard_size`` of them; StoreError when it does not (or has no fingerprint)."""
    size = positive_int(dataset.shard_size, "shard_size")
    shards = dataset.shards
    counts = tuple(s.count for s in shards)
    dense = all(c == size for c in counts[:-1])
    layout = Layout(shards[-1].stop_id, size, positive_int(grid, "grid"), None if dense else counts)
    found = [(s.first_id, s.stop_id) for s in shards]
    expected = [layout.shard_range(i) for i in range(len(shards))]
    if not dataset.fingerprint or layout.num_shards != len(shards) or found != expected:
        raise StoreError(
            f"the dataset at {dataset.root} does not have shards at multiples of "
            f"{size} ids and a fingerprint; open it with "
            "salient.pipeline.manifest.open_dataset (re-run ingest if that fails)"
        )
    return layout


def same_maps(attrs: dict, describe: dict) -> bool:
    """Would a generation begun with ``describe`` hold the same maps as one with ``attrs``?"""

    def key(meta: dict) -> dict:
        # where the file lies and what it is called do not change the maps; its bytes do
        teacher = {k: v for k, v in meta["teacher"].items() if k not in ("path", "name", "source")}
        return {**{k: meta.get(k) for k in describe if k != "teacher"}, "teacher": teacher}

    sha = describe["teacher"].get("sha256")
    real = isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None
    return real and key(attrs) == key(describe)
