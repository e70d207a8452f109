"""What one refresh worker runs: read a tar shard, decode it, compute the teacher's maps, write.

``salient.jobs.refresh`` wraps :class:`RefreshWorker` in a Ray actor (the class lives in the
package so Ray workers can import it, PITFALLS.md). The unit of work is one shard: one tar
file = one contiguous id range = one zarr chunk, written whole by one call, so a retried
shard rewrites the same bytes and two workers never share a chunk (DESIGN.md, "The saliency
store").

Decoding: PIL on CPU always works. On a GPU worker JPEGs are decoded by nvjpeg
(``torchvision.io.decode_jpeg(device="cuda")``) and resized on the GPU; other formats, and
JPEGs nvjpeg rejects, fall back to PIL. An image neither can decode gets ``valid = 0`` and a
NaN map row, is counted, and the shard goes on.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from salient.pipeline.ingest import IMAGE_SUFFIXES

__all__ = [
    "RefreshWorker",
    "WorkerSpec",
    "decode_batch",
    "decode_image",
    "read_shard",
    "shard_maps",
]

IMAGE_FIELDS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)  # tar field names: jpg, png…
_JPEG_FIELDS = frozenset({"jpg", "jpeg"})


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the teacher model; picklable."""

    store: str
    generation: str
    kind: str
    reduce: str | None
    block: int
    head: int | None
    image_size: int
    batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str = "cpu"
    threads: int = 1
    shard_delay_s: float = 0.0


# ---------------------------------------------------------------- reading


def read_shard(url: str, first_id: int, count: int) -> list[tuple[str, bytes] | None]:
    """The image field of every id in ``[first_id, first_id + count)``: ``(ext, bytes)`` or None.

    None marks a sample whose image is missing from the tar. A tar that breaks part-way keeps
    what was read before the damage (with a warning); the rest are None.
    """
    records: list[tuple[str, bytes] | None] = [None] * count
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                key, _, field = os.path.basename(member.name).partition(".")
                offset = int(key) - first_id if key.isdigit() else -1
                if field in IMAGE_FIELDS and 0 <= offset < count and member.isfile():
                    records[offset] = (field, tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as exc:
        warnings.warn(
            f"shard {url} is damaged ({exc}); its unread samples get valid=0", stacklevel=2
        )
    return records


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes) -> torch.Tensor | None:
    """PIL decode to ``uint8 [3,H,W]`` RGB on the CPU; None when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception:  # PIL raises many types on corrupt or truncated files; none may stop a shard
        return None
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _decode_jpegs_gpu(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """nvjpeg batch decode; on a batch error, one by one, so one bad file costs only itself."""
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
                out.append(_to(decode_image(data), device))
        return out


def _to(image: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if image is None else image.to(device, non_blocking=True)


def decode_batch(
    records: list[tuple[str, bytes] | None], device: torch.device
) -> list[torch.Tensor | None]:
    """Decode a batch of records to ``uint8 [3,H,W]`` tensors on ``device`` (None = invalid).

    On a CUDA device JPEGs go through nvjpeg; everything else (and every image on CPU)
    through PIL.
    """
    images: list[torch.Tensor | None] = [None] * len(records)
    gpu_jpegs = [
        i
        for i, r in enumerate(records)
        if r is not None and device.type == "cuda" and r[0] in _JPEG_FIELDS
    ]
    if gpu_jpegs:
        decoded = _decode_jpegs_gpu([records[i][1] for i in gpu_jpegs], device)
        for i, image in zip(gpu_jpegs, decoded):
            images[i] = image
    done = set(gpu_jpegs)
    for i, record in enumerate(records):
        if record is not None and i not in done:
            images[i] = _to(decode_image(record[1]), device)
    return images


# ---------------------------------------------------------------- maps


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; off on CPU, so CPU maps are exact fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def _batch_maps(
    model: torch.nn.Module, images: list[torch.Tensor], spec: WorkerSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Maps of decoded images: ``maps [b,G,G]`` and, for kind "heads", ``head_maps [b,H,G,G]``."""
    from salient.trainer.teacher import preprocess, saliency

    x = preprocess(images, spec.image_size, spec.mean, spec.std)  # [b,3,S,S] normalised
    with _autocast(device):
        maps = saliency(
            model, x, kind=spec.kind, block=spec.block, head=spec.head, reduce=spec.reduce
        )
    if spec.kind == "heads":  # [b,H,G,G]; the map beside them is their mean (AMT eq. 4)
        return maps.mean(1), maps
    return maps, None


def _batches(records: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(records), size):
        yield start, records[start : start + size]


def shard_maps(
    model: torch.nn.Module,
    records: list[tuple[str, bytes] | None],
    spec: WorkerSpec,
    grid: int,
    heads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """All maps of one shard: ``maps [n,G,G] float32`` (NaN where invalid), ``valid [n] uint8``,
    and ``head_maps [n,H,G,G]`` for kind "heads" (else None)."""
    device = torch.device(spec.device)
    n = len(records)
    maps = np.full((n, grid, grid), np.nan, dtype=np.float32)
    head_maps = (
        np.full((n, heads, grid, grid), np.nan, dtype=np.float32) if spec.kind == "heads" else None
    )
    valid = np.zeros(n, dtype=np.uint8)
    for start, chunk in _batches(records, spec.batch_size):
        images = decode_batch(chunk, device)
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

    def __init__(self, model: torch.nn.Module, spec: WorkerSpec):
        from salient.store import SaliencyStore

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = torch.device(spec.device)
        self.model = model.to(self.device).eval()
        store = SaliencyStore.open(spec.store)
        self.grid = store.grid
        self.writer = store.resume_generation(spec.generation)
        self.heads = getattr(getattr(model.blocks[0], "attn", None), "num_heads", None)

    def pid(self) -> int:
        return os.getpid()

    def compute_shard(self, shard: int, url: str, first_id: int, count: int) -> dict:
        """Read, decode, compute and write shard ``shard``; returns its counts."""
        start = time.perf_counter()
        records = read_shard(url, first_id, count)
        maps, valid, head_maps = shard_maps(self.model, records, self.spec, self.grid, self.heads)
        if self.spec.shard_delay_s:
            time.sleep(self.spec.shard_delay_s)  # a testing aid: widens the window to kill us in
        self.writer.write_shard(shard, maps, valid, head_maps=head_maps)
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
