"""The streaming loader: webdataset shards → joint crops of image and map → masks → batches.

Per sample (DESIGN.md, "Loader"): read the tar shard → join the map row of the bound
generation by sample id (one store read per tar shard per worker, rows cached in memory) →
shuffle → decode → **one** RandomResizedCrop box + flip, applied to the image and to the map
alike (``crops.py``) → per-patch weights. Per batch, after collation: per-image min-max
normalisation (AMT) and the mask strategy (``masking.plan_masks``). A sample without a valid
map (no store, no generation yet, ``valid = 0``, a NaN row) is masked at random instead and
counted (``has_saliency = False``); a sample whose image does not decode is skipped and
counted — never replaced by a neighbour, which would misalign ids and map rows.

Epochs, ranks and workers (deterministic for ``(seed, epoch, rank)`` and the worker count):

- The shard order is permuted with ``(seed, epoch)``, the same on every rank. The ids in that
  order are cut into ``world_size`` contiguous slices of ``N // W`` or ``N // W + 1`` samples;
  rank ``r`` reads slice ``r`` only, so the ranks see disjoint ids that cover the dataset.
  Each rank's slice is cut again, equally, among its DataLoader workers (a slice border may
  fall inside a tar: both sides stream it and keep their own ids).
- An **epoch** is ``batches_per_rank = N // (W · B)`` batches on every rank, so no rank
  waits for another at the end. The at most ``B`` samples a rank has beyond that are left
  out this epoch (the shuffle picks which) and read anyway, so the epoch's counts are exact.
  If corrupt images leave a rank short, it reads its slice again (a second *pass*, fresh
  crops) until its batches are full.
- The store's current generation is bound once, when the epoch starts; a generation
  published later is used from the next epoch on.

Decoding happens where ``LoaderConfig.decode`` says: ``"worker"`` (DataLoader workers decode
with PIL and crop on the CPU; the default off CUDA) or ``"device"`` (workers ship the JPEG
bytes, the crop box and the cropped map; the main process decodes the batch with
``torchvision.io.decode_jpeg`` on ``device`` and crops and resizes there; the default on
CUDA). Both run on CPU; both crop with ``crops.crop_image``.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from salient.errors import SalientError
from salient.pipeline.crops import (
    CropBox,
    crop_image,
    crop_maps,
    normalize_weights,
    sample_crop_box,
)
from salient.pipeline.ingest import IMAGE_SUFFIXES
from salient.pipeline.manifest import ShardInfo, open_dataset
from salient.pipeline.masking import NEEDS_SALIENCY, STRATEGIES, MaskPlan, mask_counts, plan_masks

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoaderConfig",
    "LoaderError",
    "EpochStats",
    "Segment",
    "SalientLoader",
    "batches_per_rank",
    "epoch_segments",
    "plan_batch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE / timm defaults: what the teacher is fed too
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FIELDS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)  # tar fields: jpg, png, …
JPEG_FIELDS = frozenset({"jpg", "jpeg"})


class LoaderError(SalientError):
    """A loader that cannot run: bad config, a dataset too small for the batch, no samples."""


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class LoaderConfig:
    """One loader (one rank). Ratios are shares of the ``N = (S / P)²`` patches.

    ``strategy_options`` go to ``plan_masks`` as keywords (e.g. ``{"throw": "low"}`` for
    ``amt``). ``epochs`` sets the training progress ``epoch / epochs`` that ``gpa`` schedules
    on. ``decode`` is ``"auto"`` (``"device"`` on CUDA, ``"worker"`` on CPU), ``"worker"`` or
    ``"device"``. ``shuffle_buffer`` is in samples per worker (0 or 1: no shuffle);
    ``chunk_size`` is how many samples a worker sends at a time.
    """

    data: str
    store: str | None = None
    image_size: int = 224
    patch_size: int = 16
    batch_size: int = 64
    strategy: str = "amt"
    mask_ratio: float = 0.45
    throw_ratio: float = 0.40
    strategy_options: dict = field(default_factory=dict)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0
    num_workers: int = 2
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    decode: str = "auto"
    shuffle_buffer: int = 1000
    chunk_size: int = 32
    epochs: int | None = None

    def __post_init__(self):
        _check_sizes(self)
        _check_masking(self)
        _check_crop(self)
        _check_topology(self)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def decode_on(self) -> str:
        """Where images are decoded: ``"worker"`` or ``"device"``."""
        if self.decode != "auto":
            return self.decode
        return "device" if self.device.startswith("cuda") else "worker"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(c: LoaderConfig) -> None:
    if not isinstance(c.data, (str, os.PathLike)) or not str(c.data):
        raise LoaderError(f"the loader needs a dataset directory (got data={c.data!r})")
    for name in ("image_size", "patch_size", "batch_size", "chunk_size"):
        value = getattr(c, name)
        if not _is_int(value) or value < 1:
            raise LoaderError(f"{name} must be a positive integer (got {value!r})")
    if c.image_size % c.patch_size:
        raise LoaderError(f"image_size {c.image_size} is not a multiple of patch_size "
                          f"{c.patch_size}; use e.g. {max(1, c.grid) * c.patch_size}")
    for name in ("num_workers", "shuffle_buffer", "seed"):
        value = getattr(c, name)
        if not _is_int(value) or value < 0:
            raise LoaderError(f"{name} must be an integer >= 0 (got {value!r})")
    if c.epochs is not None and (not _is_int(c.epochs) or c.epochs < 1):
        raise LoaderError(f"epochs must be a positive integer or None (got {c.epochs!r})")


def _check_masking(c: LoaderConfig) -> None:
    if c.strategy not in STRATEGIES:
        raise LoaderError(f"unknown strategy {c.strategy!r}; choose one of "
                          f"{', '.join(sorted(STRATEGIES))}")
    if not 0 <= c.mask_ratio < 1 or not 0 <= c.throw_ratio < 1:
        raise LoaderError(f"mask_ratio and throw_ratio must lie in [0, 1) (got {c.mask_ratio}, "
                          f"{c.throw_ratio})")
    if c.mask_ratio + c.throw_ratio >= 1:
        raise LoaderError(f"mask_ratio + throw_ratio must be < 1 (got {c.mask_ratio} + "
                          f"{c.throw_ratio}); lower one so some patches stay visible")
    if not isinstance(c.strategy_options, dict):
        raise LoaderError(f"strategy_options must be a dict of plan_masks keywords "
                          f"(got {type(c.strategy_options).__name__})")
    mask_counts(c.grid**2, c.mask_ratio, c.throw_ratio)  # masking's own checks, same message


def _check_crop(c: LoaderConfig) -> None:
    (lo, hi), (rlo, rhi) = c.crop_scale, c.crop_ratio
    if not 0 < lo <= hi <= 1:
        raise LoaderError(f"crop_scale must satisfy 0 < min <= max <= 1 (got {c.crop_scale}); "
                          "MAE uses (0.2, 1.0)")
    if not 0 < rlo <= rhi:
        raise LoaderError(f"crop_ratio must satisfy 0 < min <= max (got {c.crop_ratio}); "
                          "the usual is (3/4, 4/3)")
    if not 0 <= c.flip_p <= 1:
        raise LoaderError(f"flip_p must lie in [0, 1] (got {c.flip_p})")


def _check_topology(c: LoaderConfig) -> None:
    if not _is_int(c.world_size) or c.world_size < 1:
        raise LoaderError(f"world_size must be a positive integer (got {c.world_size!r})")
    if not _is_int(c.rank) or not 0 <= c.rank < c.world_size:
        raise LoaderError(f"rank must lie in 0..{c.world_size - 1} (got {c.rank!r})")
    if c.device != "cpu" and not c.device.startswith("cuda"):
        raise LoaderError(f"device must be 'cpu' or 'cuda[:N]' (got {c.device!r})")
    if c.decode not in ("auto", "worker", "device"):
        raise LoaderError(f"decode must be 'auto', 'worker' or 'device' (got {c.decode!r})")


# ---------------------------------------------------------------- epoch plan (pure)


class Segment(NamedTuple):
    """Ids ``[start, stop)`` of one tar shard that one worker reads."""

    shard: int
    start: int
    stop: int


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (seed, epoch, rank, …)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: ``N // (W · B)`` (the same on every rank)."""
    return num_samples // (world_size * batch_size)


