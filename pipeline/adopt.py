"""Existing webdataset shards adopted in place: a manifest and an id map, no tar rewritten.

``index_shards(src, out)`` reads every tar under ``src`` (a local folder or a URL prefix,
``salient.urls``; it may be read-only) once, through ``pipeline/shards.py``, and writes only
``manifest.json`` and ``ids.tsv`` — beside the shards, or in ``out`` with a manifest whose
``root`` names the shards' location (docs/ARCHITECTURE.md, "Data model"):

- shard ``i`` is the ``i``-th tar in name order; a sample's id is ``i · shard_size`` plus its
  position in the tar, ``shard_size`` being the largest shard's count, so shards of any sizes
  keep "shard ``i`` = zarr chunk ``i``";
- any keys (``n01440764_10026``), any image field (the sample's one image field, or the one
  given), labels from ``cls`` or from a key of the ``json`` field (integers are class indices,
  strings class names);
- every shard's size and digests are recorded, so readers check its bytes;
- a sample without a usable image (none, several, unreadable header, over the pixel budget)
  keeps its id and is listed in ``skipped`` with the reason: readers count it as corrupt, as
  they count an image that fails to decode. Nothing is decoded here, only headers read.

``key_ids(dataset, keys)`` turns keys (or ``shard/key``) back into ids through ``ids.tsv``.
Importing this module touches no disk.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from salient import urls
from salient.pipeline.manifest import (
    ID_MAP_NAME,
    MANIFEST_NAME,
    AdoptError,
    Dataset,
    DatasetError,
    Manifest,
    ShardInfo,
    check_manifest,
    check_shard_name,
    fingerprint,
    open_dataset,
)
from salient.pipeline.shards import (
    ImageRejected,
    image_field,
    label_value,
    open_image,
    scan_shard,
)

__all__ = ["SOURCE", "AdoptError", "index_shards", "key_ids"]

SOURCE = "index"  # the manifest's ``source``: what index_shards may overwrite
_OWN_FILES = (MANIFEST_NAME, ID_MAP_NAME)


@dataclass
class _Scan:
    """What one pass over one tar found."""

    url: str
    keys: list[str] = field(default_factory=list)
    labels: list[int | str | None] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    size: int = 0
    sha256: str = ""
    head_sha256: str = ""
    error: str | None = None


# ---------------------------------------------------------------- one shard


def _image_problem(sample: dict, image: str | None) -> str | None:
    """Why the sample's image is not usable, or None."""
    name = image_field(sample) if image is None else image if image in sample else None
    if name is None:
        return "no image field, or several" if image is None else f"no {image} field"
    try:
        open_image(sample[name])  # the header, and the pixel budget readers apply
    except ImageRejected as exc:
        return str(exc)
    return None


def _scan(url: str, image: str | None, label_key: str | None) -> _Scan:
    scan = _Scan(url)

    def stop(exc: Exception) -> bool:  # damaged tar data: recorded, raised after the pass
        scan.error = str(exc).splitlines()[0][:120]
        return False

    samples = scan_shard(url, None, handler=stop)  # every member: a sample of any fields counts
    seen: set[str] = set()
    while True:
        try:
            sample = next(samples)
        except StopIteration as end:
            scan.size, scan.sha256, scan.head_sha256 = end.value
            break
        key = sample["__key__"]
        if key in seen or not key.isprintable():
            raise AdoptError(
                f"shard {url} holds key {key[:60]!r} twice, or with a tab or newline; "
                "webdataset would not read it as one sample — rewrite that shard"
            )
        seen.add(key)
        scan.keys.append(key)
        scan.labels.append(label_value(sample, label_key))
        problem = _image_problem(sample, image)
        if problem is not None:
            scan.problems.append((sample["id"], problem))
    if scan.error is not None:
        raise AdoptError(f"shard {url} is not a readable tar ({scan.error}); restore it")
    return scan


# ---------------------------------------------------------------- labels


