"""The shard access layer: the only code that reads a dataset's tar shards and decodes images.

Everything that needs samples — the loader's DataLoader workers, the refresh actors, inspect,
the demo summary, the benchmarks — goes through these functions, so the loader and the teacher
see the same pixels for the same sample by construction:

- :func:`iter_samples` streams the samples of one shard, optionally only some ids and some
  fields, in tar order. Given a dataset's :class:`~salient.pipeline.manifest.ShardSource`, a
  sample's id is its shard's first id plus its position in the tar (any keys), and the shard's
  bytes are checked against the manifest as they stream: its head before the first sample, its
  size and sha256 at the end of a whole read (docs/ARCHITECTURE.md, "Data model"). Given a bare
  URL (a tar without a manifest), the id is the numeric key salient writes.
- :func:`image_field` names the one image field of a sample (``IMAGE_FIELDS``);
- :func:`open_image` opens image bytes within the pixel budget (:func:`max_pixels`), lazily;
  :func:`open_rgb` decodes them to an RGB PIL image (no EXIF rotation; the loader's CPU workers
  crop that), :func:`decode_image` to pixels (``uint8 [H, W, 3]``), :func:`image_hw` gives the
  decoded size from the header alone, and :func:`decode_images` decodes a batch to tensors on a
  device: JPEGs with nvjpeg (``torchvision.io.decode_jpeg``) when the device is CUDA,
  everything else — every image on the CPU, what nvjpeg rejects, and JPEGs over the budget —
  with PIL;
- :func:`prefetched` runs a producer (reads, decodes) in a background thread, a bounded number
  of items ahead of its consumer (the teacher's forward, the loader's crops).

Webdataset parses the tars (``tar_file_iterator`` / ``group_by_keys``); fsspec streams remote
ones. Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable, Container, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from salient import urls
from salient.errors import SalientError
from salient.pipeline.manifest import HEAD_BYTES, ShardChangedError, ShardInfo, ShardSource

__all__ = [
    "IMAGE_FIELDS",
    "JPEG_FIELDS",
    "MAX_PIXELS",
    "ImageRejected",
    "as_tensor",
    "decode_image",
    "decode_images",
    "file_digests",
    "image_field",
    "image_hw",
    "iter_samples",
    "label_of",
    "label_value",
    "max_pixels",
    "open_image",
    "open_rgb",
    "prefetched",
    "read_images",
    "read_labels",
    "scan_shard",
    "warn_damaged",
]

IMAGE_FIELDS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
JPEG_FIELDS = frozenset({"jpg", "jpeg"})

# The pixel budget of one decode: 2**25 (33.5 M) pixels, e.g. 8192 × 4096 — above any photo a
# ViT recipe needs (the teacher sees 224², a crop is resized to it) and below PIL's own warning
# limit (89.5 M). A JPEG over it is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode, in the
# DCT) when that fits; any other image over it is refused: ingest skips it with the reason,
# readers count it as corrupt. A decode holds at most MAX_PIXELS × 8 bytes (the source mode
# at ≤ 4 bytes a pixel plus its RGB copy; 268 MB) besides the encoded bytes.
# SALIENT_MAX_PIXELS raises or lowers it (every process that decodes reads it).
MAX_PIXELS = 2**25
BUDGET_VARIABLE = "SALIENT_MAX_PIXELS"
# PIL still warns (DecompressionBombWarning) on opening an image over 89.5 M pixels, before
# the budget refuses it: a process that decodes may silence that warning (the loader's workers
# do, ``stages.init_worker``); importing this module changes no warning filter.

Handler = Callable[[Exception], bool]  # webdataset's: True = go on after the error


def _reraise(exc: Exception) -> bool:
    raise exc


# ---------------------------------------------------------------- reading


def _wanted_field(field: str, fields: Container[str] | None, image: str | None) -> bool:
    """Whether ``fields`` asks for ``field`` ("image" = the image field, ``image`` when the
    dataset names one, else any of IMAGE_FIELDS)."""
    if fields is None or field in fields:
        return True
    return "image" in fields and (field == image if image else field in IMAGE_FIELDS)


class _Positions:
    """Each sample's position in its tar, counted from member names as webdataset groups
    members into samples (consecutive members with one key), whether a member is read or not.
    Positions past ``limit`` are refused (``over``): they would be ids of the next shard."""

    def __init__(self, limit: int | None):
        self.limit, self.count, self.over = limit, 0, False
        self._last: str | None = None
        self._pending: dict[str, int] = {}  # key -> position, until its sample is yielded

    def see(self, fname: str) -> tuple[str, str, int] | None:
        """``(key, field, position)`` of a member, or None when webdataset would ignore it."""
        key, field = base_plus_ext(fname)
        if key is None:
            return None
        if key != self._last:
            self._last, self.count = key, self.count + 1
            self._pending[key] = self.count - 1
        position = self._pending[key]
        if self.limit is not None and position >= self.limit:
            self.over = True
            return None
        return key, field.lower(), position

    def take(self, key: str) -> int:
        return self._pending.pop(key)

    def unread(self) -> list[tuple[int, str]]:
        """``(position, key)`` of the samples never taken (none of their members was read)."""
        kept = self._pending.items()
        return sorted((p, k) for k, p in kept if self.limit is None or p < self.limit)


class _CheckedStream:
    """A shard's byte stream that hashes what it serves: its first ``HEAD_BYTES`` are read
    ahead and checked against ``expected`` (a ShardInfo) before the tar parser sees any byte,
    and :meth:`finish` checks the size and the sha256 of the whole file once it is read."""

    def __init__(self, raw, url: str, expected: ShardInfo | None):
        self.raw, self.url, self.expected = raw, url, expected
        self.size, self.whole = 0, hashlib.sha256()
        self.head = self.raw.read(HEAD_BYTES)
        while len(self.head) < HEAD_BYTES and (more := self.raw.read(HEAD_BYTES - len(self.head))):
            self.head += more
        self.head_sha256 = hashlib.sha256(self.head).hexdigest()
        if expected is not None and expected.head_sha256 not in ("", self.head_sha256):
            raise self._changed("its first bytes differ")
        self._pending = self.head

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            data = self._pending if n < 0 else self._pending[:n]
            self._pending = self._pending[len(data) :]
        else:
            data = self.raw.read(n)
        self.size += len(data)
        self.whole.update(data)
        return data

    def finish(self) -> None:
        """Read what the tar parser left (padding), then check size and sha256."""
        while self.read(2**20):
            pass
        expected = self.expected
        if expected is None:
            return
        if expected.bytes and self.size != expected.bytes:
            raise self._changed(f"{self.size} bytes read, {expected.bytes} recorded")
        if expected.sha256 and self.whole.hexdigest() != expected.sha256:
            raise self._changed("its sha256 differs")

    def _changed(self, what: str) -> ShardChangedError:
        return ShardChangedError(
            f"shard {self.url} is not the one its manifest recorded ({what}); restore it, or "
            "re-run `salient ingest` / `salient index` (then refresh into a new store)"
        )


def _tar_samples(url: str, stream, select: Callable[[str], bool], handle: Handler):
    source = [{"url": url, "stream": stream}]
    files = tar_file_expander(source, handler=handle, select_files=select)
    return group_by_keys(files, handler=handle)


def iter_samples(
    source: str | ShardSource,
    ids: Container[int] | None = None,
    fields: Container[str] | None = None,
    handler: Handler | None = None,
) -> Iterator[dict]:
    """The samples of a shard in tar order: ``{"__key__", "id", field: bytes}``.

    ``source``: a dataset's :class:`ShardSource` (``Dataset.source(shard)``): ids by position,
    the shard checked against its manifest (:class:`ShardChangedError`: a head that differs
    before any sample; more samples than recorded, or a size or sha256 that differs, once the
    tar is read to its end); an asked-for sample that holds none of the asked-for fields comes
    last, with its key and id only, so a reader counts it. A bare URL: ids from numeric keys
    (-1 for others), no checks.
    ``ids`` (a range or set) and ``fields`` (``"image"`` stands for the sample's image field)
    limit what is read; the rest of the tar is skipped unread. ``handler(exc)`` sees damaged
    tar data (True: go on); by default it raises. A failure of the storage itself (missing,
    denied, unreachable, a broken connection) raises StorageError.
    """
    if isinstance(source, str):
        yield from _bare_samples(source, ids, fields, handler)
        return
    url, shard = source.url, source.shard
    handle = _storage_first(url, handler or _reraise)
    positions = _Positions(shard.count)

    def select(fname: str) -> bool:
        seen = positions.see(fname)
        if seen is None:
            return False
        _, field, position = seen
        wanted = ids is None or shard.first_id + position in ids
        return wanted and _wanted_field(field, fields, source.image)

    with urls.open_read(url) as raw, urls.storage_errors(url):
        stream = _CheckedStream(raw, url, shard)
        for sample in _tar_samples(url, stream, select, handle):
            sample["id"] = shard.first_id + positions.take(sample["__key__"])
            yield sample
        stream.finish()
    if positions.over:
        raise ShardChangedError(
            f"shard {url} holds more than the {shard.count} samples its manifest recorded; "
            "restore it, or re-run `salient ingest` / `salient index`"
        )
    for position, key in positions.unread():  # asked for, but holding none of the fields
        if ids is None or shard.first_id + position in ids:
            yield {"__key__": key, "__url__": url, "id": shard.first_id + position}


def _bare_samples(url: str, ids, fields, handler: Handler | None) -> Iterator[dict]:
    """A tar without a manifest: ids are salient's numeric keys."""
    handle = _storage_first(url, handler or _reraise)

    def select(fname: str) -> bool:
        key, field = base_plus_ext(fname)
        if key is None or (ids is not None and not (key.isdigit() and int(key) in ids)):
            return False
        return _wanted_field(field.lower(), fields, None)

    with urls.open_read(url) as stream:
        for sample in _tar_samples(url, stream, select, handle):
            key = sample["__key__"]
            sample["id"] = int(key) if key.isdigit() else -1
            yield sample


def scan_shard(url: str, fields: Container[str] | None = None, handler: Handler | None = None):
    """Every sample of the tar at ``url`` (``fields`` of each; a sample none of whose fields is
    asked for is not yielded) with its position as ``"id"``,
    then, as the generator's return value, ``(bytes, sha256, head_sha256)`` of the file: what
    a manifest records of a shard it adopts (``pipeline/adopt.py``)."""
    handle = _storage_first(url, handler or _reraise)
    positions = _Positions(None)

    def select(fname: str) -> bool:
        seen = positions.see(fname)
        return seen is not None and _wanted_field(seen[1], fields, None)

    with urls.open_read(url) as raw, urls.storage_errors(url):
        stream = _CheckedStream(raw, url, None)
        for sample in _tar_samples(url, stream, select, handle):
            sample["id"] = positions.take(sample["__key__"])
            yield sample
        stream.finish()
    return stream.size, stream.whole.hexdigest(), stream.head_sha256


def file_digests(url: str) -> tuple[int, str, str]:
    """``(bytes, sha256, head_sha256)`` of the file at ``url``, computed as a reader checks them."""
    with urls.open_read(url) as raw, urls.storage_errors(url):
        stream = _CheckedStream(raw, url, None)
        stream.finish()
    return stream.size, stream.whole.hexdigest(), stream.head_sha256


def warn_damaged(url: str, consequence: str) -> Handler:
    """A handler that warns once that the shard at ``url`` is damaged (``consequence``: what
    happens to its unread samples) and stops reading it; what was read is kept."""

    def handler(exc: Exception) -> bool:
        warnings.warn(f"shard {url} is damaged ({exc}); {consequence}", stacklevel=2)
        return False

    return handler


def _storage_first(url: str, handler: Handler) -> Handler:
    """``handler`` for damaged tar data; a storage failure is raised, never skipped: a
    transient network error must not pass for a damaged sample."""

    def handle(exc: Exception) -> bool:
        error = urls.as_storage_error(url, exc)
        if error is not None:
            raise error from None
        return handler(exc)

    return handle


def image_field(sample: dict) -> str | None:
    """The sample's one image field (``jpg``, ``png``, …), or None when it has none or several."""
    found = [k for k in sample if k in IMAGE_FIELDS]
    return found[0] if len(found) == 1 else None


def _id_range(source: str | ShardSource, first_id: int | None, count: int | None) -> range:
    if isinstance(source, ShardSource):
        return range(source.shard.first_id, source.shard.stop_id)
    return range(first_id, first_id + count)


def read_images(
    source: str | ShardSource,
    first_id: int | None = None,
    count: int | None = None,
    handler: Handler | None = None,
) -> list[tuple[str, bytes] | None]:
    """``(field, bytes)`` of the image of every id of a shard (a ShardSource), or of
    ``[first_id, first_id + count)`` of a bare URL, in id order; None where the tar holds no
    image for the id."""
    ids = _id_range(source, first_id, count)
    records: list[tuple[str, bytes] | None] = [None] * len(ids)
    for sample in iter_samples(source, ids, {"image"}, handler):
        field = image_field(sample)
        if field is not None:
            records[sample["id"] - ids.start] = (field, sample[field])
    return records


def label_value(sample: dict, label_key: str | None = None) -> int | str | None:
    """A sample's label as stored: its ``cls`` field, or (``label_key``) that key of its
    ``json`` field; a number as an int, a name as a str, None when it has none."""
    try:
        if label_key is None:
            value = sample["cls"].decode().strip() if "cls" in sample else None
        else:
            value = json.loads(sample["json"]).get(label_key) if "json" in sample else None
    except (ValueError, AttributeError):  # not text, not JSON, not an object
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value if isinstance(value, str) or type(value) is int else None


def label_of(sample: dict, label_key: str | None = None, classes=None) -> int:
    """A sample's class index (:func:`label_value`; a name is looked up in ``classes``), -1
    when it has none."""
    value = label_value(sample, label_key)
    if isinstance(value, str):
        return classes.index(value) if classes and value in classes else -1
    return -1 if value is None else value


def read_labels(
    source: str | ShardSource,
    first_id: int | None = None,
    count: int | None = None,
    handler: Handler | None = None,
) -> np.ndarray:
    """The integer label of every id of a shard (a ShardSource: where its manifest says labels
    are), or of ``[first_id, first_id + count)`` of a bare URL (its ``cls``), -1 where a sample
    has none; only the label's members are read."""
    ids = _id_range(source, first_id, count)
    label_key = source.label_key if isinstance(source, ShardSource) else None
    classes = source.classes if isinstance(source, ShardSource) else None
    labels = np.full(len(ids), -1, dtype=np.int64)
    wanted = {"cls"} if label_key is None else {"json"}
    for sample in iter_samples(source, ids, wanted, handler):
        labels[sample["id"] - ids.start] = label_of(sample, label_key, classes)
    return labels


# ---------------------------------------------------------------- decoding


class ImageRejected(ValueError):
    """Bytes that are not an image PIL can open within the pixel budget; the message is why."""


def max_pixels() -> int:
    """The pixel budget of one decode: ``SALIENT_MAX_PIXELS`` when set, else MAX_PIXELS."""
    value = os.environ.get(BUDGET_VARIABLE)
    if value is None:
        return MAX_PIXELS
    if not value.strip().isdigit() or int(value) < 1:
        raise SalientError(f"{BUDGET_VARIABLE}={value[:20]!r} must be a positive number of pixels")
    return int(value)


def _scale_within(width: int, height: int, budget: int) -> int | None:
    """The smallest JPEG draft scale (1, 2, 4, 8) whose image fits ``budget``, or None."""
    for scale in (1, 2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= budget:
            return scale
    return None


def open_image(data: bytes) -> Image.Image:
    """The image in ``data`` opened by PIL but not decoded yet (its header only), reduced in
    PIL's draft mode (JPEG: 1/2, 1/4 or 1/8 scale in the decoder) when that brings it within
    the pixel budget.

    Raises:
        ImageRejected: not an image PIL reads, empty, or over the budget (the reason).
    """
    budget = max_pixels()
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit, 2 × 89.5 M pixels
        raise ImageRejected(f"over the pixel budget of {budget:,} ({exc})") from None
    except Exception as exc:  # PIL raises many types on hostile bytes; none may stop a reader
        raise ImageRejected(f"unreadable image ({type(exc).__name__})") from None
    width, height = image.size
    if min(width, height) < 1:
        raise ImageRejected("empty image")
    scale = _scale_within(width, height, budget) if image.format == "JPEG" else None
    if scale is None and width * height > budget:
        raise ImageRejected(
            f"{width}×{height} = {width * height:,} pixels is over the pixel budget of "
            f"{budget:,} (raise {BUDGET_VARIABLE} to decode it)"
        )
    if scale not in (None, 1):
        image.draft(None, (width // scale, height // scale))  # picks exactly ``scale``
        if image.size[0] * image.size[1] > budget:  # draft not applicable (several tiles)
            raise ImageRejected(f"{width}×{height} JPEG is over the pixel budget of {budget:,}")
    return image


def open_rgb(data: bytes) -> Image.Image | None:
    """The image in ``data`` decoded by PIL within the pixel budget, in RGB (no EXIF rotation);
    None when the bytes are not an image or it is over the budget. An RGB image is not
    converted (``convert`` would copy it)."""
    try:
        image = open_image(data)
        image.load()  # decodes now: a broken file fails here, not later
        if image.mode != "RGB":
            image = image.convert("RGB")
    except SalientError:  # a budget setting that is not a number: the user's to fix
        raise
    except Exception:  # ImageRejected, and PIL's many types on corrupt or truncated bytes
        return None
    return image


def decode_image(data: bytes) -> np.ndarray | None:
    """:func:`open_rgb`'s pixels, ``uint8 [H, W, 3]`` (read-only); None when not an image."""
    image = open_rgb(data)
    return None if image is None else np.asarray(image)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` → ``[3, H, W]`` view. The array is read-only (PIL's buffer): nothing
    writes through the view, so torch's warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1)


def image_hw(data: bytes) -> tuple[int, int] | None:
    """``(H, W)`` of the image :func:`open_rgb` would decode (a JPEG over the budget: its
    reduced size), from the header alone; None when it is unreadable or over the budget."""
    try:
        width, height = open_image(data).size
    except ImageRejected:
        return None
    return height, width


def _pil_tensor(data: bytes, device: torch.device) -> torch.Tensor | None:
    array = decode_image(data)
    return None if array is None else as_tensor(array).to(device, non_blocking=True)


def _within_budget(data: bytes) -> bool:
    """Whether a JPEG decodes whole within the budget (nvjpeg has no draft mode)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # not readable: PIL's path counts it
        return False
    return width * height <= max_pixels()


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's batch JPEG decode on ``device`` (nvjpeg on CUDA); after a batch error one
    by one, and what it rejects through PIL, so one bad file costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for data, tensor in zip(datas, encoded):
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(_pil_tensor(data, device))
        return out


def decode_images(
    records: list[tuple[str, bytes] | None],
    device: torch.device | str = "cpu",
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """``uint8 [3, H, W]`` RGB tensors on ``device`` for ``(field, bytes)`` records (None stays
    None, and so does an image nothing can decode or that is over the pixel budget).

    On CUDA, JPEGs within the budget go through nvjpeg in one batch call; everything else, and
    every image on the CPU, through PIL (:func:`decode_image`), the decode the loader's CPU
    workers use too. ``view`` (a reader's resize or crop) is applied to each image as soon as
    it is decoded, so on the CPU one full-size image is alive at a time, whatever the batch
    (a reader's memory bound: docs/ARCHITECTURE.md, "Pixel budget").
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(records)
    jpegs = []
    if device.type == "cuda":
        jpegs = [
            i
            for i, r in enumerate(records)
            if r is not None and r[0] in JPEG_FIELDS and _within_budget(r[1])
        ]
        for i, image in zip(jpegs, decode_jpegs([records[i][1] for i in jpegs], device)):
            out[i] = image if view is None else view(image)
    done = set(jpegs)
    for i, record in enumerate(records):
        if record is not None and i not in done:
            image = _pil_tensor(record[1], device)
            out[i] = image if view is None or image is None else view(image)
    return out


# ---------------------------------------------------------------- prefetch


_END = object()


def prefetched(items: Iterable, depth: int) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` items ahead (0: inline).

    The producer's IO and decoding (PIL, nvjpeg and file reads release the GIL) overlap with
    whatever the consumer does between items. An exception in the producer is raised in the
    consumer; a consumer that stops early stops the producer at its next item.
    """
    if depth < 1:
        yield from items
        return
    pipe: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce, args=(items, pipe, stop), daemon=True, name="salient-prefetch"
    )
    thread.start()
    try:
        while (item := pipe.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _produce(items: Iterable, pipe: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(pipe, item, stop):
                return
        _put(pipe, _END, stop)
    except BaseException as exc:  # handed to the consumer, which raises it
        _put(pipe, _Failure(exc), stop)


def _put(pipe: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone (then False)."""
    while not stop.is_set():
        try:
            pipe.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
