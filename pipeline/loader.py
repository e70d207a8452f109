"""The streaming loader: webdataset shards → joint crops of image and map → masks → batches.

``SalientLoader(LoaderConfig)`` yields one rank's batches of an epoch (``loader.epoch(e)``).
The epoch's generation is bound once, before its first batch: a trainer's choice (it holds
the lease), or the store's current one, which the loader holds by a reader lease until the
epoch ends. A sample without a valid map is masked at random and counted
(``has_saliency = False``; rows of damaged store chunks also as ``corrupt_maps``, one warning
per chunk); one whose image does not decode is skipped and counted, never replaced by a
neighbour. Decoding runs in the DataLoader workers (PIL) or on ``device`` (nvjpeg on CUDA),
the same crop box either way.

The per-sample path and the module that holds each step (``epochs`` → ``stages`` and
``shards`` → ``crops`` → ``masking``): docs/ARCHITECTURE.md, "Loader". Importing this module
touches no disk, GPU or Ray.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from salient import urls
from salient.pipeline import shards
from salient.pipeline.crops import CropBox, crop_image, normalize_weights
from salient.pipeline.epochs import EpochStats, Segment, batches_per_rank, epoch_segments, mix_seed
from salient.pipeline.loader_config import LoaderConfig, LoaderError
from salient.pipeline.manifest import open_dataset
from salient.pipeline.masking import (
    NEEDS_SALIENCY,
    NORMALIZED_OVER,
    SCHEDULE_OPTIONS,
    MaskPlan,
    plan_mask_flags,
    plan_masks,
)
from salient.pipeline.stages import (
    PassPlan,
    SampleStream,
    StreamSpec,
    init_worker,
    keep_as_is,
    reuse_freed_memory,
)
from salient.store import (
    GenerationNotFoundError,
    Lease,
    NotPublishedError,
    SaliencyStore,
    store_exists,
)

__all__ = [
    "CURRENT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EpochStats",
    "LoaderConfig",
    "LoaderError",
    "SalientLoader",
    "Segment",
    "batches_per_rank",
    "check_gpa_kind",
    "epoch_segments",
    "gpa_targets",
    "head_map_batch",
    "plan_batch",
    "plan_view_masks",
    "sampling_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE / timm defaults: what the teacher is fed too
IMAGENET_STD = (0.229, 0.224, 0.225)
CURRENT = object()  # SalientLoader.epoch(generation=CURRENT): the store's current generation
_HOLD_TRIES = 3  # choices of the current generation before a lease on it is given up


@dataclass(frozen=True)
class _Rows:
    """A run of samples in the main process: columns of equal length (views, no copies)."""

    ids: np.ndarray  # [n] int64
    has_map: np.ndarray  # [n] bool
    weights: np.ndarray  # [n, g²] float32: the whole-image-normalised map under the crop
    boxes: np.ndarray  # [n, 5] int64: top, left, height, width, flip
    images: torch.Tensor | None  # [n,3,S,S] uint8, cropped (worker decode, or once decoded)
    data: list | None  # [(field, bytes)] (device decode, before it)
    locals: torch.Tensor | None = None  # [n,L,3,s,s] uint8: multi-crop's local views
    # With views: weights [n,G,g²], boxes [n,G,5], images [n,G,3,S,S] (the global views).
    heads: np.ndarray | None = None  # [n, H, g²] float32: per-head maps under the crop

    @classmethod
    def of(cls, chunk: dict) -> _Rows:
        columns = ("ids", "has_map", "weights", "boxes")
        images, locals_ = (chunk.get(k) for k in ("images", "locals"))
        images = None if images is None else torch.from_numpy(images)
        locals_ = None if locals_ is None else torch.from_numpy(locals_)
        heads = chunk.get("heads")
        return cls(*(chunk[k] for k in columns), images, chunk.get("data"), locals_, heads)

    def __len__(self) -> int:
        return len(self.ids)

    def part(self, rows) -> _Rows:
        """The rows ``rows`` (a slice or a boolean mask) of every column."""
        data = self.data
        if data is not None:
            data = data[rows] if isinstance(rows, slice) else [d for d, k in zip(data, rows) if k]
        images = None if self.images is None else self.images[rows]
        locals_ = None if self.locals is None else self.locals[rows]
        heads = None if self.heads is None else self.heads[rows]
        return _Rows(
            self.ids[rows],
            self.has_map[rows],
            self.weights[rows],
            self.boxes[rows],
            images,
            data,
            locals_,
            heads,
        )


def _box(row: np.ndarray) -> CropBox:
    top, left, height, width, flip = row.tolist()
    return CropBox(top, left, height, width, bool(flip))


def decode_and_crop(
    rows: _Rows, device: torch.device, size: int, interpolation: str
) -> tuple[_Rows, list[int]]:
    """Device decode: the rows whose image decodes, cropped on ``device`` (``images`` set),
    and the ids whose image did not decode."""
    decoded = shards.decode_images(rows.data, device)
    keep = np.array([image is not None for image in decoded], dtype=bool)
    crops = [
        crop_image(im, _box(b), size, interpolation)
        for im, b in zip(decoded, rows.boxes)
        if im is not None
    ]
    good = rows.part(keep)
    images = torch.stack(crops) if crops else torch.empty((0, 3, size, size), dtype=torch.uint8)
    cropped = replace(good, images=images, data=None)
    return cropped, rows.ids[~keep].tolist()


def normalize_images(pieces: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 ``[n_i,3,S,S]`` pieces → one float batch ``[B,3,S,S]`` on ``device``, ImageNet
    mean/std (MAE's input normalisation), written straight into the batch (no uint8 batch in
    between). Multi-crop pieces ``[n_i,V,3,S,S]`` give ``[V,B,3,S,S]`` (view-major)."""
    lead = len(pieces[0].shape) - 4  # 1 with views
    size = pieces[0].shape[-1]
    total = sum(len(p) for p in pieces)
    out = torch.empty((*pieces[0].shape[1 : 1 + lead], total, 3, size, size), device=device)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    scale, shift = 1 / (255.0 * std), mean / std
    start = 0
    for piece in pieces:
        part = out[..., start : start + len(piece), :, :, :]
        start += len(piece)
        part.copy_(piece.to(device, non_blocking=True).movedim(0, lead))
        part.mul_(scale).sub_(shift)  # (x/255-m)/s
    return out


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


