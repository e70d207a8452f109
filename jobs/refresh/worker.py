"""What one refresh worker runs: read a tar shard, decode it, compute the teacher's maps, write.

``salient.jobs.refresh.driver`` wraps :class:`RefreshWorker` in a Ray actor (the class lives in the
package so Ray workers can import it: docs/LIBRARY-NOTES.md, "Remote code lives in the
package"). The unit of work is one shard: one tar file = one contiguous id range = one zarr
chunk, written whole by one call, so a retried shard rewrites the same bytes and two workers
never share a chunk (docs/ARCHITECTURE.md, "The saliency store").

Reading and decoding go through ``salient.pipeline.shards`` (the loader's decode too): PIL on
the CPU; on a GPU worker JPEGs are decoded by nvjpeg and resized on the GPU, other formats and
JPEGs nvjpeg rejects fall back to PIL. An image nothing can decode gets ``valid = 0`` and a NaN
map row, is counted, and the shard goes on. With ``prefetch`` a background thread reads and
decodes the next batch while the teacher computes the current one (on a GPU worker that is what
keeps the GPU busy).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from salient import urls
from salient.jobs.runtime.progress import plain_warnings, process_heartbeat
from salient.jobs.runtime.shard_pool import ActorInputs
from salient.pipeline import shards
from salient.pipeline.manifest import ShardSource
from salient.store import SaliencyStore
from salient.trainer.teacher import preprocess, saliency

__all__ = ["RefreshWorker", "WorkerSpec", "decoded_batches", "shard_maps", "teacher_view"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the teacher model; picklable."""

    store: str
    generation: str
    kind: str
    reduce: str | None
    block: int
    head: int | None
    inputs: ActorInputs
    shard_delay_s: float = 0.0
    hold_while: str = ""
    prefetch: bool = True


# ---------------------------------------------------------------- reading and decoding