def _classes(scans: list[_Scan], classes_from: str | os.PathLike | None) -> list[str] | None:
    """Class names: another dataset's, or the string labels sorted, or ``"0"…"K-1"`` for
    integer labels; None when no sample has a label."""
    values = {v for scan in scans for v in scan.labels if v is not None}
    if not values:
        if classes_from is not None:
            raise AdoptError("--classes-from was given but no sample has a label")
        return None
    if classes_from is not None:
        names = open_dataset(classes_from).manifest.classes
        if not names:
            raise AdoptError(f"--classes-from {classes_from} is a dataset without classes")
    elif all(isinstance(v, str) for v in values):
        names = sorted(values)
    elif all(isinstance(v, int) for v in values):
        names = [str(k) for k in range(max(values) + 1)]
    else:
        raise AdoptError("labels mix numbers and names; pick one label field with one kind")
    bad = sorted(
        str(v) for v in values if (v not in names if isinstance(v, str) else v >= len(names))
    )
    if bad or any(isinstance(v, int) and v < 0 for v in values):
        raise AdoptError(
            f"labels {bad[:5]} are not classes of {classes_from}; index with the training "
            "set's --classes-from, or without it"
        )
    return names


# ---------------------------------------------------------------- locations


def _shard_names(src: str, pattern: str) -> tuple[list[str], list[dict]]:
    names, skipped = [], []
    for name in urls.list_names(src):
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        try:
            names.append(check_shard_name(name))
        except DatasetError:
            skipped.append({"shard": name, "reason": "not a plain .tar file name"})
    if not names:
        raise AdoptError(f"{src} holds no shard matching {pattern!r}; give the shards' folder")
    return names, skipped


def _check_out(src: str, out: str, overwrite: bool) -> None:
    """``out`` may take the manifest: writable, and empty (or ``src`` itself) or holding an
    index this module wrote, replaced only with ``overwrite`` (the new manifest replaces it
    in one write, last)."""
    if urls.scheme(out) in urls.READ_ONLY or (
        not urls.is_remote(out) and os.path.isdir(out) and not os.access(out, os.W_OK)
    ):
        raise AdoptError(
            f"{out} is read-only; give --out, a folder or bucket prefix for the manifest "
            "(the shards stay where they are)"
        )
    existing = urls.read_bytes(urls.join(out, MANIFEST_NAME))
    if existing is not None:
        try:
            source = json.loads(existing).get("source")
        except (ValueError, AttributeError):
            source = None
        if source != SOURCE:
            raise AdoptError(
                f"{out} already holds a dataset that `salient index` did not write; it needs "
                "no index — or give --out another folder"
            )
        if not overwrite:
            raise AdoptError(f"{out} already holds an index; pass --overwrite to redo it")
    foreign = [n for n in urls.list_names(out) if n not in _OWN_FILES]
    if out != src and foreign:
        raise AdoptError(f"--out {out} holds other files ({foreign[0]} …); choose an empty folder")


# ---------------------------------------------------------------- the index


def _scan_all(
    src: str,
    names: list[str],
    image: str | None,
    label_key: str | None,
    workers: int,
    progress: Callable[[int], None],
) -> list[_Scan]:
    def scan(name: str) -> _Scan:
        result = _scan(urls.join(src, name), image, label_key)
        progress(len(result.keys))
        return result

    with ThreadPoolExecutor(max(1, workers)) as pool:  # reads and hashes release the GIL
        return list(pool.map(scan, names))


def _lay_out(names: list[str], scans: list[_Scan]) -> tuple[list[ShardInfo], bytes, list[dict]]:
    """The shards (an empty tar takes no index), the id map's bytes, and the samples without a
    usable image (they keep their ids)."""
    kept = [(name, scan) for name, scan in zip(names, scans) if scan.keys]
    skipped = [{"shard": n, "reason": "no samples"} for n, s in zip(names, scans) if not s.keys]
    if not kept:
        raise AdoptError(f"the shards {names[0]} … hold no samples")
    stride = max(len(scan.keys) for _, scan in kept)  # shard i holds ids from i · stride
    shards, lines = [], []
    for index, (name, scan) in enumerate(kept):
        first = index * stride
        digests = (scan.size, scan.sha256, scan.head_sha256)
        shards.append(ShardInfo(index, name, first, len(scan.keys), *digests))
        lines += [f"{first + p}\t{name}\t{key}\n" for p, key in enumerate(scan.keys)]
        skipped += [
            {"shard": name, "key": scan.keys[p], "id": first + p, "reason": reason}
            for p, reason in scan.problems
        ]
    return shards, "".join(lines).encode(), skipped