def _share(total: int, part: int, parts: int) -> tuple[int, int]:
    """Part ``part`` of ``parts`` near-equal contiguous pieces of ``range(total)``."""
    return total * part // parts, total * (part + 1) // parts


def epoch_segments(shards: list[ShardInfo], seed: int, epoch: int, rank: int, world_size: int,
                   worker: int = 0, num_workers: int = 1) -> list[Segment]:
    """The id ranges one (rank, worker) reads in ``epoch``, in reading order.

    The shard order is a permutation seeded by ``(seed, epoch)``; the ids in that order are
    split into ``world_size`` contiguous slices, and a rank's slice into ``num_workers``.
    """
    order = np.random.default_rng(mix_seed(seed, epoch)).permutation(len(shards))
    total = sum(s.count for s in shards)
    lo, hi = _share(total, rank, world_size)
    w_lo, w_hi = _share(hi - lo, worker, num_workers)
    lo, hi = lo + w_lo, lo + w_hi
    segments, position = [], 0
    for index in order:
        shard = shards[index]
        a, b = max(lo, position), min(hi, position + shard.count)
        if a < b:
            first = shard.first_id - position
            segments.append(Segment(shard.index, first + a, first + b))
        position += shard.count
    return segments


# ---------------------------------------------------------------- per-epoch counts


