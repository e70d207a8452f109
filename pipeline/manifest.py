"""The dataset manifest: shards, their id ranges, and the dataset fingerprint.

A dataset directory written by ``salient ingest`` holds ``shard-000000.tar`` … and
``manifest.json``. Every image has a dense sample id ``0..N-1``; shard ``i`` holds the
contiguous ids ``[first_id, first_id + count)`` and every shard but the last holds exactly
``shard_size`` samples, so shard ``i`` is also zarr chunk ``i`` of the saliency store.

Reading side: :func:`open_dataset` validates the manifest against the shard files (a local
directory, or a prefix on object storage or behind http(s), see ``salient.urls``) and returns a
:class:`Dataset` whose shards carry their URLs and id ranges. The shards themselves are read
through ``salient.pipeline.shards``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from salient import urls
from salient.errors import SalientError

__all__ = [
    "FORMAT",
    "KEY_WIDTH",
    "MANIFEST_NAME",
    "Dataset",
    "DatasetError",
    "Manifest",
    "ShardInfo",
    "fingerprint",
    "open_dataset",
    "sample_key",
    "shard_name",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "salient-dataset/1"
KEY_WIDTH = 9  # zero-padded sample id: up to 10^9 images; no '.' (webdataset splits keys on it)


class DatasetError(SalientError):
    """A dataset directory that is missing, incomplete or inconsistent with its manifest."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_WIDTH}d}"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name, first sample id, sample count and byte size."""

    index: int
    name: str
    first_id: int
    count: int
    bytes: int

    @property
    def stop_id(self) -> int:
        return self.first_id + self.count


def fingerprint(shards: list[ShardInfo], num_samples: int) -> str:
    """Hash of shard names, counts and id ranges: what the saliency store checks."""
    rows = [[s.name, s.first_id, s.count] for s in shards]
    blob = json.dumps({"num_samples": num_samples, "shards": rows}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds."""

    num_samples: int
    shard_size: int
    shards: list[ShardInfo]
    classes: list[str] | None
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    demo: dict | None = None
    format: str = FORMAT
    fingerprint: str = ""

    def to_json(self) -> str:
        body = asdict(self)
        body["fingerprint"] = self.fingerprint or fingerprint(self.shards, self.num_samples)
        return json.dumps(body, indent=1)

    @classmethod
    def from_dict(cls, body: dict) -> Manifest:
        shards = [ShardInfo(**s) for s in body["shards"]]
        return cls(**{**body, "shards": shards})


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: ``root`` is an absolute local path or a URL."""

    root: str
    manifest: Manifest

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def shard_size(self) -> int:
        return self.manifest.shard_size

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def shard_url(self, shard: ShardInfo) -> str:
        return urls.join(self.root, shard.name)

    def shard_urls(self) -> list[str]:
        return [self.shard_url(s) for s in self.shards]

    def shard_of(self, sample_id: int) -> ShardInfo:
        """The shard that holds ``sample_id``; raises DatasetError when out of range."""
        if not 0 <= sample_id < self.num_samples:
            raise DatasetError(
                f"sample id {sample_id} is out of range: the dataset at {self.root} "
                f"holds ids 0..{self.num_samples - 1}"
            )
        return self.shards[sample_id // self.shard_size]


def _read_manifest(root: str) -> Manifest:
    path = urls.join(root, MANIFEST_NAME)
    if not urls.is_remote(root) and not os.path.isdir(root):
        raise DatasetError(f"dataset directory {root} does not exist; run `salient ingest` first")
    text = urls.read_bytes(path)
    if text is None:
        raise DatasetError(
            f"{root} holds no {MANIFEST_NAME}: it is not a dataset written by `salient ingest` "
            "(or the bucket or prefix does not exist)"
        )
    try:
        manifest = Manifest.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(
            f"{path} is not a valid salient manifest ({exc}); re-run ingest"
        ) from None
    if manifest.format != FORMAT:
        raise DatasetError(f"{path} has format {manifest.format!r}, expected {FORMAT!r}")
    return manifest


def _check_layout(manifest: Manifest, path: str) -> None:
    expected_first = 0
    for i, shard in enumerate(manifest.shards):
        last = i == len(manifest.shards) - 1
        if shard.index != i or shard.first_id != expected_first:
            raise DatasetError(f"{path}: shard {shard.name} breaks the contiguous id layout")
        if shard.count <= 0 or (not last and shard.count != manifest.shard_size):
            raise DatasetError(
                f"{path}: shard {shard.name} holds {shard.count} samples, "
                f"expected {manifest.shard_size}"
            )
        expected_first = shard.stop_id
    if expected_first != manifest.num_samples:
        raise DatasetError(
            f"{path}: shards hold {expected_first} ids but the manifest says {manifest.num_samples}"
        )
    if fingerprint(manifest.shards, manifest.num_samples) != manifest.fingerprint:
        raise DatasetError(
            f"{path}: the fingerprint does not match the shard list; "
            "the manifest was edited by hand or is damaged — re-run ingest"
        )


def _check_files(root: str, manifest: Manifest) -> None:
    found = urls.sizes(root, [shard.name for shard in manifest.shards])
    for shard in manifest.shards:
        size = found[shard.name]
        if size is None:
            raise DatasetError(
                f"shard {shard.name} listed in {urls.join(root, MANIFEST_NAME)} is missing; "
                "restore it or re-run `salient ingest`"
            )
        if size != shard.bytes:
            raise DatasetError(
                f"shard {urls.join(root, shard.name)} is truncated or altered: {size} bytes "
                f"stored, {shard.bytes} in the manifest; re-run `salient ingest`"
            )


def open_dataset(root: str | os.PathLike) -> Dataset:
    """Open and validate a dataset written by ``salient ingest``: a local directory, or a URL
    (``s3://``, ``gs://``, ``http(s)://``, ``file://``).

    Raises:
        DatasetError: no such directory, no or invalid manifest, a shard missing or of the
            wrong size (truncated), or an id layout that is not contiguous.
        StorageError: a URL that cannot be read (no client installed, denied, unreachable).
    """
    root = urls.normalise(root)
    manifest = _read_manifest(root)
    _check_layout(manifest, urls.join(root, MANIFEST_NAME))
    _check_files(root, manifest)
    return Dataset(root=root, manifest=manifest)
