"""Worker-side stages: one pass of one epoch, from tar bytes to collated chunks.

``SampleStream`` (a torch ``IterableDataset``, one per pass) runs, in each DataLoader worker:
``read_segment`` (the worker's id ranges of a tar shard) → ``attach_rows`` (the map rows of
the bound generation, one store read per segment, each map normalised over the whole image
as AMT does before its crop: ``crops.whole_image_weights``) → ``shuffled`` →
``prepare_sample`` (decode and crop in ``"worker"`` mode, or only read the image size in
``"device"`` mode; one crop box per sample) → ``chunked`` / ``collate_chunk`` (tensors for
shared memory, plus the worker's counts since its last chunk). Everything a worker receives
is module-level and picklable.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from salient.pipeline.crops import (
    CropBox,
    crop_image,
    crop_maps,
    sample_crop_box,
    whole_image_weights,
)
from salient.pipeline.epochs import Segment, epoch_segments, mix_seed
from salient.pipeline.ingest import IMAGE_SUFFIXES
from salient.pipeline.manifest import ShardInfo

__all__ = [
    "IMAGE_FIELDS",
    "CountingHandler",
    "SampleStream",
    "StreamSpec",
    "attach_rows",
    "chunked",
    "collate_chunk",
    "crop_box_for",
    "crop_map_rows",
    "decode_pil",
    "image_hw",
    "init_worker",
    "prepare_sample",
    "read_segment",
    "shuffled",
    "whole_map_weights",
]

IMAGE_FIELDS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)  # tar fields: jpg, png, …


# ---------------------------------------------------------------- worker counts


class _Tally:
    """A worker's counts since its last chunk; flushed into each chunk it sends."""

    def __init__(self):
        self.corrupt: list[int] = []
        self.shard_errors = 0
        self.store_reads = 0

    def flush(self) -> dict:
        out = {
            "corrupt": self.corrupt,
            "shard_errors": self.shard_errors,
            "store_reads": self.store_reads,
        }
        self.__init__()
        return out


class CountingHandler:
    """webdataset error handler: count the error, warn, go on. Never sleeps (PITFALLS.md:
    ``warn_and_continue`` sleeps 0.5 s per error)."""

    def __init__(self, tally: _Tally):
        self.tally = tally

    def __call__(self, exn: Exception) -> bool:
        self.tally.shard_errors += 1
        warnings.warn(f"damaged tar data skipped: {exn!r}", stacklevel=2)
        return True


# ---------------------------------------------------------------- worker stages


@dataclass(frozen=True)
class StreamSpec:
    """What a worker needs to produce its part of one pass of one epoch; picklable."""

    urls: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    store: str | None
    generation: str | None
    seed: int
    epoch: int
    pass_index: int
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


def _segment_id(fname: str) -> int:
    key = fname.split(".", 1)[0]
    return int(key) if key.isdigit() else -1


def read_segment(url: str, segment: Segment, handler: CountingHandler) -> Iterator[dict]:
    """The raw samples of ``segment``: ``{"__key__", "jpg" | "png" | …: bytes, …}``."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def wanted(fname: str) -> bool:
        return segment.start <= _segment_id(fname) < segment.stop

    try:
        stream = wds.gopen(url)
    except OSError as exn:
        handler(exn)
        return
    with stream:
        files = tar_file_expander(
            [{"url": url, "stream": stream}], handler=handler, select_files=wanted
        )
        yield from group_by_keys(files, handler=handler)


def attach_rows(samples: Iterable[dict], segment: Segment, reader, tally: _Tally) -> Iterator[dict]:
    """Add ``id`` and ``map`` (``float32 [G,G]`` in [0, 1], or None): ONE store read for the
    segment; each map is normalised over the whole image before any crop (AMT's order;
    README, "Decisions": strategies that normalise the crop re-normalise after it)."""
    maps = valid = None
    if reader is not None:
        maps, valid = reader.read_range(segment.start, segment.stop)  # one read per tar shard
        tally.store_reads += 1
        maps = whole_map_weights(maps, reader.attrs)
    for sample in samples:
        sample_id = int(sample["__key__"])
        row = None
        if maps is not None:
            offset = sample_id - segment.start
            candidate = np.asarray(maps[offset])
            if valid[offset] == 1 and np.isfinite(candidate).all():
                row = candidate
        sample["id"], sample["map"] = sample_id, row
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
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _image_field(sample: dict) -> str | None:
    found = [k for k in sample if k in IMAGE_FIELDS]
    return found[0] if len(found) == 1 else None


def decode_pil(data: bytes) -> torch.Tensor | None:
    """PIL decode to ``uint8 [3,H,W]`` RGB (no EXIF rotation, as the refresh); None if broken."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB"))
    except Exception:  # PIL raises many types on corrupt or truncated bytes; none may stop us
        return None
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        return None
    return torch.from_numpy(array).permute(2, 0, 1)


