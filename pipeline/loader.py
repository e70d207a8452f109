"""The streaming loader: webdataset shards → joint crops of image and map → masks → batches.

Per sample (DESIGN.md, "Loader"), across the modules in the order a sample meets them:

- ``epochs.py`` (pure): the ids each (rank, worker) reads this epoch (``epoch_segments``), the
  batches every rank yields (``batches_per_rank``), the epoch's counts (``EpochStats``).
- ``stages.py`` (DataLoader workers): read the tar shard → join the map row of the bound
  generation by sample id (one store read per tar segment) → shuffle → decode → **one**
  RandomResizedCrop box + flip for image and map alike (``crops.py``) → collate into chunks.
- this module (main process): ``SalientLoader`` binds the store's current generation once per
  epoch (one published later is used from the next epoch on), unpacks chunks, normalises
  images (ImageNet mean/std), turns each image's cropped map into sampling weights in the
  order its strategy's paper uses (``masking.NORMALIZED_OVER``: the whole image's map for
  AMT, re-normalised over the crop for AttMask and GPA), plans the masks.
- ``loader_config.py``: ``LoaderConfig`` checks itself; ``LoaderError``.

A sample without a valid map (no store, no generation yet, ``valid = 0``, a NaN row) is masked
at random and counted (``has_saliency = False``); one whose image does not decode is skipped
and counted — never replaced by a neighbour, which would misalign ids and map rows. A rank
left short by corrupt images reads its slice again (a new pass, fresh crops).

Decoding happens where ``LoaderConfig.decode`` says: ``"worker"`` (workers decode with PIL and
crop on the CPU; the default off CUDA) or ``"device"`` (workers ship the JPEG bytes, the crop
box and the cropped map; the main process decodes the batch with ``torchvision.io.decode_jpeg``
on ``device`` and crops and resizes there; the default on CUDA). Both run on CPU; both crop
with ``crops.crop_image``.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from salient.pipeline.crops import CropBox, crop_image, normalize_weights
from salient.pipeline.epochs import EpochStats, Segment, batches_per_rank, epoch_segments, mix_seed
from salient.pipeline.loader_config import LoaderConfig, LoaderError
from salient.pipeline.manifest import open_dataset
from salient.pipeline.masking import NEEDS_SALIENCY, NORMALIZED_OVER, MaskPlan, plan_masks
from salient.pipeline.stages import SampleStream, StreamSpec, decode_pil, init_worker

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EpochStats",
    "LoaderConfig",
    "LoaderError",
    "SalientLoader",
    "Segment",
    "batches_per_rank",
    "epoch_segments",
    "gpa_targets",
    "plan_batch",
    "sampling_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE / timm defaults: what the teacher is fed too
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_FIELDS = frozenset({"jpg", "jpeg"})


class _Item(NamedTuple):
    """One sample in the main process, before its batch is assembled."""

    id: int
    has_map: bool
    weights: torch.Tensor  # [g²] float32: the whole-image-normalised map under the crop
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
            yield _Item(
                sample_id,
                bool(chunk["has_map"][i]),
                chunk["weights"][i],
                box,
                chunk["images"][i],
                None,
                None,
                None,
            )
        else:
            a, b = chunk["offsets"][i].item(), chunk["offsets"][i + 1].item()
            yield _Item(
                sample_id,
                bool(chunk["has_map"][i]),
                chunk["weights"][i],
                box,
                None,
                chunk["data"][a:b],
                chunk["ext"][i],
                tuple(chunk["hw"][i].tolist()),
            )


def decode_on_device(items: list[_Item], device: torch.device) -> list[torch.Tensor | None]:
    """``uint8 [3,H,W]`` images on ``device``: JPEGs in one ``decode_jpeg`` call (nvjpeg on
    CUDA, libjpeg-turbo on CPU), other formats with PIL. None for an image that fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(items)
    jpegs = [i for i, item in enumerate(items) if item.ext in JPEG_FIELDS]
    try:
        if jpegs:
            decoded = decode_jpeg(
                [items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device
            )
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


def sampling_weights(strategy: str, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sampling weights ``[B, N]`` from the cropped weights (each map already normalised over
    its whole image by the workers): ``"image"`` strategies (AMT) take them as they are plus
    ``eps``, ``"crop"`` strategies (AttMask, GPA) min-max normalise the crop again plus
    ``eps`` (``masking.NORMALIZED_OVER``; README, "Decisions")."""
    if NORMALIZED_OVER.get(strategy) == "crop":
        return normalize_weights(weights, eps)
    return weights.float() + eps


def plan_batch(
    strategy: str,
    weights: torch.Tensor,
    has_map: torch.Tensor,
    mask_ratio: float,
    throw_ratio: float,
    generator: torch.Generator,
    progress: float,
    options: dict,
    unit: int = 1,
) -> MaskPlan:
    """The batch's mask plan: ``strategy`` on rows with a map, ``random`` on the others (with
    the batch's counts; ``unit``: patches per side of a mask unit).

    ``weights [B, N]``: each map normalised over its whole image, then cropped; turned into
    sampling weights here by :func:`sampling_weights`.
    """
    if strategy in NEEDS_SALIENCY and not bool(has_map.any()):
        return plan_masks(
            "random",
            torch.ones_like(weights),
            mask_ratio,
            throw_ratio,
            generator=generator,
            progress=progress,
            unit=unit,
        )
    if strategy not in NEEDS_SALIENCY:
        weights = torch.ones_like(weights)
    else:
        weights = sampling_weights(strategy, weights)
    return plan_masks(
        strategy,
        weights,
        mask_ratio,
        throw_ratio,
        generator=generator,
        progress=progress,
        unit=unit,
        random_rows=None if bool(has_map.all()) else ~has_map,
        **options,
    )


def gpa_targets(weights: torch.Tensor, has_map: torch.Tensor) -> torch.Tensor:
    """GPA's reconstruction target ``[B, N]``: each cropped map standardised over the crop's
    patches (GPA's code, ``forward_atten_loss``: ``(t − mean) / sqrt(var + 1e-6)``, invariant
    to the whole-image normalisation before it); zeros for rows without a map."""
    target = weights.float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    return torch.where(has_map[:, None], target, torch.zeros_like(target))


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
        self.batches_per_rank = batches_per_rank(
            self.dataset.num_samples, config.world_size, config.batch_size
        )
        if self.batches_per_rank < 1:
            raise LoaderError(
                f"{self.dataset.num_samples} samples give no full batch of "
                f"{config.batch_size} on each of {config.world_size} ranks; "
                "lower batch_size"
            )
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
        store or no published generation yet. Strategies without maps read no store (unless
        the batches carry GPA's target). A ``gpa_target`` loader refuses a generation whose
        maps are not of kind ``gpa``."""
        if self.config.strategy not in NEEDS_SALIENCY and not self.config.gpa_target:
            return None
        store = self._open_store()
        generation = store.current() if store is not None else None
        if generation is None and not self._warned:
            self._warned = True
            where = (
                "no store given"
                if self.config.store is None
                else f"store {self.config.store} does not exist yet"
                if store is None
                else f"store {self.config.store} has no published generation yet"
            )
            warnings.warn(
                f"{where}: strategy {self.config.strategy} falls back to random "
                "masking until a generation is published (checked every epoch)",
                stacklevel=3,
            )
        if generation is not None and self.config.gpa_target:
            self._check_target_kind(store, generation)
        return generation

    def _check_target_kind(self, store, generation: str) -> None:
        kind = store.bind(generation).attrs.get("kind")
        if kind != "gpa":
            raise LoaderError(
                f"GPA's reconstruction target needs maps of kind gpa, but generation "
                f"{generation} of {self.config.store} holds {kind} maps; refresh with "
                "--kind gpa (in training: --saliency-kind gpa), or turn the target off"
            )

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

    def _items(self, epoch: int, generation: str | None, stats: EpochStats) -> _Passes:
        return _Passes(self, epoch, generation, stats)

    def _stream(self, epoch: int, pass_index: int, generation: str | None) -> Iterator[dict]:
        c = self.config
        shards = tuple(self.dataset.shards)
        spec = StreamSpec(
            urls=tuple(self.dataset.shard_urls()),
            shards=shards,
            store=self._store_url(generation),
            generation=generation,
            seed=c.seed,
            epoch=epoch,
            pass_index=pass_index,
            rank=c.rank,
            world_size=c.world_size,
            image_size=c.image_size,
            grid=c.grid,
            crop_scale=tuple(c.crop_scale),
            crop_ratio=tuple(c.crop_ratio),
            flip_p=c.flip_p,
            interpolation=c.interpolation,
            decode_on=c.decode_on,
            shuffle_buffer=c.shuffle_buffer,
            chunk_size=c.chunk_size,
        )
        stream = SampleStream(spec)
        if self.num_workers == 0:
            return iter(stream)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=init_worker,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4,
        )
        return iter(loader)

    def _store_url(self, generation: str | None) -> str | None:
        return None if generation is None else self._store.url

    def _take_ready(self, items: _Passes, stats: EpochStats) -> list[tuple[_Item, torch.Tensor]]:
        """``batch_size`` samples with their cropped images, skipping any that fail to decode
        on the device (counted) and taking more in their place."""
        ready: list[tuple[_Item, torch.Tensor]] = []
        while len(ready) < self.config.batch_size:
            want = [items.next() for _ in range(self.config.batch_size - len(ready))]
            got = self._images_for(want, stats)
            items.good += len(got)
            ready += got
        return ready

    def _images_for(
        self, items: list[_Item], stats: EpochStats
    ) -> list[tuple[_Item, torch.Tensor]]:
        if items[0].image is not None:  # decoded and cropped by the workers
            return [(item, item.image) for item in items]
        decoded = decode_on_device(items, self.device)
        out = []
        for item, image in zip(items, decoded):
            if image is None:
                stats.corrupt_ids.add(item.id)
                stats.corrupt = len(stats.corrupt_ids)
                continue
            crop = crop_image(image, item.box, self.config.image_size, self.config.interpolation)
            out.append((item, crop))
        return out

    def _batch(
        self,
        ready: list[tuple[_Item, torch.Tensor]],
        epoch: int,
        index: int,
        generation: str | None,
        progress: float,
        stats: EpochStats,
    ) -> dict:
        c, items = self.config, [item for item, _ in ready]
        images = torch.stack([image for _, image in ready])  # [B,3,S,S]
        images = normalize_images(images.to(self.device, non_blocking=True))
        # now: images float [B,3,S,S] normalised, on the device
        has_map = torch.tensor([item.has_map for item in items], dtype=torch.bool)
        weights = torch.stack([item.weights for item in items]).to(self.device)  # [B,N]
        generator = torch.Generator(self.device).manual_seed(mix_seed(c.seed, epoch, c.rank, index))
        plan = plan_batch(
            c.strategy,
            weights,
            has_map.to(self.device),
            c.mask_ratio,
            c.throw_ratio,
            generator,
            progress,
            c.strategy_options,
            c.unit,
        )
        # now: visible / mask / throw indices [B,V] / [B,M] / [B,T]
        stats.batches += 1
        stats.samples += len(items)
        if c.strategy in NEEDS_SALIENCY:
            stats.fallback += int((~has_map).sum())
        extra = {}
        if c.gpa_target:
            extra["gpa_target"] = gpa_targets(weights, has_map.to(self.device))  # [B, N]
        return {
            **extra,
            "images": images,
            "visible_idx": plan.visible_idx,
            "mask_idx": plan.mask_idx,
            "throw_idx": plan.throw_idx,
            "ids": torch.tensor([item.id for item in items], dtype=torch.int64),
            "has_saliency": has_map,
            "generation": generation,
            "crop_boxes": torch.tensor([list(item.box) for item in items], dtype=torch.int64),
        }


class _Passes:
    """The samples of one rank's epoch: pass 0 over its slice, then more passes (fresh crops)
    only if corrupt images left it short of ``batches_per_rank`` batches."""

    def __init__(
        self, loader: SalientLoader, epoch: int, generation: str | None, stats: EpochStats
    ):
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
            raise LoaderError(
                f"rank {self.loader.config.rank} found no readable sample in its "
                f"shards of {self.loader.dataset.root} (epoch {self.epoch}); "
                "check the shards (see the warnings) or re-run ingest"
            )
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
