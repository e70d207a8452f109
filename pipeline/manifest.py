"""The dataset manifest: shards, their id ranges, what each shard's bytes are, the fingerprint.

A dataset is tar shards plus ``manifest.json`` (docs/ARCHITECTURE.md, "Data model"). Shard ``i``
holds the ids ``[i·shard_size, i·shard_size + count_i)`` with ``1 ≤ count_i ≤ shard_size``, so
shard ``i`` is zarr chunk ``i`` of the saliency store; ``salient ingest`` fills every shard but
the last, an adopted dataset (``pipeline/adopt.py``) keeps the shards' own sizes and leaves the
ids after a short shard unused. A sample's id is its shard's first id plus its position in the
tar (what ``salient ingest`` writes as the key, too).

Reading side: :func:`open_dataset` validates the manifest (:func:`check_manifest`: one place,
before any work) and the shard files' sizes, and returns a :class:`Dataset` whose shards carry
their URLs, id ranges and digests. The shards themselves are read through
``salient.pipeline.shards``, which checks each shard's bytes against its digests as it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from salient import urls
from salient.errors import SalientError

__all__ = [
    "FORMAT",
    "HEAD_BYTES",
    "ID_MAP_NAME",
    "KEY_WIDTH",
    "MANIFEST_NAME",
    "MAX_SHARD_SIZE",
    "AdoptError",
    "Dataset",
    "DatasetError",
    "IngestError",
    "Manifest",
    "ShardChangedError",
    "ShardInfo",
    "ShardSource",
    "check_manifest",
    "check_shard_name",
    "fingerprint",
    "open_dataset",
    "sample_key",
    "shard_name",
]

MANIFEST_NAME = "manifest.json"
ID_MAP_NAME = "ids.tsv"  # an adopted dataset's keys: "id<TAB>shard<TAB>key" per line
FORMAT = "salient-dataset/2"  # /2 adds shard digests, root, image, label_key, id_map
READ_FORMATS = ("salient-dataset/1", FORMAT)  # /1: written by earlier ingests (no digests)
KEY_WIDTH = 9  # zero-padded sample id: up to 10^9 images; no '.' (webdataset splits keys on it)
HEAD_BYTES = 64 * 2**10  # the part of a shard checked before any of its samples is read
# Ids per shard at most: the saliency store writes a shard as one chunk of shard_size rows,
# so this bounds what one write holds (1e6 rows × 14 × 14 float16 = 392 MB).
MAX_SHARD_SIZE = 1_000_000
TAR_BLOCK = 512  # every tar member takes at least one 512-byte header block
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DatasetError(SalientError):
    """A dataset directory that is missing, incomplete or inconsistent with its manifest (its
    message names the manifest's own keys, never a job's flags)."""

    names_fields = False


class ShardChangedError(DatasetError):
    """A shard's bytes are not the ones its manifest recorded (replaced, edited, damaged)."""


# The errors of writing a manifest live here, beside the reader's, because this module loads
# no webdataset (which imports torch): the ingest and index jobs' configs raise them while the
# command line parses, before torch loads (docs/ARCHITECTURE.md, "Start-up").
class IngestError(SalientError):
    """Bad ingest input: missing source, unusable output directory, bad shard size."""


class AdoptError(SalientError):
    """Shards that cannot be adopted as given: none found, unreadable, ambiguous keys, a
    location that cannot hold the manifest."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_WIDTH}d}"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name, first sample id, sample count, byte size and digests
    (``sha256`` of the whole file, ``head_sha256`` of its first ``HEAD_BYTES``; empty in
    manifests written before digests were recorded)."""

    index: int
    name: str
    first_id: int
    count: int
    bytes: int
    sha256: str = ""
    head_sha256: str = ""

    @property
    def stop_id(self) -> int:
        return self.first_id + self.count


@dataclass(frozen=True)
class ShardSource:
    """What a reader needs to read one shard of a dataset: where it is, the ids and bytes the
    manifest recorded, the image field (None: the sample's one image field) and where labels
    come from (``label_key`` None: the ``cls`` field; else that key of the ``json`` field, a
    string label being looked up in ``classes``). Picklable: it travels to workers."""

    url: str
    shard: ShardInfo
    image: str | None = None
    label_key: str | None = None
    classes: tuple[str, ...] | None = None