def plan_view_masks(
    strategy: str,
    weights: torch.Tensor,
    has_map: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator,
    progress: float,
    options: dict,
) -> torch.Tensor:
    """Multi-crop masks, bool ``[V, B, N]`` (True = masked), planned per global view with
    ``plan_mask_flags`` over the ``V·B`` rows at once (one ratio for the batch, as AttMask
    plans both global views of a batch together): ``strategy`` on the rows with a map,
    ``random`` on the others; ``weights [V, B, N]`` as in :func:`plan_batch`."""
    views, batch, n = weights.shape
    has = has_map.repeat(views)  # [V·B]: row v·B + b is sample b
    flat = weights.reshape(views * batch, n)
    random_rows = None
    if strategy in NEEDS_SALIENCY and not bool(has.any()):
        strategy = "random"  # the batch's counts, the schedule kept
        options = {k: v for k, v in options.items() if k in SCHEDULE_OPTIONS}
    if strategy in NEEDS_SALIENCY:
        flat = sampling_weights(strategy, flat)
        random_rows = None if bool(has.all()) else ~has
    else:
        flat = torch.ones_like(flat)
    flags = plan_mask_flags(
        strategy,
        flat,
        mask_ratio,
        generator=generator,
        progress=progress,
        random_rows=random_rows,
        **options,
    )
    return flags.view(views, batch, n)


def head_map_batch(ready: list[_Rows], heads: int, grid: int, device: torch.device) -> torch.Tensor:
    """The batch's per-head maps ``[B, H, g, g]`` on ``device``: each head cropped with its
    image and summing over the crop to its whole-image sum (raw attention, AutoMAE's
    generator input); zeros for samples without a map (``has_saliency`` False)."""
    flat = torch.from_numpy(np.concatenate([rows.heads for rows in ready]))  # [B, H, g²]
    return flat.view(-1, heads, grid, grid).to(device, non_blocking=True)


def gpa_targets(weights: torch.Tensor, has_map: torch.Tensor) -> torch.Tensor:
    """GPA's reconstruction target ``[B, N]``: each cropped map standardised over the crop's
    patches (GPA's code, ``forward_atten_loss``: ``(t − mean) / sqrt(var + 1e-6)``, invariant
    to the whole-image normalisation before it); zeros for rows without a map."""
    target = weights.float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    return torch.where(has_map[:, None], target, torch.zeros_like(target))