@dataclass
class EpochStats:
    """What one rank's epoch did. ``corrupt`` counts distinct ids whose image did not decode;
    ``fallback`` counts batch samples masked at random for want of a valid map;
    ``store_reads`` is one per tar segment a worker read rows for."""

    epoch: int
    rank: int
    generation: str | None
    batches: int = 0
    samples: int = 0
    fallback: int = 0
    corrupt: int = 0
    shard_errors: int = 0
    store_reads: int = 0
    passes: int = 0
    corrupt_ids: set = field(default_factory=set)

    def absorb(self, chunk: dict) -> None:
        self.corrupt_ids.update(chunk["corrupt"])
        self.corrupt = len(self.corrupt_ids)
        self.shard_errors += chunk["shard_errors"]
        self.store_reads += chunk["store_reads"]

    def as_dict(self) -> dict:
        body = asdict(self)
        body["corrupt_ids"] = sorted(self.corrupt_ids)
        return body


class _Tally:
    """A worker's counts since its last chunk; flushed into each chunk it sends."""

    def __init__(self):
        self.corrupt: list[int] = []
        self.shard_errors = 0
        self.store_reads = 0

    def flush(self) -> dict:
        out = {"corrupt": self.corrupt, "shard_errors": self.shard_errors,
               "store_reads": self.store_reads}
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
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler,
                                  select_files=wanted)
        yield from group_by_keys(files, handler=handler)


def attach_rows(samples: Iterable[dict], segment: Segment, reader, tally: _Tally) -> Iterator[dict]:
    """Add ``id`` and ``map`` (``float16 [G,G]`` or None): ONE store read for the segment."""
    maps = valid = None
    if reader is not None:
        maps, valid = reader.read_range(segment.start, segment.stop)  # one read per tar shard
        tally.store_reads += 1
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
    generator = torch.Generator().manual_seed(mix_seed(spec.seed, spec.epoch, spec.pass_index,
                                                       sample_id))
    return sample_crop_box(height, width, generator, scale=spec.crop_scale,
                           ratio=spec.crop_ratio, flip_p=spec.flip_p)


def crop_map_rows(rows: list[np.ndarray | None], boxes: list[CropBox],
                  hws: list[tuple[int, int]], grid: int) -> torch.Tensor:
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
        out["image"] = crop_image(image, box, spec.image_size)  # [3,S,S] uint8
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
        chunk["data"] = torch.frombuffer(bytearray(b"".join(i["data"] for i in items)),
                                         dtype=torch.uint8)  # all bytes, one tensor
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
        segments = epoch_segments(list(spec.shards), spec.seed, spec.epoch, spec.rank,
                                  spec.world_size, worker, workers)
        reader = _bind_reader(spec.store, spec.generation)
        rng = np.random.default_rng(mix_seed(spec.seed, spec.epoch, spec.pass_index, spec.rank,
                                             worker))
        samples = _joined(spec, segments, reader, tally)
        # now: {"__key__", "jpg": bytes, …, "id": int, "map": float16 [G,G] | None}
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


# ---------------------------------------------------------------- main process