def fingerprint(shards: list[ShardInfo], num_samples: int) -> str:
    """Hash of shard names, counts and id ranges: what the saliency store checks."""
    rows = [[s.name, s.first_id, s.count] for s in shards]
    blob = json.dumps({"num_samples": num_samples, "shards": rows}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds. ``root``: where the shards live when not beside the
    manifest (an absolute path or URL; an adopted dataset's read-only shards); ``image``: the
    image field (None: each sample's one image field); ``label_key``: labels from that key of
    the ``json`` field (None: from ``cls``); ``id_map``: sha256 of ``ids.tsv`` beside the
    manifest ("" when the keys are the ids)."""

    num_samples: int
    shard_size: int
    shards: list[ShardInfo]
    classes: list[str] | None
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    demo: dict | None = None
    format: str = FORMAT
    fingerprint: str = ""
    root: str | None = None
    image: str | None = None
    label_key: str | None = None
    id_map: str = ""

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
    """A validated dataset: ``root`` is where it was opened (its manifest's folder, an absolute
    local path or a URL); its shards live under ``shards_root``."""

    root: str
    manifest: Manifest

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    @property
    def num_samples(self) -> int:
        """How many samples the shards hold (the sum of their counts)."""
        return self.manifest.num_samples

    @property
    def shard_size(self) -> int:
        """The id stride of the shards: shard ``i`` holds ids from ``i · shard_size``."""
        return self.manifest.shard_size

    @property
    def num_ids(self) -> int:
        """One past the largest id: the rows of the saliency store. Equal to ``num_samples``
        when every shard but the last is full; the ids after a short shard are unused."""
        return self.shards[-1].stop_id

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def shards_root(self) -> str:
        return self.manifest.root or self.root

    def shard_url(self, shard: ShardInfo) -> str:
        return urls.join(self.shards_root, shard.name)

    def shard_urls(self) -> list[str]:
        return [self.shard_url(s) for s in self.shards]

    def source(self, shard: ShardInfo) -> ShardSource:
        """What a reader of ``shard`` needs (``salient.pipeline.shards.iter_samples``)."""
        classes = tuple(self.manifest.classes) if self.manifest.classes else None
        return ShardSource(
            self.shard_url(shard), shard, self.manifest.image, self.manifest.label_key, classes
        )

    def sources(self) -> list[ShardSource]:
        return [self.source(s) for s in self.shards]

    def sample_ids(self) -> np.ndarray:
        """Every id a sample holds, ascending (``int64 [num_samples]``)."""
        return np.concatenate([np.arange(s.first_id, s.stop_id) for s in self.shards])

    def shard_of(self, sample_id: int) -> ShardInfo:
        """The shard that holds ``sample_id``; raises DatasetError when no sample has it."""
        index = sample_id // self.shard_size if sample_id >= 0 else -1
        if 0 <= index < len(self.shards) and sample_id < self.shards[index].stop_id:
            return self.shards[index]
        raise DatasetError(
            f"no sample has id {sample_id}: the dataset at {self.root} holds ids "
            f"0..{self.num_ids - 1}" + ("" if self.num_ids == self.num_samples else ", with gaps")
        )


# ---------------------------------------------------------------- validation (one place)


def check_shard_name(name: object) -> str:
    """``name`` when it is a plain file name ending in ``.tar`` (no folder, no scheme, not
    hidden); else the reason it is not (DatasetError)."""
    plain = (
        isinstance(name, str)
        and 5 <= len(name) <= 255
        and name.endswith(".tar")
        and not name.startswith(".")
        and not any(c in name for c in "/\\:")
        and name.isprintable()
    )
    if not plain:
        raise DatasetError(
            f"shard name {str(name)[:80]!r} is not a plain file name in the dataset's folder "
            "(no '/', '\\', ':' or leading '.'; ending in .tar)"
        )
    return name


_MANIFEST_FIELDS = {f.name for f in fields(Manifest)}
_SHARD_FIELDS = {f.name for f in fields(ShardInfo)}
_REQUIRED_SHARD_FIELDS = {"index", "name", "first_id", "count", "bytes"}  # digests: since /2


def _integer(value: object, what: str, low: int = 0) -> int:
    if type(value) is not int or value < low:  # bool is an int subclass: refused too
        raise DatasetError(f"{what} must be an integer ≥ {low}, got {str(value)[:40]!r}")
    return value


def _text(value: object, what: str, optional: bool = False, pattern: re.Pattern | None = None):
    if value is None and optional:
        return None
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        expected = _EXPECTED.get(pattern, "a string")
        raise DatasetError(f"{what} must be {expected}, got {str(value)[:40]!r}")
    return value


def _known(body: object, allowed: set[str], what: str) -> dict:
    if not isinstance(body, dict):
        raise DatasetError(f"{what} must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise DatasetError(f"{what} has unknown fields {unknown[:3]}")
    return body


_DIGEST = re.compile(r"|[0-9a-f]{64}")  # "" = not recorded
_FIELD = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")  # a webdataset field (suffixes lower-cased)
_EXPECTED = {
    _HEX64: "a sha256 (64 hex digits)",
    _DIGEST: "a sha256 (64 hex digits) or empty",
    _FIELD: "a lower-case field name such as jpg",
}


def _check_shard(body: object, position: int) -> ShardInfo:
    what = f"shard {position}"
    body = _known(body, _SHARD_FIELDS, what)
    missing = sorted(_REQUIRED_SHARD_FIELDS - set(body))
    if missing:
        raise DatasetError(f"{what} lacks {missing}")
    name = check_shard_name(body["name"])
    shard = ShardInfo(
        index=_integer(body["index"], f"{what} index"),
        name=name,
        first_id=_integer(body["first_id"], f"{name} first_id"),
        count=_integer(body["count"], f"{name} count", low=1),
        bytes=_integer(body["bytes"], f"{name} bytes"),
        sha256=_text(body.get("sha256", ""), f"{name} sha256", pattern=_DIGEST),
        head_sha256=_text(body.get("head_sha256", ""), f"{name} head_sha256", pattern=_DIGEST),
    )
    if shard.index != position:
        raise DatasetError(f"{name} has index {shard.index} at position {position}")
    if shard.count * TAR_BLOCK > shard.bytes:
        raise DatasetError(
            f"{name} claims {shard.count} samples in {shard.bytes} bytes; a tar holds at most "
            f"one per {TAR_BLOCK} bytes"
        )
    return shard


def _check_layout(shards: list[ShardInfo], shard_size: int, num_samples: int) -> None:
    if len({s.name for s in shards}) != len(shards):
        raise DatasetError("two shards have the same name")
    largest = max(s.count for s in shards)
    if shard_size > MAX_SHARD_SIZE or (len(shards) > 1 and shard_size != largest):
        raise DatasetError(
            f"shard_size {shard_size} must be the largest shard's count ({largest})"
            + (f" and at most {MAX_SHARD_SIZE}" if shard_size > MAX_SHARD_SIZE else "")
        )
    for shard in shards:
        if shard.first_id != shard.index * shard_size or shard.count > shard_size:
            raise DatasetError(
                f"{shard.name} holds ids [{shard.first_id}, {shard.stop_id}); shard "
                f"{shard.index} must start at {shard.index * shard_size} and hold at most "
                f"{shard_size}"
            )
    if sum(s.count for s in shards) != num_samples:
        raise DatasetError(
            f"shards hold {sum(s.count for s in shards)} samples but num_samples is {num_samples}"
        )


def check_manifest(body: object) -> Manifest:
    """The manifest in the parsed JSON ``body``, checked strictly: known fields of the right
    types (integers are ints, not bools or strings), at least one shard, plain shard names,
    counts that fit the shards' bytes and ``shard_size``, ids at ``index · shard_size``, and the
    fingerprint. Raises DatasetError naming the first problem (the caller adds the path)."""
    body = _known(body, _MANIFEST_FIELDS, "the manifest")
    form = body.get("format")
    if form not in READ_FORMATS:
        raise DatasetError(f"format {str(form)[:40]!r} is not one of {', '.join(READ_FORMATS)}")
    for name in ("num_samples", "shard_size", "shards", "fingerprint"):
        if name not in body:
            raise DatasetError(f"the manifest lacks {name!r}")
    num_samples = _integer(body["num_samples"], "num_samples", low=1)
    shard_size = _integer(body["shard_size"], "shard_size", low=1)
    if not isinstance(body["shards"], list) or not body["shards"]:
        raise DatasetError("the manifest lists no shards")
    shards = [_check_shard(s, i) for i, s in enumerate(body["shards"])]
    _check_layout(shards, shard_size, num_samples)
    classes = body.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
    ):
        raise DatasetError("classes must be a list of strings or null")
    root = _text(body.get("root"), "root", optional=True)
    if root is not None and (not urls.is_remote(root) and not os.path.isabs(root)):
        raise DatasetError(f"root {root[:80]!r} must be an absolute path or a URL")
    manifest = Manifest(
        num_samples=num_samples,
        shard_size=shard_size,
        shards=shards,
        classes=classes,
        skipped=body.get("skipped", []),
        source=_text(body.get("source", ""), "source"),
        demo=body.get("demo"),
        format=form,
        fingerprint=_text(body["fingerprint"], "fingerprint", pattern=_HEX64),
        root=root,
        image=_text(body.get("image"), "image", optional=True, pattern=_FIELD),
        label_key=_text(body.get("label_key"), "label_key", optional=True),
        id_map=_text(body.get("id_map", ""), "id_map", pattern=_DIGEST),
    )
    if not isinstance(manifest.skipped, list) or not isinstance(manifest.demo, dict | None):
        raise DatasetError("skipped must be a list and demo an object or null")
    if fingerprint(shards, num_samples) != manifest.fingerprint:
        raise DatasetError(
            "the fingerprint does not match the shard list; the manifest was edited by hand "
            "or is damaged"
        )
    return manifest


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
        return check_manifest(json.loads(text))
    except ValueError as exc:  # not JSON at all
        raise DatasetError(f"{path} is not JSON ({str(exc)[:80]}); re-run ingest") from None
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}; re-run ingest or index") from None


def _check_files(dataset: Dataset) -> None:
    """Every shard there with the size its manifest recorded: one listing (one HEAD per shard
    over http(s)). The bytes themselves are checked as they are read (``pipeline/shards.py``)."""
    found = urls.sizes(dataset.shards_root, [shard.name for shard in dataset.shards])
    for shard in dataset.shards:
        size = found[shard.name]
        if size is None:
            raise DatasetError(
                f"shard {shard.name} listed in {urls.join(dataset.root, MANIFEST_NAME)} is "
                f"missing from {dataset.shards_root}; restore it or re-run `salient ingest`"
            )
        if size != shard.bytes:
            raise DatasetError(
                f"shard {dataset.shard_url(shard)} is truncated or altered: {size} bytes "
                f"stored, {shard.bytes} in the manifest; restore it or re-run `salient ingest`"
            )


def open_dataset(root: str | os.PathLike, check_files: bool = True) -> Dataset:
    """Open and validate a dataset written by ``salient ingest`` or adopted in place: a local
    directory, or a URL (``s3://``, ``gs://``, ``http(s)://``, ``file://``) holding
    ``manifest.json``. ``check_files=False`` reads and checks the manifest only (the CLI's
    check before a job loads), not that every shard is there with its size.

    Raises:
        DatasetError: no such directory, no or invalid manifest (:func:`check_manifest`), a
            shard missing or of another size.
        StorageError: a URL that cannot be read (no client installed, denied, unreachable).
    """
    root = urls.normalise(root)
    dataset = Dataset(root=root, manifest=_read_manifest(root))
    if check_files:
        _check_files(dataset)
    return dataset