def check_gpa_kind(
    store, generation: str, error: type[Exception] = LoaderError, setting: str = "gpa_target"
) -> None:
    """Raises ``error`` unless ``generation`` of ``store`` (a ``SaliencyStore``) holds maps
    of kind ``gpa``, the maps GPA's reconstruction target reads: the one check of it, for a
    ``gpa_target`` loader and for a run's ``--gpa-loss-weight`` before any work (``setting``
    names what asks for the target)."""
    kind = store.bind(generation).attrs.get("kind")
    if kind != "gpa":
        raise error(
            f"{setting} (GPA's reconstruction target) needs maps of kind gpa, but generation "
            f"{generation} of {store.url} holds {kind} maps; refresh with --kind gpa (in "
            f"training: --saliency-kind gpa), use another store, or drop {setting}"
        )


class SalientLoader:
    """Batches of one rank, one epoch at a time: ``for batch in loader.epoch(e): …``.

    Raises:
        LoaderError: the dataset holds fewer than ``world_size · batch_size`` samples.
        DatasetError / StoreError / StorageError: a bad dataset, a store made for another
            dataset, a URL that cannot be read.
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
        self._reported: set[tuple] = set()  # damaged store chunks already warned about
        self._plan = PassPlan()
        self._workers = None  # the persistent DataLoader, made on the first pass
        reuse_freed_memory()  # batches and 0-worker chunks: no page faults on fresh buffers

    def __len__(self) -> int:
        return self.batches_per_rank

    def _clamped_workers(self) -> int:
        """No more DataLoader workers than shards' worth of samples on this rank: beyond that
        workers would stream the same tar for a handful of samples each."""
        n, shards = self.dataset.num_samples, len(self.dataset.shards)  # shards may be unequal
        per_rank = n // self.config.world_size
        shards_worth = max(1, -(-per_rank * shards // n))  # ceil(per_rank / mean shard count)
        return min(self.config.num_workers, shards_worth)

    # ------------------------------------------------------------ the generation

    def bind_generation(self, name: str | object | None = CURRENT) -> str | None:
        """The generation an epoch reads: ``name`` when given (a trainer's choice: None reads
        no maps), else the store's current one, or None (one warning per loader) when there is
        no store or no published generation yet. Strategies without maps read no store
        (unless the batches carry GPA's target or per-head maps). A ``gpa_target`` loader
        refuses a generation whose maps are not of kind ``gpa``; a ``head_maps`` loader one
        without per-head maps of that many heads."""
        if not self.reads_maps:
            return None
        store = self._open_store()
        current = store.current() if store is not None and name is CURRENT else None
        generation = current if name is CURRENT else name
        if generation is None and name is CURRENT and not self._warned:
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
            check_gpa_kind(store, generation)
        if generation is not None and self.config.head_maps is not None:
            self._check_heads(store, generation)
        return generation

    @property
    def reads_maps(self) -> bool:
        """Whether batches need the store's maps: a strategy that reads them (unless the
        trainer plans multi-crop masks itself), GPA's target, or per-head maps."""
        c = self.config
        online = c.views is not None and c.views.masks_online
        return (c.strategy in NEEDS_SALIENCY and not online) or c.gpa_target or bool(c.head_maps)

    def _check_heads(self, store, generation: str) -> None:
        attrs = store.bind(generation).attrs
        if attrs.get("heads") != self.config.head_maps:
            raise LoaderError(
                f"the batches need per-head maps of {self.config.head_maps} heads, but "
                f"generation {generation} of {self.config.store} holds kind {attrs.get('kind')} "
                f"with heads={attrs.get('heads')}; refresh with --kind heads from a teacher "
                f"of {self.config.head_maps} heads"
            )

    def report_damage(self, chunks: list) -> None:
        """One warning per damaged store chunk (the store's ``DamagedChunk``) for the life of
        the loader: its rows were read as no map and counted in ``stats.corrupt_maps``."""
        for chunk in chunks:
            key = (chunk.generation, chunk.array, chunk.chunk)
            if key not in self._reported:
                self._reported.add(key)
                warnings.warn(
                    f"damaged map chunk in the store at {self.config.store}, generation "
                    f"{chunk}: its rows read as no map (masked at random, counted as "
                    "corrupt_maps); the next refresh writes a whole new generation",
                    stacklevel=2,
                )

    def _open_store(self):
        url = self.config.store
        if self._store is not None or url is None:
            return self._store

        if not store_exists(url):
            return None  # not created yet: the first refresh creates it
        self._store = SaliencyStore.open(url, dataset=self.dataset)  # fingerprint checked
        return self._store

    # ------------------------------------------------------------ an epoch

    def epoch(
        self, epoch: int, progress: float | None = None, generation: str | object | None = CURRENT
    ) -> Iterator[dict]:
        """This rank's ``len(self)`` batches of ``epoch``; ``self.stats`` counts as it goes.

        ``progress`` (for ``gpa``) defaults to ``epoch / config.epochs`` (0 without epochs).
        The generation is bound here, once, before the first batch: ``generation`` when given
        (a trainer that chose it for every rank), else the store's current one.
        """
        c = self.config
        if progress is None:
            progress = epoch / c.epochs if c.epochs else 0.0
        chosen, lease = generation is CURRENT, None
        generation = self.bind_generation(generation)  # warns from the caller of epoch()
        if chosen and generation is not None:
            generation, lease = self._hold(generation)
        self.stats = stats = EpochStats(epoch=epoch, rank=c.rank, generation=generation)
        items = _Passes(self, epoch, generation, stats)
        with lease or contextlib.nullcontext():  # released when the epoch ends or is dropped
            for index in range(self.batches_per_rank):
                ready = self._take_ready(items, stats)
                # now: runs of samples whose images are cropped, uint8 [n,3,S,S] (or views)
                make = self._batch if c.views is None else self._views_batch
                yield make(ready, epoch, index, generation, progress, stats)
            items.drain()  # the left-over samples: read so the counts are exact

    def _hold(self, generation: str) -> tuple[str | None, Lease | None]:
        """A reader lease on ``generation``, the store's current one that this loader chose
        itself (a trainer that chooses for every rank holds its own lease, on rank 0), so
        ``salient gc`` keeps it while the epoch reads it; with the generation read. One that
        gc removed between the choice and the lease (a newer one was published meanwhile) is
        chosen again."""
        holder, tries = f"a SalientLoader (rank {self.config.rank})", _HOLD_TRIES
        while generation is not None:
            try:  # stacklevel 3: the caller of epoch()
                return generation, self._store.hold_if_writable(generation, holder, stacklevel=3)
            except (NotPublishedError, GenerationNotFoundError):
                tries -= 1
                if not tries:
                    raise
            generation = self.bind_generation(CURRENT)
        return None, None

    def _spec(self) -> StreamSpec:
        c = self.config
        return StreamSpec(
            sources=tuple(self.dataset.sources()),
            shards=tuple(self.dataset.shards),
            store=None if c.store is None else urls.normalise(c.store),
            seed=c.seed,
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
            prefetch=c.prefetch,
            views=c.views,
            heads=c.head_maps,
        )

    def _stream(self, epoch: int, pass_index: int, generation: str | None) -> Iterator[dict]:
        """The chunks of one pass. Workers persist across passes and epochs: they read which
        pass to stream from the shared plan when each pass starts."""
        self._plan.set(epoch, pass_index, generation)
        if self.num_workers == 0:
            return iter(SampleStream(self._spec(), self._plan))
        if self._workers is None:
            self._workers = torch.utils.data.DataLoader(
                SampleStream(self._spec(), self._plan),
                batch_size=None,
                collate_fn=keep_as_is,
                num_workers=self.num_workers,
                worker_init_fn=functools.partial(
                    init_worker, storage=urls.carry(), parent=os.getpid()
                ),
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4,
                persistent_workers=True,
                # its workers' base seed from its own generator, not torch's global one: the
                # trainer's draws (AutoMAE's noise) must not depend on when the workers start
                generator=torch.Generator().manual_seed(
                    mix_seed(self.config.seed, self.config.rank)
                ),
            )
        return iter(self._workers)

    def _take_ready(self, items: _Passes, stats: EpochStats) -> list[_Rows]:
        """``batch_size`` samples with cropped images, as runs of rows; samples whose image
        fails to decode on the device are counted and others taken in their place."""
        ready, need = [], self.config.batch_size
        while need:
            for rows in items.take(need):
                if rows.images is None:  # device decode
                    rows, failed = decode_and_crop(
                        rows, self.device, self.config.image_size, self.config.interpolation
                    )
                    stats.corrupt_ids.update(failed)
                    stats.corrupt = len(stats.corrupt_ids)
                items.good += len(rows)
                need -= len(rows)
                ready.append(rows)
        return ready

    def _batch(
        self,
        ready: list[_Rows],
        epoch: int,
        index: int,
        generation: str | None,
        progress: float,
        stats: EpochStats,
    ) -> dict:
        c = self.config
        images = normalize_images([rows.images for rows in ready], self.device)
        # now: images float [B,3,S,S] normalised, on the device
        has_map = torch.from_numpy(np.concatenate([rows.has_map for rows in ready]))
        weights = torch.from_numpy(np.concatenate([rows.weights for rows in ready]))
        weights = weights.to(self.device)  # [B,N]: whole-image-normalised maps under the crops
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
        stats.samples += len(has_map)
        if c.strategy in NEEDS_SALIENCY or c.head_maps is not None:
            stats.fallback += int((~has_map).sum())
        extra = {}
        if c.gpa_target:
            extra["gpa_target"] = gpa_targets(weights, has_map.to(self.device))  # [B, N]
        if c.head_maps is not None:
            extra["head_maps"] = head_map_batch(ready, c.head_maps, c.grid, self.device)
        return {
            **extra,
            "images": images,
            "visible_idx": plan.visible_idx,
            "mask_idx": plan.mask_idx,
            "throw_idx": plan.throw_idx,
            "ids": torch.from_numpy(np.concatenate([rows.ids for rows in ready])),
            "has_saliency": has_map,
            "generation": generation,
            "crop_boxes": torch.from_numpy(np.concatenate([rows.boxes for rows in ready])),
        }

    def _views_batch(
        self,
        ready: list[_Rows],
        epoch: int,
        index: int,
        generation: str | None,
        progress: float,
        stats: EpochStats,
    ) -> dict:
        """A multi-crop batch (docs/ARCHITECTURE.md, "Loader", "Multi-crop views")."""
        c = self.config
        images = normalize_images([rows.images for rows in ready], self.device)
        local = normalize_images([rows.locals for rows in ready], self.device)
        # now: global views [G,B,3,S,S] and local views [L,B,3,s,s], normalised
        has_map = torch.from_numpy(np.concatenate([rows.has_map for rows in ready]))
        seed = mix_seed(c.seed, epoch, c.rank, index)
        batch = {
            "global_images": images,
            "local_images": local,
            "mask_seed": seed,  # the trainer's own mask draws (online masks)
            "ids": torch.from_numpy(np.concatenate([rows.ids for rows in ready])),
            "has_saliency": has_map,
            "generation": generation,
            "crop_boxes": torch.from_numpy(np.concatenate([rows.boxes for rows in ready])),
        }
        stats.batches += 1
        stats.samples += len(has_map)
        if c.views.masks_online:
            return batch
        weights = np.concatenate([rows.weights for rows in ready])  # [B, G, N]
        weights = torch.from_numpy(weights).to(self.device).transpose(0, 1)  # [G, B, N]
        generator = torch.Generator(self.device).manual_seed(seed)
        batch["masks"] = plan_view_masks(
            c.strategy,
            weights,
            has_map.to(self.device),
            c.mask_ratio,
            generator,
            progress,
            c.strategy_options,
        )
        # now: masks [G,B,N], True = masked, per global view
        if generation is not None:
            batch["view_maps"] = weights  # the whole-image-normalised map under each view
        if c.strategy in NEEDS_SALIENCY:
            stats.fallback += int((~has_map).sum())
        return batch