class _Item(NamedTuple):
    """One sample in the main process, before its batch is assembled."""

    id: int
    has_map: bool
    weights: torch.Tensor  # [g²] float32, raw
    box: CropBox
    image: torch.Tensor | None  # [3,S,S] uint8 (worker decode)
    data: torch.Tensor | None  # [bytes] uint8 (device decode)
    ext: str | None
    hw: tuple[int, int] | None


def unpack_chunk(chunk: dict) -> Iterator[_Item]:
    """The samples of one chunk (views into its tensors, no copies)."""
    for i, sample_id in enumerate(chunk["ids"].tolist()):
        top, left, height, width, flip = chunk["boxes"][i].tolist()
        box = CropBox(top, left, height, width, bool(flip))
        if "images" in chunk:
            yield _Item(sample_id, bool(chunk["has_map"][i]), chunk["weights"][i], box,
                        chunk["images"][i], None, None, None)
        else:
            a, b = chunk["offsets"][i].item(), chunk["offsets"][i + 1].item()
            yield _Item(sample_id, bool(chunk["has_map"][i]), chunk["weights"][i], box, None,
                        chunk["data"][a:b], chunk["ext"][i], tuple(chunk["hw"][i].tolist()))


def decode_on_device(items: list[_Item], device: torch.device) -> list[torch.Tensor | None]:
    """``uint8 [3,H,W]`` images on ``device``: JPEGs in one ``decode_jpeg`` call (nvjpeg on
    CUDA, libjpeg-turbo on CPU), other formats with PIL. None for an image that fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(items)
    jpegs = [i for i, item in enumerate(items) if item.ext in JPEG_FIELDS]
    try:
        if jpegs:
            decoded = decode_jpeg([items[i].data for i in jpegs], mode=ImageReadMode.RGB,
                                  device=device)
            for i, image in zip(jpegs, decoded):
                out[i] = image
    except RuntimeError:  # one bad file fails the batch call: retry one by one
        for i in jpegs:
            out[i] = _decode_one(items[i].data, device)
    for i, item in enumerate(items):
        if out[i] is None and i not in jpegs:
            image = decode_pil(item.data.numpy().tobytes())
            out[i] = None if image is None else image.to(device)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        image = decode_pil(data.numpy().tobytes())  # PIL reads some JPEGs nvjpeg rejects
        return None if image is None else image.to(device)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B,3,S,S]`` → float, ImageNet mean/std (MAE's input normalisation)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().mul_(1 / (255.0 * std)).sub_(mean / std)  # (x/255 - mean) / std


def plan_batch(strategy: str, weights: torch.Tensor, has_map: torch.Tensor, mask_ratio: float,
               throw_ratio: float, generator: torch.Generator, progress: float,
               options: dict) -> MaskPlan:
    """The batch's mask plan: ``strategy`` on rows with a map, ``random`` on the others.

    ``weights [B, N]`` raw; normalised here per image (AMT: min-max to [0, 1] + eps).
    """
    if strategy not in NEEDS_SALIENCY or not bool(has_map.any()):
        name = strategy if strategy not in NEEDS_SALIENCY else "random"
        ones = torch.ones_like(weights)
        return plan_masks(name, ones, mask_ratio, throw_ratio, generator=generator,
                          progress=progress, **(options if name == strategy else {}))
    rows = has_map.nonzero().squeeze(1)
    plan = plan_masks(strategy, normalize_weights(weights[rows]), mask_ratio, throw_ratio,
                      generator=generator, progress=progress, **options)
    if len(rows) == len(weights):
        return plan
    others = (~has_map).nonzero().squeeze(1)
    fallback = plan_masks("random", torch.ones_like(weights[others]), mask_ratio, throw_ratio,
                          generator=generator)
    return MaskPlan(*(_scatter_rows(a, b, rows, others) for a, b in zip(plan, fallback)))


def _scatter_rows(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                  others: torch.Tensor) -> torch.Tensor:
    out = torch.empty((len(rows) + len(others), a.shape[1]), dtype=a.dtype, device=a.device)
    out[rows], out[others] = a, b
    return out


class SalientLoader:
    """Batches of one rank, one epoch at a time: ``for batch in loader.epoch(e): …``.

    Raises:
        LoaderError: the dataset holds fewer than ``world_size · batch_size`` samples.
        DatasetError / StoreError: a bad dataset, or a store made for another dataset.
    """

    def __init__(self, config: LoaderConfig):
        self.config = config
        self.dataset = open_dataset(config.data)
        self.device = torch.device(config.device)
        self.batches_per_rank = batches_per_rank(self.dataset.num_samples, config.world_size,
                                                 config.batch_size)
        if self.batches_per_rank < 1:
            raise LoaderError(f"{self.dataset.num_samples} samples give no full batch of "
                              f"{config.batch_size} on each of {config.world_size} ranks; "
                              "lower batch_size")
        self.num_workers = self._clamped_workers()
        self.stats: EpochStats | None = None
        self._store = None
        self._warned = False

    def __len__(self) -> int:
        return self.batches_per_rank

    def _clamped_workers(self) -> int:
        """No more DataLoader workers than shards' worth of samples on this rank: beyond that
        workers would stream the same tar for a handful of samples each."""
        per_rank = self.dataset.num_samples // self.config.world_size
        shards_worth = max(1, math.ceil(per_rank / self.dataset.manifest.shard_size))
        return min(self.config.num_workers, shards_worth)

    # ------------------------------------------------------------ the generation

    def bind_generation(self) -> str | None:
        """The store's current generation, or None (one warning per loader) when there is no
        store or no published generation yet. Strategies without maps read no store."""
        if self.config.strategy not in NEEDS_SALIENCY:
            return None
        store = self._open_store()
        generation = store.current() if store is not None else None
        if generation is None and not self._warned:
            self._warned = True
            where = ("no store given" if self.config.store is None else
                     f"store {self.config.store} does not exist yet" if store is None else
                     f"store {self.config.store} has no published generation yet")
            warnings.warn(f"{where}: strategy {self.config.strategy} falls back to random "
                          "masking until a generation is published (checked every epoch)",
                          stacklevel=3)
        return generation

    def _open_store(self):
        url = self.config.store
        if self._store is not None or url is None:
            return self._store
        from salient.store import SaliencyStore, store_exists

        if not store_exists(url):
            return None  # not created yet: the first refresh creates it
        self._store = SaliencyStore.open(url, dataset=self.dataset)  # fingerprint checked
        return self._store

    # ------------------------------------------------------------ an epoch

    def epoch(self, epoch: int, progress: float | None = None) -> Iterator[dict]:
        """This rank's ``len(self)`` batches of ``epoch``; ``self.stats`` counts as it goes.

        ``progress`` (for ``gpa``) defaults to ``epoch / config.epochs`` (0 without epochs).
        The generation is bound here, once, before the first batch.
        """
        c = self.config
        if progress is None:
            progress = epoch / c.epochs if c.epochs else 0.0
        generation = self.bind_generation()
        self.stats = stats = EpochStats(epoch=epoch, rank=c.rank, generation=generation)
        items = self._items(epoch, generation, stats)
        for index in range(self.batches_per_rank):
            ready = self._take_ready(items, stats)
            # now: batch_size samples with images uint8 [3,S,S] on the device
            yield self._batch(ready, epoch, index, generation, progress, stats)
        for _ in items.remaining():  # the left-over samples: read so the counts are exact
            pass

    def _items(self, epoch: int, generation: str | None, stats: EpochStats) -> "_Passes":
        return _Passes(self, epoch, generation, stats)

    def _stream(self, epoch: int, pass_index: int, generation: str | None) -> Iterator[dict]:
        c = self.config
        shards = tuple(self.dataset.shards)
        spec = StreamSpec(
            urls=tuple(self.dataset.shard_urls()), shards=shards, store=self._store_url(generation),
            generation=generation, seed=c.seed, epoch=epoch, pass_index=pass_index, rank=c.rank,
            world_size=c.world_size, image_size=c.image_size, grid=c.grid,
            crop_scale=tuple(c.crop_scale), crop_ratio=tuple(c.crop_ratio), flip_p=c.flip_p,
            decode_on=c.decode_on, shuffle_buffer=c.shuffle_buffer, chunk_size=c.chunk_size)
        stream = SampleStream(spec)
        if self.num_workers == 0:
            return iter(stream)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=init_worker,
            pin_memory=self.device.type == "cuda", prefetch_factor=4)
        return iter(loader)

    def _store_url(self, generation: str | None) -> str | None:
        return None if generation is None else self._store.url

    def _take_ready(self, items: "_Passes", stats: EpochStats) -> list[tuple[_Item, torch.Tensor]]:
        """``batch_size`` samples with their cropped images, skipping any that fail to decode
        on the device (counted) and taking more in their place."""
        ready: list[tuple[_Item, torch.Tensor]] = []
        while len(ready) < self.config.batch_size:
            want = [items.next() for _ in range(self.config.batch_size - len(ready))]
            got = self._images_for(want, stats)
            items.good += len(got)
            ready += got
        return ready

    def _images_for(self, items: list[_Item],
                    stats: EpochStats) -> list[tuple[_Item, torch.Tensor]]:
        if items[0].image is not None:  # decoded and cropped by the workers
            return [(item, item.image) for item in items]
        decoded = decode_on_device(items, self.device)
        out = []
        for item, image in zip(items, decoded):
            if image is None:
                stats.corrupt_ids.add(item.id)
                stats.corrupt = len(stats.corrupt_ids)
                continue
            out.append((item, crop_image(image, item.box, self.config.image_size)))
        return out

    def _batch(self, ready: list[tuple[_Item, torch.Tensor]], epoch: int, index: int,
               generation: str | None, progress: float, stats: EpochStats) -> dict:
        c, items = self.config, [item for item, _ in ready]
        images = torch.stack([image for _, image in ready])  # [B,3,S,S]
        images = normalize_images(images.to(self.device, non_blocking=True))
        # now: images float [B,3,S,S] normalised, on the device
        has_map = torch.tensor([item.has_map for item in items], dtype=torch.bool)
        weights = torch.stack([item.weights for item in items]).to(self.device)  # [B,N] raw
        generator = torch.Generator(self.device).manual_seed(mix_seed(c.seed, epoch, c.rank, index))
        plan = plan_batch(c.strategy, weights, has_map.to(self.device), c.mask_ratio,
                          c.throw_ratio, generator, progress, c.strategy_options)
        # now: visible / mask / throw indices [B,V] / [B,M] / [B,T]
        stats.batches += 1
        stats.samples += len(items)
        if c.strategy in NEEDS_SALIENCY:
            stats.fallback += int((~has_map).sum())
        return {"images": images, "visible_idx": plan.visible_idx, "mask_idx": plan.mask_idx,
                "throw_idx": plan.throw_idx,
                "ids": torch.tensor([item.id for item in items], dtype=torch.int64),
                "has_saliency": has_map, "generation": generation,
                "crop_boxes": torch.tensor([list(item.box) for item in items], dtype=torch.int64)}


class _Passes:
    """The samples of one rank's epoch: pass 0 over its slice, then more passes (fresh crops)
    only if corrupt images left it short of ``batches_per_rank`` batches."""

    def __init__(self, loader: SalientLoader, epoch: int, generation: str | None,
                 stats: EpochStats):
        self.loader, self.epoch, self.generation, self.stats = loader, epoch, generation, stats
        self.pass_index, self.good = -1, 0  # good: samples of this pass with a usable image
        self.pending: Iterator[_Item] = iter(())
        self.chunks: Iterator[dict] = iter(())

    def next(self) -> _Item:
        while True:
            item = next(self.pending, None)
            if item is not None:
                return item
            chunk = next(self.chunks, None)
            if chunk is None:
                self._next_pass()
                continue
            self.stats.absorb(chunk)
            self.pending = unpack_chunk(chunk)

    def _next_pass(self) -> None:
        if self.pass_index >= 0 and self.good == 0:
            raise LoaderError(f"rank {self.loader.config.rank} found no readable sample in its "
                              f"shards of {self.loader.dataset.root} (epoch {self.epoch}); "
                              "check the shards (see the warnings) or re-run ingest")
        self.pass_index += 1
        self.good = 0
        self.stats.passes = self.pass_index + 1
        self.chunks = self.loader._stream(self.epoch, self.pass_index, self.generation)

    def remaining(self) -> Iterator[_Item]:
        """What is left of the current pass (its counts absorbed on the way)."""
        yield from self.pending
        for chunk in self.chunks:
            self.stats.absorb(chunk)
            yield from unpack_chunk(chunk)
