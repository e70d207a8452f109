"""Worker-side stages: one pass of one epoch, from tar bytes to chunks of cropped samples.

``SampleStream`` (a torch ``IterableDataset``) runs, in each DataLoader worker (or in the main
process with 0 workers): ``read_segment`` (the worker's id ranges of a tar shard, through
``salient.pipeline.shards``) → ``attach_rows`` (the map rows of the bound generation, one store
read per segment, each map normalised over the whole image as AMT does before its crop:
``crops.whole_image_weights``; with ``heads``, also the raw per-head maps) — both in a
background thread, ``prefetch`` samples ahead — → ``shuffled`` →
``prepare_chunk`` (decode and crop ``chunk_size`` samples with PIL into one uint8 buffer in
``"worker"`` mode, or keep their bytes and read the image size in ``"device"`` mode; one crop
box per sample, the chunk's random numbers in one NumPy call; the map region under each box,
one batched RoIAlign per chunk, and one for all the heads of the chunk).

A chunk is columns, not samples: NumPy arrays of ids, flags, map weights, per-head maps,
boxes and the uint8 images (pickled through the DataLoader's queue), so the main process
slices runs of samples instead of handling them one by one. Which epoch and pass a
persistent worker streams comes from the loader's shared :class:`PassPlan`.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from salient import urls
from salient.errors import SalientError
from salient.pipeline import shards
from salient.pipeline.crops import (
    CROP_DRAWS,
    CropBox,
    crop_box_from,
    crop_draws,
    crop_head_maps,
    crop_maps,
    crop_pil,
    whole_image_weights,
)
from salient.pipeline.epochs import Segment, epoch_segments, mix_seed
from salient.pipeline.loader_config import MultiCrop
from salient.pipeline.manifest import ShardInfo, ShardSource
from salient.pipeline.views import VIEW_DRAWS, augment_view, view_augment
from salient.store import SaliencyStore

__all__ = [
    "CountingHandler",
    "PassPlan",
    "SampleStream",
    "StreamSpec",
    "attach_rows",
    "crop_boxes_for",
    "crop_head_rows",
    "crop_map_rows",
    "init_worker",
    "keep_as_is",
    "prepare_chunk",
    "prepare_views_chunk",
    "read_segment",
    "reuse_freed_memory",
    "shuffled",
    "view_draws",
    "whole_map_weights",
]


# ---------------------------------------------------------------- worker counts


class _Tally:
    """A worker's counts since its last chunk (the prefetch thread adds to them too)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.corrupt: list[int] = []
        self.corrupt_maps: list[tuple[int, int]] = []  # id ranges read as no map: damaged chunk
        self.damaged: list = []  # the store's DamagedChunk records behind them
        self.shard_errors = 0
        self.store_reads = 0

    def add(self, name: str, value=1) -> None:
        with self._lock:
            if name in ("corrupt", "corrupt_maps", "damaged"):
                getattr(self, name).append(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def flush(self) -> dict:
        with self._lock:
            out = {
                "corrupt": self.corrupt,
                "corrupt_maps": self.corrupt_maps,
                "damaged": self.damaged,
                "shard_errors": self.shard_errors,
                "store_reads": self.store_reads,
            }
            self._reset()
        return out


class CountingHandler:
    """Damaged tar data: count it, warn, go on. Never sleeps (webdataset's
    ``warn_and_continue`` sleeps 0.5 s per error)."""

    def __init__(self, tally: _Tally):
        self.tally = tally

    def __call__(self, exn: Exception) -> bool:
        self.tally.add("shard_errors")
        warnings.warn(f"damaged tar data skipped: {exn!r}", stacklevel=2)
        return True


# ---------------------------------------------------------------- what a pass streams


@dataclass(frozen=True)
class StreamSpec:
    """What every pass of one loader needs; picklable. The per-pass part is a PassPlan."""

    sources: tuple[ShardSource, ...]  # one per shard: where, its ids, what to check
    shards: tuple[ShardInfo, ...]
    store: str | None
    seed: int
    rank: int
    world_size: int
    image_size: int
    grid: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_p: float
    interpolation: str
    decode_on: str
    shuffle_buffer: int
    chunk_size: int
    prefetch: int
    views: MultiCrop | None = None
    heads: int | None = None  # per-head maps of H heads travel with each sample (AutoMAE)


class PassPlan:
    """Epoch, pass and generation of the pass to stream next, in a shared-memory tensor:
    the main process sets it before each pass; persistent workers read it when they start
    the pass, so they live across epochs (no process start per epoch)."""

    def __init__(self):
        self._values = torch.full((3,), -1, dtype=torch.int64).share_memory_()

    def set(self, epoch: int, pass_index: int, generation: str | None) -> None:
        number = -1 if generation is None else int(generation.rsplit("-", 1)[1])
        self._values.copy_(torch.tensor([epoch, pass_index, number]))

    def get(self) -> tuple[int, int, str | None]:
        epoch, pass_index, number = self._values.tolist()
        return epoch, pass_index, None if number < 0 else f"gen-{number:06d}"


# ---------------------------------------------------------------- stages


def read_segment(source: ShardSource, segment: Segment, handler: CountingHandler) -> Iterator[dict]:
    """The samples of ``segment`` with their image field: ``{"__key__", "id", "jpg": bytes}``.
    Every id of the segment the tar does not yield (damaged tar data stopped the read, or its
    members do not group into the samples the manifest counted) is counted as corrupt once
    the segment is read: a lost sample is counted, never silently refilled."""
    seen = set()
    for sample in shards.iter_samples(
        source, range(segment.start, segment.stop), {"image"}, handler
    ):
        seen.add(sample["id"])
        yield sample
    for sample_id in range(segment.start, segment.stop):
        if sample_id not in seen:
            handler.tally.add("corrupt", sample_id)


def attach_rows(
    samples: Iterable[dict], segment: Segment, reader, tally: _Tally, heads: bool = False
) -> Iterator[dict]:
    """Add ``map`` (``float32 [G,G]`` in [0, 1], or None): ONE store read for the segment;
    each map is normalised over the whole image before any crop (AMT's order; README,
    "Decisions": strategies that normalise the crop re-normalise after it). With ``heads``,
    also ``heads`` (``float32 [H,G,G]``, the raw per-head maps, or None; one more read): a
    sample has a map only when its map and every head are finite. Rows of a damaged store
    chunk come back as no map; their ids and the chunk are counted."""
    maps = ok = head_maps = None
    if reader is not None:
        maps, valid = reader.read_range(segment.start, segment.stop)  # one read per tar shard
        ok = (valid == 1) & np.isfinite(maps).all(axis=(1, 2))
        if heads:
            head_maps = reader.read_head_maps(segment.start, segment.stop).astype(np.float32)
            ok &= np.isfinite(head_maps).all(axis=(1, 2, 3))
        tally.add("store_reads")
        for chunk in reader.damaged_between(segment.start, segment.stop):
            tally.add("damaged", chunk)
            tally.add(
                "corrupt_maps", (max(chunk.start, segment.start), min(chunk.stop, segment.stop))
            )
        maps = whole_map_weights(maps, reader.attrs)
    for sample in samples:
        offset = sample["id"] - segment.start
        good = ok is not None and ok[offset]
        sample["map"] = maps[offset] if good else None
        if heads:
            sample["heads"] = head_maps[offset] if good else None
        yield sample


def whole_map_weights(maps: np.ndarray, attrs: dict) -> np.ndarray:
    """``[n, G, G]`` raw maps of a generation -> whole-image weights in [0, 1] (float32): a
    ``minmax_mean`` generation already holds AMT's weights (per-head min-max, then the mean);
    any other is min-max normalised per map."""
    teacher = attrs.get("teacher") or {}
    minmax = teacher.get("reduce") != "minmax_mean"
    return whole_image_weights(torch.from_numpy(np.asarray(maps, np.float32)), minmax).numpy()


def shuffled(samples: Iterable[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer of ``size`` samples (webdataset's ``shuffle``, seeded)."""
    buffer: list[dict] = []
    draws = iter(())
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = next(draws, None)
        if i is None:  # uniform indices below ``size``, drawn 1,024 at a time
            draws = iter(rng.integers(size, size=1024).tolist())
            i = next(draws)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def crop_boxes_for(spec: StreamSpec, plan: tuple, ids: list[int]) -> np.ndarray:
    """The random numbers of the crop boxes of ``ids`` (``[n, CROP_DRAWS]``), seeded by (seed,
    epoch, pass, id): a sample's box does not depend on which rank or worker reads it."""
    epoch, pass_index, _ = plan
    return crop_draws(mix_seed(spec.seed, epoch, pass_index), np.asarray(ids, dtype=np.int64))


def view_draws(spec: StreamSpec, plan: tuple, ids: list[int]) -> np.ndarray:
    """``[n, views, VIEW_DRAWS]`` uniforms of the multi-crop views of ``ids`` (each view's crop
    box, then its augmentations), seeded like :func:`crop_boxes_for`."""
    epoch, pass_index, _ = plan
    views = spec.views.views
    ids = np.asarray(ids, dtype=np.int64)
    draws = crop_draws(mix_seed(spec.seed, epoch, pass_index), ids, views * VIEW_DRAWS)
    return draws.reshape(len(ids), views, VIEW_DRAWS)


def _box(spec: StreamSpec, draws: np.ndarray, height: int, width: int) -> CropBox:
    return crop_box_from(
        draws.tolist(), height, width, spec.crop_scale, spec.crop_ratio, spec.flip_p
    )


def crop_map_rows(
    rows: list[np.ndarray | None], boxes: list[CropBox], hws: list[tuple[int, int]], grid: int
) -> np.ndarray:
    """The map region under each sample's box on the output patch grid, ``[n, grid²]`` float32
    (zeros for a sample without a map): one batched RoIAlign (``crops.crop_maps``)."""
    out = np.zeros((len(rows), grid * grid), np.float32)
    have = [i for i, row in enumerate(rows) if row is not None]
    if have:
        maps = torch.from_numpy(np.stack([rows[i] for i in have]).astype(np.float32))  # [k,G,G]
        cropped = crop_maps(maps, [boxes[i] for i in have], [hws[i] for i in have], grid)
        out[have] = cropped.reshape(len(have), -1).numpy()  # [k, grid²]
    return out


def crop_head_rows(
    rows: list[np.ndarray | None],
    boxes: list[CropBox],
    hws: list[tuple[int, int]],
    grid: int,
    heads: int,
) -> np.ndarray:
    """Each sample's per-head maps under its box, ``[n, heads, grid²]`` float32, each head's
    crop summing to its whole-image sum (``crops.crop_head_maps``; zeros for a sample without
    maps): one batched RoIAlign over every head of the chunk."""
    out = np.zeros((len(rows), heads, grid * grid), np.float32)
    have = [i for i, row in enumerate(rows) if row is not None]
    if have:
        maps = torch.from_numpy(np.stack([rows[i] for i in have]))  # [k, H, G, G]
        cropped = crop_head_maps(maps, [boxes[i] for i in have], [hws[i] for i in have], grid)
        out[have] = cropped.reshape(len(have), heads, -1).numpy()  # [k, H, grid²]
    return out


def _image_buffer(n: int, size: int) -> np.ndarray:
    """``uint8 [n,3,S,S]``, plain process memory, pickled through the DataLoader's pipe.

    Not shared memory: every chunk would be a new shared-memory file whose pages fault on
    the worker's first write and again on the main process's first read — at ~8 µs a page on
    this project's VM, more than a third of the cost of decoding the images. Piped bytes land
    in heap memory that both processes reuse (``reuse_freed_memory``; BENCHMARKS.md).
    """
    return np.empty((n, 3, size, size), dtype=np.uint8)


def prepare_chunk(samples: list[dict], spec: StreamSpec, plan: tuple, tally: _Tally) -> dict:
    """Decode and crop (worker mode) or only locate (device mode) the chunk's images, one crop
    box each; a missing or broken image is counted and left out."""
    if spec.views is not None:
        return prepare_views_chunk(samples, spec, plan, tally)
    worker = spec.decode_on == "worker"
    images = _image_buffer(len(samples), spec.image_size) if worker else None
    draws = crop_boxes_for(spec, plan, [s["id"] for s in samples])
    kept, boxes, hws, datas = [], [], [], []
    for sample, sample_draws in zip(samples, draws):
        field = shards.image_field(sample)
        data = sample[field] if field else b""
        if worker:
            image = shards.open_rgb(data)
            hw = None if image is None else (image.height, image.width)
        else:
            hw = shards.image_hw(data)
        if hw is None:
            tally.add("corrupt", sample["id"])
            continue
        box = _box(spec, sample_draws, *hw)
        if worker:  # [3,S,S] uint8 into the chunk's buffer: the transpose here, in the worker,
            # lets the main process normalise with a contiguous cast (BENCHMARKS.md)
            crop = crop_pil(image, box, spec.image_size, spec.interpolation)
            images[len(kept)] = np.asarray(crop).transpose(2, 0, 1)
        else:
            datas.append((field, data))
        kept.append(sample)
        boxes.append(box)
        hws.append(hw)
    return _collate(kept, boxes, hws, images, datas, spec, tally)


def _collate(kept, boxes, hws, images, datas, spec: StreamSpec, tally: _Tally) -> dict:
    rows = [s["map"] for s in kept]
    chunk = {
        "ids": np.array([s["id"] for s in kept], dtype=np.int64),
        "has_map": np.array([row is not None for row in rows], dtype=bool),
        "weights": crop_map_rows(rows, boxes, hws, spec.grid),  # [n, g²] raw
        "boxes": np.array(boxes, dtype=np.int64).reshape(len(kept), 5),
        "hw": np.array(hws, dtype=np.int64).reshape(len(kept), 2),
        **tally.flush(),
    }
    if spec.heads is not None:  # [n, H, g²]: raw attention rows, the same box as the image
        heads = [s.get("heads") for s in kept]
        chunk["heads"] = crop_head_rows(heads, boxes, hws, spec.grid, spec.heads)
    if images is not None:
        chunk["images"] = images[: len(kept)]  # [n,3,S,S] uint8
    else:
        chunk["data"] = datas  # [(field, bytes)]
    return chunk


def prepare_views_chunk(samples: list[dict], spec: StreamSpec, plan: tuple, tally: _Tally) -> dict:
    """Multi-crop chunks (``loader_config.MultiCrop``): each image decoded once, cropped and
    augmented into its global and local views; the map cropped with each global view's box.
    Columns: ``images`` uint8 ``[n, G, 3, S, S]``, ``locals`` uint8 ``[n, L, 3, s, s]``,
    ``weights [n, G, g²]``, ``boxes [n, G, 5]`` (the global views')."""
    views, size = spec.views, spec.image_size
    g = views.global_crops
    images = np.empty((len(samples), g, 3, size, size), dtype=np.uint8)
    local = views.local_size
    locals_ = np.empty((len(samples), views.local_crops, 3, local, local), dtype=np.uint8)
    draws = view_draws(spec, plan, [s["id"] for s in samples])  # [n, G + L, VIEW_DRAWS]
    kept, boxes, hws = [], [], []
    for sample, sample_draws in zip(samples, draws):
        field = shards.image_field(sample)
        image = shards.open_rgb(sample[field] if field else b"")
        if image is None:
            tally.add("corrupt", sample["id"])
            continue
        hw = (image.height, image.width)
        global_boxes = []
        for v, d in enumerate(sample_draws):
            scale, out = (spec.crop_scale, size) if v < g else (views.local_scale, local)
            box = crop_box_from(d[:CROP_DRAWS].tolist(), *hw, scale, spec.crop_ratio, spec.flip_p)
            crop = crop_pil(image, box, out, spec.interpolation)
            if views.augment:  # pixels only: the box (and the map's crop) is already drawn
                crop = augment_view(crop, d[CROP_DRAWS:].tolist(), view_augment(v, g))
            target = images[len(kept), v] if v < g else locals_[len(kept), v - g]
            target[:] = np.asarray(crop).transpose(2, 0, 1)
            if v < g:
                global_boxes.append(box)
        kept.append(sample)
        boxes.append(global_boxes)
        hws.append(hw)
    rows = [s["map"] for s in kept]
    weights = [crop_map_rows(rows, [b[v] for b in boxes], hws, spec.grid) for v in range(g)]
    return {
        "ids": np.array([s["id"] for s in kept], dtype=np.int64),
        "has_map": np.array([row is not None for row in rows], dtype=bool),
        "weights": np.stack(weights, axis=1),  # [n, G, g²] raw
        "boxes": np.array(boxes, dtype=np.int64).reshape(len(kept), g, 5),
        "hw": np.array(hws, dtype=np.int64).reshape(len(kept), 2),
        "images": images[: len(kept)],
        "locals": locals_[: len(kept)],
        **tally.flush(),
    }


def keep_as_is(chunk: dict) -> dict:
    """The DataLoader's collate_fn: chunks are collated already (its default would turn the
    NumPy columns into tensors, each sent through its own shared-memory file)."""
    return chunk


class SampleStream(torch.utils.data.IterableDataset):
    """One loader's passes on one rank; each DataLoader worker streams its own segments of
    the pass that ``plan`` names when the pass starts."""

    def __init__(self, spec: StreamSpec, plan: PassPlan):
        super().__init__()
        self.spec, self.plan = spec, plan

    def __iter__(self) -> Iterator[dict]:
        spec, tally, plan = self.spec, _Tally(), self.plan.get()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, pass_index, generation = plan
        segments = epoch_segments(
            list(spec.shards), spec.seed, epoch, spec.rank, spec.world_size, worker, workers
        )
        reader = _bind_reader(spec.store, generation)
        rng = np.random.default_rng(mix_seed(spec.seed, epoch, pass_index, spec.rank, worker))
        samples = shards.prefetched(_joined(spec, segments, reader, tally), spec.prefetch)
        # now: {"__key__", "id", "jpg" | "png" | …: bytes, "map": float32 [G,G] in [0, 1] | None,
        #   with heads: "heads": float32 [H,G,G] raw | None}
        samples = shuffled(samples, spec.shuffle_buffer, rng)
        # now: the same samples, mixed within a buffer of shuffle_buffer
        try:
            for group in _groups(samples, spec.chunk_size):
                yield prepare_chunk(group, spec, plan, tally)
        except SalientError as exc:  # sent whole: the DataLoader would wrap it in a traceback
            yield {"error": exc}
            return
        yield prepare_chunk([], spec, plan, tally)  # the final counts
        # now: chunks {"ids" [n], "has_map" [n], "weights" [n,g²], "boxes" [n,5], "hw" [n,2],
        #   "images" uint8 [n,3,S,S] | "data" [(field, bytes)], counts}; with views:
        #   "weights" [n,G,g²], "boxes" [n,G,5], "images" [n,G,3,S,S], "locals" [n,L,3,s,s]


def _groups(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _joined(spec: StreamSpec, segments: list[Segment], reader, tally: _Tally) -> Iterator[dict]:
    handler = CountingHandler(tally)
    for segment in segments:
        raw = read_segment(spec.sources[segment.shard], segment, handler)
        # now: {"__key__", "id", "jpg" | "png" | …: bytes} for ids in the segment
        yield from attach_rows(raw, segment, reader, tally, spec.heads is not None)


def _bind_reader(url: str | None, generation: str | None):
    """A reader of ``generation`` opened in this process (workers do not share handles)."""
    if url is None or generation is None:
        return None

    return SaliencyStore.open(url).bind(generation)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Keep freed blocks up to 64 MB in the process's heap for reuse (glibc; elsewhere nothing).

    By default glibc gives such blocks back to the system, so every chunk buffer (5 MB) and
    every float batch (20 MB at 224 px) is fresh memory that page-faults on its first write:
    on this project's 2-core VM that cost as much as the normalisation itself (BENCHMARKS.md).
    The process then keeps up to 256 MB of freed memory instead of returning it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20)
    except (OSError, AttributeError):  # not glibc
        pass


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Linux: this process (forked by ``parent``) gets SIGKILL when the thread that forked it
    ends or its process dies. A DataLoader worker outlives a killed train worker otherwise:
    PyTorch's worker notices within 5 s, but its exit can block for good on a result pipe
    nobody reads, and while it lives it holds the train worker's inherited socket to Ray's
    raylet, so Ray never sees that worker die and never restarts the group (measured: a run
    hung until it was killed). Ray starts its own processes the same way."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux's libc: PyTorch's own watchdog only
        return
    if os.getppid() != parent:  # ``parent`` died between the fork and prctl
        os._exit(1)


def init_worker(
    worker_id: int, storage: urls.StorageOptions | None = None, parent: int | None = None
) -> None:
    """DataLoader worker start: dies with its parent (:func:`die_with_parent`), the driver's
    storage options, one torch thread, zarr's pools kept small (a worker reads one segment's
    rows at a time), freed buffers reused, and PIL's decompression-bomb warning off (the pixel
    budget refuses those images and counts them)."""
    import zarr
    from PIL import Image

    if parent is not None:
        die_with_parent(parent)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    reuse_freed_memory()
    urls.adopt(storage)
    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 4})
