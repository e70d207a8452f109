"""Ingest: an image folder, or the bundled demo set, into webdataset tar shards + manifest.

Layout written (see ``manifest.py``): ``OUT/shard-000000.tar`` … and ``OUT/manifest.json``.
Image bytes are stored as they were read (no re-encode) under the extension of their real
format (PIL's detection, not the file name). Every sample gets a dense id; the webdataset
key is the zero-padded id.

OUT is a local directory or a URL (``s3://``, ``gs://``, ``file://``; ``salient.urls``); SRC
is a local folder. Safety: a non-empty OUT is refused unless ``overwrite``; even then only
files salient wrote (shards, manifest) are removed, and a directory holding anything else is
refused. Each shard is written to a local temporary file and, once complete, renamed (local) or
uploaded once under its final key (object storage: there is no rename); the manifest is
written last, so a reader never sees a dataset whose manifest promises files that are not
there yet (README, Decisions).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from salient import urls
from salient.errors import SalientError
from salient.pipeline.demo import DEMO_OBJECTS, DEMO_SPLITS, DEMO_VARIANTS, make_scene
from salient.pipeline.manifest import (
    MANIFEST_NAME,
    MAX_SHARD_SIZE,
    IngestError,
    Manifest,
    ShardInfo,
    fingerprint,
    open_dataset,
    sample_key,
    shard_name,
)
from salient.pipeline.shards import IMAGE_FIELDS, ImageRejected, file_digests, open_image

__all__ = ["IMAGE_SUFFIXES", "IngestError", "Sample", "ingest_demo", "ingest_folder"]

IMAGE_SUFFIXES = {f".{field}" for field in IMAGE_FIELDS}  # source files ingest reads
_FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tiff",
    "PPM": "ppm",
    "MPO": "jpg",
}
_OWN_FILE = ("shard-", MANIFEST_NAME, ".shard-")


@dataclass(frozen=True)
class Sample:
    """One image ready to be written: bytes as read, their extension, optional extras."""

    data: bytes
    ext: str
    label: int | None = None
    extra: dict[str, bytes] | None = None


# ---------------------------------------------------------------- output directory


def _prepare_out(out: str, overwrite: bool, src: Path | None = None) -> None:
    """Check OUT (empty, or a dataset salient wrote and ``overwrite``) and clear it."""
    urls.check_writable(out)
    if not urls.is_remote(out):
        _check_local_out(Path(out), src)
    entries = urls.list_names(out)
    if not entries:
        if not urls.is_remote(out):
            os.makedirs(out, exist_ok=True)
        return
    foreign = [e for e in entries if not e.startswith(_OWN_FILE)]
    if not overwrite:
        raise IngestError(
            f"OUT {out} is not empty; pass --overwrite to replace a dataset "
            "written by salient, or choose an empty directory"
        )
    if foreign:
        raise IngestError(
            f"OUT {out} holds files salient did not write ({foreign[0]} …); "
            "refusing to overwrite them — choose an empty directory"
        )
    urls.remove(urls.join(out, MANIFEST_NAME))  # first: the old dataset stops being valid
    for entry in entries:
        urls.remove(urls.join(out, entry))


def _check_local_out(out: Path, src: Path | None) -> None:
    if src is not None and (out == src or src in out.parents):
        raise IngestError(f"OUT {out} lies inside SRC {src}; choose an output outside the source")
    if out.exists() and not out.is_dir():
        raise IngestError(f"OUT {out} exists and is not a directory; choose another path")


# ---------------------------------------------------------------- shard writing


def _write_shard(out: str, index: int, first_id: int, samples: list[Sample]) -> ShardInfo:
    import webdataset as wds

    name = shard_name(index)
    with urls.staged(urls.join(out, name)) as tmp:  # whole, under its final name, or nothing
        # mtime=0: the same input gives byte-identical shards.
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for offset, sample in enumerate(samples):
                record = {"__key__": sample_key(first_id + offset), sample.ext: sample.data}
                if sample.label is not None:
                    record["cls"] = str(sample.label).encode()
                record.update(sample.extra or {})
                writer.write(record)
        size, sha256, head_sha256 = file_digests(tmp)  # what readers check it against
    return ShardInfo(index, name, first_id, len(samples), size, sha256, head_sha256)


def _write_shards(
    out: str, samples: Iterable[Sample], shard_size: int, shards: list[ShardInfo]
) -> list[ShardInfo]:
    """Write the samples as shards of ``shard_size``, appending each to ``shards`` once it is
    whole (so a failure knows what it leaves behind)."""
    pending: list[Sample] = []
    next_id = 0
    for sample in samples:
        pending.append(sample)
        if len(pending) == shard_size:
            shards.append(_write_shard(out, len(shards), next_id, pending))
            next_id += len(pending)
            pending = []
    if pending:
        shards.append(_write_shard(out, len(shards), next_id, pending))
    return shards


@contextlib.contextmanager
def _whole_or_nothing(out: str) -> Iterator[list[ShardInfo]]:
    """The shards a block writes (it appends them); when the block fails (a full disk, an
    endpoint gone, Ctrl-C) they are removed, since without a manifest they are no dataset,
    and the error's one line says so — or, where a removal fails too, names exactly the
    shards left in OUT."""
    written: list[ShardInfo] = []
    try:
        yield written
    except BaseException as error:
        left = []
        for shard in written:
            try:
                urls.remove(urls.join(out, shard.name))
            except Exception:  # the first error stays the one reported; this shard is named
                left.append(shard.name)
        if not isinstance(error, SalientError) or not written:
            raise
        what = (
            f"the {len(written)} shards written before it were removed (no dataset was made)"
            if not left
            else f"{len(left)} shards are left in {out} ({left[0]} … {left[-1]}) with no "
            "manifest: remove them, or rerun with --overwrite"
        )
        raise type(error)(f"{error}; {what}") from None


def _finish(out: str, shards: list[ShardInfo], shard_size: int, **fields) -> Manifest:
    num_samples = sum(s.count for s in shards)
    manifest = Manifest(
        num_samples=num_samples,
        shard_size=shard_size,
        shards=shards,
        fingerprint=fingerprint(shards, num_samples),
        **fields,
    )
    urls.write_bytes(urls.join(out, MANIFEST_NAME), manifest.to_json().encode())  # last
    return manifest


def _check_shard_size(shard_size: int) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise IngestError(
            f"--shard-size must be a positive integer (got {shard_size}); 1000 is a good default"
        )
    if shard_size > MAX_SHARD_SIZE:
        raise IngestError(f"--shard-size must be at most {MAX_SHARD_SIZE:,} (got {shard_size:,})")


# ---------------------------------------------------------------- folder ingest


def _scan(src: Path) -> tuple[list[tuple[Path, int | None]], list[str] | None, list[dict]]:
    """Files to ingest with labels, class names (ImageFolder) or None (flat), skipped files."""
    skipped: list[dict] = []
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    if not subdirs:
        return [(p, None) for p in top_files], None, skipped
    classes = [d.name for d in subdirs]
    files = []
    for label, folder in enumerate(subdirs):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not any(
                part.startswith(".") for part in path.relative_to(src).parts
            ):
                files.append((path, label))
    for path in top_files:
        skipped.append({"path": path.name, "reason": "outside any class folder"})
    return files, classes, skipped


def _warn_skipped(skipped: list[dict]) -> None:
    """One warning per reason a file was passed over before decoding (its first few names);
    the manifest lists them all."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        by_reason.setdefault(entry["reason"], []).append(entry["path"])
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        warnings.warn(
            f"skipping {len(paths)} file(s), {reason}: {', '.join(paths[:3])}{more} "
            "(listed in manifest.json)",
            stacklevel=3,
        )