class _Passes:
    """The samples of one rank's epoch: pass 0 over its slice, then more passes (fresh crops)
    only if corrupt images left it short of ``batches_per_rank`` batches."""

    def __init__(
        self, loader: SalientLoader, epoch: int, generation: str | None, stats: EpochStats
    ):
        self.loader, self.epoch, self.generation, self.stats = loader, epoch, generation, stats
        self.pass_index, self.good = -1, 0  # good: samples of this pass with a usable image
        self.pending: _Rows | None = None
        self.offset = 0
        self.chunks: Iterator[dict] = iter(())

    def take(self, n: int) -> list[_Rows]:
        """The next ``n`` samples as runs of rows (slices of the chunks they arrived in)."""
        runs = []
        while n:
            if self.pending is None or self.offset == len(self.pending):
                self._next_chunk()
                continue
            stop = min(self.offset + n, len(self.pending))
            runs.append(self.pending.part(slice(self.offset, stop)))
            n -= stop - self.offset
            self.offset = stop
        return runs

    def _next_chunk(self) -> None:
        chunk = next(self.chunks, None)
        if chunk is None:
            self._next_pass()
            return
        _raise_error(chunk)
        self.loader.report_damage(self.stats.absorb(chunk))
        self.pending, self.offset = _Rows.of(chunk), 0

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

    def drain(self) -> None:
        """Read what is left of the current pass, so the epoch's counts are exact."""
        for chunk in self.chunks:
            _raise_error(chunk)
            self.loader.report_damage(self.stats.absorb(chunk))


def _raise_error(chunk: dict) -> None:
    """A worker's SalientError (a changed shard, a storage failure), raised here as itself."""
    if "error" in chunk:
        raise chunk["error"]