def index_shards(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    pattern: str = "*.tar",
    image: str | None = None,
    label_key: str | None = None,
    classes_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Adopt the webdataset shards under ``src`` (those whose names match ``pattern``, in name
    order) as a dataset, writing only ``manifest.json`` and ``ids.tsv`` into ``out`` (default:
    beside the shards). ``image``: the image field (default: each sample's one image field);
    ``label_key``: labels from that key of the ``json`` field (default: the ``cls`` field);
    ``classes_from``: a dataset whose class list the labels must keep (a held-out split).
    ``workers`` shards are read at a time; ``progress(n)`` after each shard's ``n`` samples.

    Raises:
        AdoptError: no shards, an unreadable tar, a key twice in a shard, labels outside the
            classes, an ``out`` that cannot take the manifest.
        StorageError: a location that cannot be read or written.
    """
    src = urls.normalise(src)
    out = src if out is None else urls.normalise(out)
    image = None if image is None else image.lower()  # webdataset lower-cases suffixes
    names, skipped = _shard_names(src, pattern)
    _check_out(src, out, overwrite)
    scans = _scan_all(src, names, image, label_key, workers, progress or (lambda n: None))
    classes = _classes(scans, classes_from)
    shards, id_map, problems = _lay_out(names, scans)
    num_samples = sum(s.count for s in shards)
    manifest = Manifest(
        num_samples=num_samples,
        shard_size=max(s.count for s in shards),  # the stride _lay_out used
        shards=shards,
        classes=classes,
        skipped=skipped + problems,
        source=SOURCE,
        fingerprint=fingerprint(shards, num_samples),
        root=None if out == src else src,
        image=image,
        label_key=label_key,
        id_map=hashlib.sha256(id_map).hexdigest(),
    )
    check_manifest(json.loads(manifest.to_json()))  # what every reader will check
    if not urls.is_remote(out):
        os.makedirs(out, exist_ok=True)
    urls.write_bytes(urls.join(out, ID_MAP_NAME), id_map)
    urls.write_bytes(urls.join(out, MANIFEST_NAME), manifest.to_json().encode())  # last
    return manifest


def key_ids(dataset: Dataset, keys: Iterable[str]) -> dict[str, int]:
    """The id of each key (``KEY``, or ``SHARD/KEY`` where a key is in several shards): through
    ``ids.tsv`` for an adopted dataset, the numeric key itself for an ingested one.

    Raises DatasetError: a key no sample has, a key in several shards, an id map that is not
    the one the manifest recorded.
    """
    wanted = set(keys)
    if not dataset.manifest.id_map:
        found = {k: int(k) for k in wanted if k.isdigit()}
    else:
        found = _read_id_map(dataset, wanted)
    missing = sorted(wanted - set(found))
    if missing:
        raise DatasetError(f"no sample of {dataset.root} has key {missing[0]!r}")
    for sample_id in found.values():
        dataset.shard_of(sample_id)  # an id a sample holds
    return found


def _read_id_map(dataset: Dataset, wanted: set[str]) -> dict[str, int]:
    data = urls.read_bytes(urls.join(dataset.root, ID_MAP_NAME))
    if data is None or hashlib.sha256(data).hexdigest() != dataset.manifest.id_map:
        raise DatasetError(
            f"{urls.join(dataset.root, ID_MAP_NAME)} is missing or not the one its manifest "
            "recorded; re-run `salient index`"
        )
    found: dict[str, int] = {}
    ambiguous = set()
    for line in data.decode().splitlines():
        sample_id, shard, key = line.split("\t")
        for name in (key, f"{shard}/{key}"):
            if name in wanted:
                ambiguous |= {name} if name in found else set()
                found[name] = int(sample_id)
    if ambiguous:
        raise DatasetError(
            f"key {sorted(ambiguous)[0]!r} is in several shards of {dataset.root}; "
            "name it as SHARD/KEY"
        )
    return found