def teacher_view(inputs: ActorInputs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's input of one decoded image: ``float32 [3,S,S]``, the whole image squashed
    to S and normalised (``trainer.teacher.preprocess``), made right after its decode."""
    return lambda image: preprocess(image, inputs.image_size, inputs.mean, inputs.std)[0]


def decoded_batches(
    source: ShardSource,
    batch_size: int,
    device: torch.device,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[int, list[torch.Tensor | None]]]:
    """``(start, images)`` per batch of the shard's ids in order (offsets from its first id):
    ``uint8 [3,H,W]`` tensors on ``device`` (or each image's ``view``, taken as soon as it is
    decoded: :func:`teacher_view`), None where the image is missing or does not decode. The
    tar is streamed, and checked against its manifest as it streams (``ShardChangedError``):
    a batch is decoded as soon as the tar moves past it."""
    batch: list = []
    start = 0
    first_id, count = source.shard.first_id, source.shard.count
    wanted = range(first_id, first_id + count)
    damaged = shards.warn_damaged(source.url, "its unread samples get valid=0")
    for sample in shards.iter_samples(source, wanted, {"image"}, damaged):
        offset = sample["id"] - first_id
        while offset >= start + batch_size:
            yield start, _decoded(batch, batch_size, count - start, device, view)
            batch, start = [], start + batch_size
        field = shards.image_field(sample)
        if field is not None and offset >= start:
            batch.append((offset - start, (field, sample[field])))
    for rest in range(start, count, batch_size):  # the last batch, and any the tar lacks
        yield rest, _decoded(batch, batch_size, count - rest, device, view)
        batch = []


def _decoded(batch: list, batch_size: int, left: int, device: torch.device, view) -> list:
    records = [None] * min(batch_size, left)
    for position, record in batch:
        records[position] = record
    return shards.decode_images(records, device, view)


# ---------------------------------------------------------------- maps


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; off on CPU, so CPU maps are exact fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def _batch_maps(
    model: torch.nn.Module, views: list[torch.Tensor], spec: WorkerSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Maps of the teacher's views (:func:`teacher_view`): ``maps [b,G,G]`` and, for kind
    "heads", ``head_maps [b,H,G,G]``."""
    x = torch.stack(views)  # [b,3,S,S] normalised
    with _autocast(device):
        maps = saliency(
            model, x, kind=spec.kind, block=spec.block, head=spec.head, reduce=spec.reduce
        )
    if spec.kind == "heads":  # [b,H,G,G]; the map beside them is their mean (AMT eq. 4)
        return maps.mean(1), maps
    return maps, None


def shard_maps(
    model: torch.nn.Module,
    batches: Iterator[tuple[int, list[torch.Tensor | None]]],
    count: int,
    spec: WorkerSpec,
    grid: int,
    heads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """All maps of one shard of ``count`` images from its ``batches`` of teacher views
    (:func:`decoded_batches` with :func:`teacher_view`): ``maps [n,G,G]
    float32`` (NaN where invalid), ``valid [n] uint8``, and ``head_maps [n,H,G,G]`` for kind
    "heads" (else None)."""
    device = torch.device(spec.inputs.device)
    maps = np.full((count, grid, grid), np.nan, dtype=np.float32)
    head_maps = (
        np.full((count, heads, grid, grid), np.nan, dtype=np.float32)
        if spec.kind == "heads"
        else None
    )
    valid = np.zeros(count, dtype=np.uint8)
    for start, images in batches:
        rows = [start + i for i, image in enumerate(images) if image is not None]
        if not rows:
            continue
        batch_maps, batch_heads = _batch_maps(
            model, [im for im in images if im is not None], spec, device
        )
        maps[rows] = batch_maps.cpu().numpy()
        if head_maps is not None:
            head_maps[rows] = batch_heads.cpu().numpy()
        valid[rows] = 1
    return maps, valid, head_maps


# ---------------------------------------------------------------- the actor


class RefreshWorker:
    """Holds the teacher (loaded once) and the generation writer; computes one shard per call.

    ``model`` is the teacher as the driver loaded it (Ray ships it through the object store,
    so every worker, and every restart of one, runs the very same weights).
    """

    def __init__(
        self, model: torch.nn.Module, spec: WorkerSpec, storage: urls.StorageOptions | None = None
    ):
        urls.adopt(storage)  # the driver's --storage-option values, before any read
        plain_warnings("refresh")  # printed through Ray on the driver's console
        process_heartbeat("refresh")  # a line while a read or write waits on storage
        torch.set_num_threads(spec.inputs.threads)
        self.spec = spec
        self.device = torch.device(spec.inputs.device)
        self.model = model.to(self.device).eval()
        store = SaliencyStore.open(spec.store)
        self.grid = store.grid
        self.writer = store.resume_generation(spec.generation)
        self.heads = getattr(getattr(model.blocks[0], "attn", None), "num_heads", None)

    def pid(self) -> int:
        return os.getpid()

    def compute_shard(self, shard: int, source: ShardSource) -> dict:
        """Read, decode, compute and write shard ``shard`` (read through ``source``, the
        dataset's ``ShardSource``: ids by position, bytes checked); returns its counts."""
        start = time.perf_counter()
        spec, count = self.spec, source.shard.count
        view = teacher_view(spec.inputs)  # a batch holds views, not full-size images
        batches = decoded_batches(source, spec.inputs.batch_size, self.device, view)
        batches = shards.prefetched(batches, depth=1 if spec.prefetch else 0)
        # now: (start, teacher views | None), the next batch decoding meanwhile
        maps, valid, head_maps = shard_maps(self.model, batches, count, spec, self.grid, self.heads)
        if spec.shard_delay_s:
            time.sleep(spec.shard_delay_s)  # a testing aid: widens the window to kill us in
        self.writer.write_shard(shard, maps, valid, head_maps=head_maps)
        while spec.hold_while and os.path.exists(spec.hold_while):
            time.sleep(0.05)  # a testing aid: holds the run live until the test lets it go
        return {
            "shard": shard,
            "images": count,
            "invalid": int(count - valid.sum()),
            "seconds": time.perf_counter() - start,
            "pid": os.getpid(),
            "node": _node_id(),
        }


def _node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