def image_hw(data: bytes) -> tuple[int, int] | None:
    """``(H, W)`` from the image header alone (no decode); None when it is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # as decode_pil
        return None
    return (height, width) if min(height, width) >= 1 else None


def crop_box_for(spec: StreamSpec, sample_id: int, height: int, width: int) -> CropBox:
    """The crop box of ``sample_id``: seeded by (seed, epoch, pass, id), so it does not
    depend on which rank or worker reads the sample."""
    generator = torch.Generator().manual_seed(
        mix_seed(spec.seed, spec.epoch, spec.pass_index, sample_id)
    )
    return sample_crop_box(
        height, width, generator, scale=spec.crop_scale, ratio=spec.crop_ratio, flip_p=spec.flip_p
    )


def crop_map_rows(
    rows: list[np.ndarray | None], boxes: list[CropBox], hws: list[tuple[int, int]], grid: int
) -> torch.Tensor:
    """The map region under each sample's box on the output patch grid, ``[n, grid²]`` float32
    (zeros for a sample without a map): one batched RoIAlign (``crops.crop_maps``)."""
    out = torch.zeros(len(rows), grid * grid)
    have = [i for i, row in enumerate(rows) if row is not None]
    if have:
        maps = torch.from_numpy(np.stack([rows[i] for i in have]).astype(np.float32))  # [k,G,G]
        cropped = crop_maps(maps, [boxes[i] for i in have], [hws[i] for i in have], grid)
        out[have] = cropped.reshape(len(have), -1)  # [k, grid²]
    return out


def prepare_sample(sample: dict, spec: StreamSpec, tally: _Tally) -> dict | None:
    """Decode and crop (worker mode) or only locate (device mode) the image, and sample its
    one crop box. None (and counted) when the image is missing or broken."""
    name = _image_field(sample)
    data = sample.get(name) if name else None
    image = hw = None
    if data is not None:
        if spec.decode_on == "worker":
            image = decode_pil(data)
            hw = None if image is None else tuple(image.shape[1:])
        else:
            hw = image_hw(data)
    if hw is None:
        tally.corrupt.append(sample["id"])
        return None
    box = crop_box_for(spec, sample["id"], *hw)
    out = {"id": sample["id"], "box": box, "hw": hw, "map": sample["map"]}
    if image is not None:
        out["image"] = crop_image(image, box, spec.image_size, spec.interpolation)  # [3,S,S]
    else:
        out.update(data=data, ext=name)
    return out


def chunked(items: Iterable[dict], size: int, grid: int, tally: _Tally) -> Iterator[dict]:
    """Collate prepared samples into chunks of up to ``size`` (tensors travel in shared
    memory); every chunk carries the worker's counts since the last one."""
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield collate_chunk(batch, grid, tally)
            batch = []
    yield collate_chunk(batch, grid, tally)  # the rest, and the final counts (maybe no samples)


def collate_chunk(items: list[dict], grid: int, tally: _Tally) -> dict:
    """Stack a worker's samples: ids, has_map, cropped map weights, boxes, and images or the
    image bytes."""
    n = len(items)
    rows, boxes = [i["map"] for i in items], [i["box"] for i in items]
    chunk = {
        "ids": torch.tensor([i["id"] for i in items], dtype=torch.int64),
        "has_map": torch.tensor([row is not None for row in rows], dtype=torch.bool),
        "weights": crop_map_rows(rows, boxes, [i["hw"] for i in items], grid),  # [n, g²] raw
        "boxes": torch.tensor([list(b) for b in boxes], dtype=torch.int64).reshape(n, 5),
        "hw": torch.tensor([i["hw"] for i in items], dtype=torch.int64).reshape(n, 2),
        **tally.flush(),
    }
    if n and "image" in items[0]:
        chunk["images"] = torch.stack([i["image"] for i in items])  # [n,3,S,S] uint8
    elif n:
        sizes = [len(i["data"]) for i in items]
        chunk["data"] = torch.frombuffer(
            bytearray(b"".join(i["data"] for i in items)), dtype=torch.uint8
        )  # all bytes, one tensor
        chunk["offsets"] = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
        chunk["ext"] = [i["ext"] for i in items]
    return chunk


class SampleStream(torch.utils.data.IterableDataset):
    """One pass of one epoch on one rank; each DataLoader worker streams its own segments."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        spec, tally = self.spec, _Tally()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        segments = epoch_segments(
            list(spec.shards), spec.seed, spec.epoch, spec.rank, spec.world_size, worker, workers
        )
        reader = _bind_reader(spec.store, spec.generation)
        rng = np.random.default_rng(
            mix_seed(spec.seed, spec.epoch, spec.pass_index, spec.rank, worker)
        )
        samples = _joined(spec, segments, reader, tally)
        # now: {"__key__", "jpg": bytes, …, "id": int, "map": float32 [G,G] in [0, 1] | None}
        samples = shuffled(samples, spec.shuffle_buffer, rng)
        # now: the same samples, mixed within a buffer of shuffle_buffer
        prepared = (p for s in samples if (p := prepare_sample(s, spec, tally)) is not None)
        # now: {"id", "box": CropBox, "hw", "map", "image" uint8 [3,S,S] | "data" bytes}
        yield from chunked(prepared, spec.chunk_size, spec.grid, tally)
        # now: chunks {"ids" [n], "has_map" [n], "weights" [n,g²], "boxes" [n,5], …, counts}


def _joined(spec: StreamSpec, segments: list[Segment], reader, tally: _Tally) -> Iterator[dict]:
    handler = CountingHandler(tally)
    for segment in segments:
        raw = read_segment(spec.urls[segment.shard], segment, handler)
        # now: {"__key__", "jpg" | "png" | …: bytes, "cls", …} for ids in the segment
        yield from attach_rows(raw, segment, reader, tally)


def _bind_reader(url: str | None, generation: str | None):
    """A reader of ``generation`` opened in this process (workers do not share handles)."""
    if url is None or generation is None:
        return None
    from salient.store import SaliencyStore

    return SaliencyStore.open(url).bind(generation)


def init_worker(worker_id: int) -> None:
    """DataLoader worker start: one torch thread, and zarr's pools kept small (PITFALLS.md)."""
    import zarr

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 4})