def _load(path: Path) -> tuple[bytes | None, str]:
    """Read and fully decode one file, within the pixel budget readers use (``shards``):
    (bytes, ext) or (None, reason). Runs in a pool."""
    try:
        data = path.read_bytes()
        with open_image(data) as image:
            fmt = image.format
            image.load()  # a full decode: catches truncated and corrupt files, not just headers
    except ImageRejected as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"unreadable image: {exc}"
    except Exception as exc:  # PIL raises many types on hostile files; none may stop ingest
        return None, f"unreadable image: {type(exc).__name__}: {exc}"
    ext = _FORMAT_EXT.get(fmt or "")
    if ext is None:
        return None, f"unsupported image format {fmt}"
    return data, ext


def _decoded(
    files: list[tuple[Path, int | None]],
    src: Path,
    skipped: list[dict],
    progress: Callable[[int], None],
) -> Iterator[Sample]:
    workers = max(1, min(8, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        loaded = pool.map(_load, [p for p, _ in files], chunksize=16)
        for (path, label), (data, ext_or_reason) in zip(files, loaded):
            progress(1)
            rel = str(path.relative_to(src))
            if data is None:
                warnings.warn(f"skipping {rel}: {ext_or_reason}", stacklevel=2)
                skipped.append({"path": rel, "reason": ext_or_reason})
                continue
            yield Sample(data, ext_or_reason, label, {"path.txt": rel.encode()})


def _match_classes(
    files: list[tuple[Path, int | None]], classes: list[str] | None, src: Path, classes_from
) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """Relabel ``files`` with the class indices of the dataset at ``classes_from``.

    Raises IngestError when SRC is flat, the dataset has no classes, or the class folders are
    not exactly its classes (a held-out split must be labelled as its training set).
    """
    wanted = open_dataset(classes_from).manifest.classes
    if not wanted:
        raise IngestError(f"--classes-from {classes_from} is a dataset without classes")
    if classes is None:
        raise IngestError(f"SRC {src} has no class sub-folders, so --classes-from cannot apply")
    missing, extra = sorted(set(wanted) - set(classes)), sorted(set(classes) - set(wanted))
    if missing or extra:
        raise IngestError(
            f"the class folders of {src} are not the classes of {classes_from}: missing "
            f"{missing[:5] or 'none'}, extra {extra[:5] or 'none'}; give SRC the same class "
            "folders as the training set"
        )
    index = {name: wanted.index(name) for name in classes}
    return [(p, None if lab is None else index[classes[lab]]) for p, lab in files], list(wanted)


def ingest_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    classes_from: str | os.PathLike | None = None,
) -> Manifest:
    """Ingest an ImageFolder tree (class sub-folders) or a flat folder of images.

    Files whose suffix is not an image suffix, and images that do not decode, are skipped,
    warned about and listed in the manifest with a reason. ``progress(n)`` is called as
    files are processed. ``classes_from``: a dataset (e.g. the training split) whose class
    list and indices the labels must keep, so a held-out split can be probed against it.

    Raises:
        IngestError: SRC missing or holding no images, OUT unusable, bad shard size, class
            folders that differ from ``classes_from``'s classes.
    """
    _check_shard_size(shard_size)
    if urls.is_remote(src):
        raise IngestError(f"SRC {src} must be a local folder; OUT may be s3://, gs:// or a path")
    src, out = Path(src).expanduser().resolve(), urls.normalise(out)
    if not src.is_dir():
        raise IngestError(f"SRC {src} is not a directory; give the folder holding your images")
    files, classes, skipped = _scan(src)
    if classes_from is not None:
        files, classes = _match_classes(files, classes, src, classes_from)
    images = [(p, lab) for p, lab in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for path, _ in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": str(path.relative_to(src)), "reason": "not an image suffix"})
    _warn_skipped(skipped)
    if not images:
        raise IngestError(f"SRC {src} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _prepare_out(out, overwrite, src)
    samples = _decoded(images, src, skipped, progress or (lambda n: None))
    with _whole_or_nothing(out) as shards:
        _write_shards(out, samples, shard_size, shards)
        if not shards:
            raise IngestError(
                f"none of the {len(images)} images in {src} could be decoded; see the warnings "
                "above"
            )
        return _finish(out, shards, shard_size, classes=classes, skipped=skipped, source=str(src))


# ---------------------------------------------------------------- demo ingest


def _demo_samples(
    n: int,
    seed: int,
    image_size: int,
    quality: int,
    split: str,
    variant: str,
    progress: Callable[[int], None],
) -> Iterator[Sample]:
    for index in range(n):
        scene = make_scene(seed, index, image_size, split, variant)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="JPEG", quality=quality)
        box = dict(zip(("x0", "y0", "x1", "y1"), scene.box))
        progress(1)
        yield Sample(buffer.getvalue(), "jpg", scene.label, {"box.json": json.dumps(box).encode()})


def ingest_demo(
    out: str | os.PathLike,
    n: int = 2000,
    seed: int = 0,
    shard_size: int = 500,
    image_size: int = 192,
    overwrite: bool = False,
    quality: int = 90,
    progress: Callable[[int], None] | None = None,
    split: str = "train",
    variant: str = "plain",
) -> Manifest:
    """Write the bundled demo dataset (no network): ``n`` scenes, deterministic for ``seed``.

    ``split="val"`` writes held-out scenes: the same classes, drawn from another random
    stream, so none of them is a scene of the ``train`` split (``pipeline.demo``).
    ``variant="colour-random"`` recolours every scene's object at random (``pipeline.demo``);
    the manifest's ``demo`` records a variant other than ``plain``.

    Raises:
        IngestError: OUT unusable, n < 1, image_size < 32, bad shard size, unknown split or
        variant.
    """

    _check_shard_size(shard_size)
    if split not in DEMO_SPLITS:
        raise IngestError(f"--split must be one of {', '.join(DEMO_SPLITS)} (got {split!r})")
    if variant not in DEMO_VARIANTS:
        raise IngestError(f"--variant must be one of {', '.join(DEMO_VARIANTS)} (got {variant!r})")
    if n < 1:
        raise IngestError(f"--n must be at least 1 (got {n})")
    if image_size < 32:
        raise IngestError(f"demo image size must be at least 32 px (got {image_size})")
    out = urls.normalise(out)
    _prepare_out(out, overwrite)
    count = progress or (lambda k: None)
    samples = _demo_samples(n, seed, image_size, quality, split, variant, count)
    demo = {"seed": seed, "image_size": image_size, "quality": quality, "split": split}
    if variant != "plain":  # plain's manifests stay as they were before variants existed
        demo["variant"] = variant
    with _whole_or_nothing(out) as shards:
        _write_shards(out, samples, shard_size, shards)
        return _finish(
            out,
            shards,
            shard_size,
            classes=list(DEMO_OBJECTS),
            skipped=[],
            source="demo",
            demo=demo,
        )
