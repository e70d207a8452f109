"""The shard access layer: the only code that reads a dataset's tar shards and decodes images.

Everything that needs samples — the loader's DataLoader workers, the refresh actors, inspect,
the demo summary, the benchmarks — goes through these functions, so the loader and the teacher
see the same pixels for the same sample by construction:

- :func:`iter_samples` streams the samples of one shard (a local path or any URL that
  ``salient.urls`` opens), optionally only some ids and some fields, in tar order;
- :func:`image_field` names the one image field of a sample (``IMAGE_FIELDS``);
- :func:`open_rgb` turns image bytes into an RGB PIL image (no EXIF rotation; the loader's
  CPU workers crop that), :func:`decode_image` into its pixels (``uint8 [H, W, 3]``),
  :func:`image_hw` reads only the header, and :func:`decode_images` decodes a batch
  to tensors on a device: JPEGs with nvjpeg (``torchvision.io.decode_jpeg``) when the device is
  CUDA, everything else — and every image on the CPU, and what nvjpeg rejects — with PIL;
- :func:`prefetched` runs a producer (reads, decodes) in a background thread, a bounded number
  of items ahead of its consumer (the teacher's forward, the loader's crops).

Webdataset parses the tars (``tar_file_iterator`` / ``group_by_keys``); fsspec streams remote
ones. Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import io
import queue
import threading
import warnings
from collections.abc import Callable, Container, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from salient import urls

__all__ = [
    "IMAGE_FIELDS",
    "JPEG_FIELDS",
    "as_tensor",
    "decode_image",
    "decode_images",
    "image_field",
    "image_hw",
    "iter_samples",
    "open_rgb",
    "prefetched",
    "read_images",
    "read_labels",
    "warn_damaged",
]

IMAGE_FIELDS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
JPEG_FIELDS = frozenset({"jpg", "jpeg"})

Handler = Callable[[Exception], bool]  # webdataset's: True = go on after the error


def _reraise(exc: Exception) -> bool:
    raise exc


# ---------------------------------------------------------------- reading


def _selector(ids: Container[int] | None, fields: Container[str] | None) -> Callable[[str], bool]:
    """Which tar members to read: ids in ``ids``, fields in ``fields`` ("image" = any image)."""

    def wanted(fname: str) -> bool:
        key, _, field = fname.partition(".")
        if ids is not None and not (key.isdigit() and int(key) in ids):
            return False
        return fields is None or field in fields or ("image" in fields and field in IMAGE_FIELDS)

    return wanted


def iter_samples(
    url: str,
    ids: Container[int] | None = None,
    fields: Container[str] | None = None,
    handler: Handler | None = None,
) -> Iterator[dict]:
    """The samples of the shard at ``url`` in tar order: ``{"__key__", "id", field: bytes}``.

    ``ids`` (a range or set) and ``fields`` (``"image"`` stands for the sample's image field,
    whatever its extension) limit what is read; the rest of the tar is skipped unread.
    ``handler(exc)`` sees damaged tar data (True: go on); by default it raises. A failure of the
    storage itself (missing, denied, unreachable, a broken connection) raises StorageError.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    handle = _storage_first(url, handler or _reraise)
    with urls.open_read(url) as stream:
        source = [{"url": url, "stream": stream}]
        files = tar_file_expander(source, handler=handle, select_files=_selector(ids, fields))
        for sample in group_by_keys(files, handler=handle):
            key = sample["__key__"]
            sample["id"] = int(key) if key.isdigit() else -1
            yield sample


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


def read_images(
    url: str, first_id: int, count: int, handler: Handler | None = None
) -> list[tuple[str, bytes] | None]:
    """``(field, bytes)`` of the image of every id in ``[first_id, first_id + count)``, in id
    order; None where the tar holds no image for the id."""
    records: list[tuple[str, bytes] | None] = [None] * count
    ids = range(first_id, first_id + count)
    for sample in iter_samples(url, ids, {"image"}, handler):
        field = image_field(sample)
        if field is not None:
            records[sample["id"] - first_id] = (field, sample[field])
    return records


def read_labels(url: str, first_id: int, count: int, handler: Handler | None = None) -> np.ndarray:
    """The integer ``cls`` field of every id in ``[first_id, first_id + count)``, -1 where a
    sample has none; only the ``.cls`` members are read."""
    labels = np.full(count, -1, dtype=np.int64)
    for sample in iter_samples(url, range(first_id, first_id + count), {"cls"}, handler):
        if "cls" in sample:
            labels[sample["id"] - first_id] = int(sample["cls"])
    return labels


# ---------------------------------------------------------------- decoding


def open_rgb(data: bytes) -> Image.Image | None:
    """The image in ``data`` decoded by PIL, in RGB (no EXIF rotation); None when the bytes
    are not an image. An RGB image is not converted (``convert`` would copy it)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes now: a broken file fails here, not later
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Exception:  # PIL raises many types on corrupt or truncated bytes; none may stop us
        return None
    return image if min(image.size) >= 1 else None


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
    """``(H, W)`` from the image header alone (no decode); None when it is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # as decode_image
        return None
    return (height, width) if min(height, width) >= 1 else None


def _pil_tensor(data: bytes, device: torch.device) -> torch.Tensor | None:
    array = decode_image(data)
    return None if array is None else as_tensor(array).to(device, non_blocking=True)


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
    records: list[tuple[str, bytes] | None], device: torch.device | str = "cpu"
) -> list[torch.Tensor | None]:
    """``uint8 [3, H, W]`` RGB tensors on ``device`` for ``(field, bytes)`` records (None stays
    None, and so does an image nothing can decode).

    On CUDA, JPEGs go through nvjpeg in one batch call; everything else, and every image on the
    CPU, through PIL (:func:`decode_image`), the decode the loader's CPU workers use too.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(records)
    jpegs = []
    if device.type == "cuda":
        jpegs = [i for i, r in enumerate(records) if r is not None and r[0] in JPEG_FIELDS]
        for i, image in zip(jpegs, decode_jpegs([records[i][1] for i in jpegs], device)):
            out[i] = image
    done = set(jpegs)
    for i, record in enumerate(records):
        if record is not None and i not in done:
            out[i] = _pil_tensor(record[1], device)
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
