"""``salient bench refresh``: end-to-end img/s of the refresh job, shards → published generation.

On CPU: ``vit_tiny_patch16_224`` (random weights, seeded) at 224 px, with 1 and 2 workers of
one CPU each. On CUDA: ViT-B/16 at 224 px, bf16, nvjpeg decode, one worker per GPU. Beside
each end-to-end figure: the model's forward-only img/s on the same device and threads (the
ceiling), and the ratio between them.

Two ways to drive the actors are measured on the same data:

- ``actors`` — the job as shipped (``salient.jobs.refresh.driver``): plain actors, one shard
  per call, each shard written as one whole zarr chunk by the actor that computed it; the
  next batch is
  read and decoded in a background thread while the teacher computes the current one.
- ``actors_serial`` — the same with ``prefetch=False``: read, decode, compute one after the
  other (what the overlap buys).
- ``ray_data`` — Ray Data: ``read_webdataset`` → ``map_batches`` on an actor pool (same decode
  and maps code) → rows streamed back to the driver, re-blocked by shard (Ray Data neither
  keeps order nor follows chunk boundaries: docs/LIBRARY-NOTES.md, "Ray Data batches ignore
  chunk borders") and written there.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from salient.jobs.refresh.driver import RefreshConfig, prepare_refresh, run_refresh, worker_spec
from salient.jobs.refresh.worker import _autocast, shard_maps, teacher_view
from salient.jobs.runtime.ray_env import ensure_ray
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.shards import decode_images, image_field
from salient.trainer.teacher_load import load_teacher

__all__ = ["RayDataMaps", "bench_refresh"]


def _settings(device: str, quick: bool) -> dict:
    if device.startswith("cuda"):
        return {
            "model": "vit_base_patch16_224",
            "n": 4096 if quick else 32768,
            "shard_size": 1024,
            "scene_size": 256,
            "batch_size": 256,
            "gpus_per_worker": 1.0,
            "cpus_per_worker": 4.0,
        }
    return {
        "model": "vit_tiny_patch16_224",
        "n": 128 if quick else 512,
        "shard_size": 64,
        "scene_size": 192,
        "batch_size": 32,
        "gpus_per_worker": 0.0,
        "cpus_per_worker": 1.0,
    }


def _forward_rate(model: str, device: str, batch_size: int, threads: int) -> float:
    """img/s of the bare forward (``forward_features``) under the job's precision and threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = load_teacher(f"timm:{model}", allow_random=True, device=device).model
        x = torch.randn(batch_size, 3, 224, 224, device=device)
        times = []
        with torch.inference_mode(), _autocast(torch.device(device)):
            for _ in range(4):  # the first one warms up
                start = time.perf_counter()
                net.forward_features(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return batch_size / min(times[1:])
    finally:
        torch.set_num_threads(previous)


def _config(data: str, store: Path, settings: dict, workers: int, prefetch: bool = True):
    return RefreshConfig(
        data=str(data),
        store=str(store),
        teacher=f"timm:{settings['model']}",
        allow_random_teacher=True,
        batch_size=settings["batch_size"],
        workers=workers,
        gpus_per_worker=settings["gpus_per_worker"],
        cpus_per_worker=settings["cpus_per_worker"],
        prefetch=prefetch,
    )


# ---------------------------------------------------------------- the Ray Data variant


class RayDataMaps:
    """``map_batches`` UDF: raw image bytes + keys → ids, maps, valid (same code as the actors)."""

    def __init__(self, model_ref, spec):
        import ray
        import torch

        torch.set_num_threads(spec.inputs.threads)
        self.model = ray.get(model_ref).to(spec.inputs.device).eval()  # Ray Data passes refs as is
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        field = image_field(batch)
        records = [(field, bytes(b)) for b in batch[field]]
        images = decode_images(records, self.spec.inputs.device, teacher_view(self.spec.inputs))
        grid = self.spec.inputs.image_size // self.model.patch_embed.patch_size[0]
        maps, valid, _ = shard_maps(self.model, [(0, images)], len(images), self.spec, grid)
        return {"id": np.array([int(k) for k in batch["__key__"]]), "maps": maps, "valid": valid}


def _ray_data_refresh(config) -> dict:
    """The same job with Ray Data doing read + map; the driver re-blocks rows and writes."""
    import ray

    start = time.perf_counter()
    prepared = prepare_refresh(config)
    dataset, teacher, writer = prepared.dataset, prepared.teacher, prepared.writer
    spec = worker_spec(config, teacher, prepared.spec, writer.name)
    size = dataset.shard_size
    # An actor pool that reserves every CPU starves Ray Data's read tasks and hangs; leave
    # one CPU of the cluster to the reads (docs/LIBRARY-NOTES.md, "Ray Data actor pools can
    # starve their reads").
    spare = (ray.cluster_resources().get("CPU", 1.0) - 1.0) / config.workers
    num_cpus = max(0.25, min(config.cpus_per_worker, spare))
    rows = ray.data.read_webdataset(dataset.shard_urls(), decoder=None).map_batches(
        RayDataMaps,
        fn_constructor_args=(ray.put(teacher.model), spec),
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        batch_size=config.batch_size,
        num_cpus=num_cpus,
        num_gpus=config.gpus_per_worker or None,
    )
    pending: dict[int, list] = {}
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        for i, sample_id in enumerate(batch["id"]):
            shard = dataset.shards[int(sample_id) // size]
            pending.setdefault(shard.index, []).append(
                (int(sample_id), batch["maps"][i], batch["valid"][i])
            )
            if len(pending[shard.index]) == shard.count:
                got = sorted(pending.pop(shard.index), key=lambda r: r[0])
                writer.write_shard(
                    shard.index,
                    np.stack([r[1] for r in got]),
                    np.array([r[2] for r in got], dtype=np.uint8),
                )
    writer.publish()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "img_per_s": round(dataset.num_samples / seconds, 1)}


# ---------------------------------------------------------------- the benchmark


def _data(data: str | None, settings: dict, work: Path) -> str:
    if data is not None:
        return data  # a path or a URL

    ingest_demo(
        work / "data",
        n=settings["n"],
        seed=0,
        shard_size=settings["shard_size"],
        image_size=settings["scene_size"],
    )
    return str(work / "data")


def _one(variant: str, data: str, work: Path, settings: dict, workers: int, forward: float) -> dict:
    serial = variant == "actors_serial"
    config = _config(data, work / f"{variant}-{workers}.zarr", settings, workers, not serial)
    result = (
        _ray_data_refresh(config) if variant == "ray_data" else run_refresh(config, progress=False)
    )
    return {
        "variant": variant,
        "workers": workers,
        "seconds": result["seconds"],
        "img_per_s": result["img_per_s"],
        "images": result.get("images"),
        "ratio_to_forward": round(result["img_per_s"] / (forward * workers), 3),
    }


def bench_refresh(
    quick: bool = False,
    device: str = "auto",
    workers: tuple[int, ...] = (1, 2),
    data: str | None = None,
    model: str | None = None,
    variants: tuple[str, ...] = ("actors", "actors_serial", "ray_data"),
    batch_size: int | None = None,
    cpus_per_worker: float | None = None,
) -> dict:
    """End-to-end refresh img/s for each variant and worker count, and the forward-only rate.

    ``model`` defaults to vit_tiny on CPU and ViT-B/16 on CUDA; ``data`` defaults to a demo
    set written to a temporary directory. On CUDA the worker count is capped by the GPUs.
    ``ratio_to_forward`` divides by ``workers`` × the one-worker forward rate.
    ``batch_size`` and ``cpus_per_worker`` override the device's defaults.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = _settings(device, quick)
    settings["model"] = model or settings["model"]
    settings["batch_size"] = batch_size or settings["batch_size"]
    settings["cpus_per_worker"] = cpus_per_worker or settings["cpus_per_worker"]
    info = ensure_ray()
    if device.startswith("cuda"):
        workers = tuple(w for w in workers if w <= max(1, int(info.gpus))) or (1,)
    threads = max(1, int(settings["cpus_per_worker"]))
    forward = _forward_rate(settings["model"], device, settings["batch_size"], threads)
    try:
        with tempfile.TemporaryDirectory(prefix="salient-bench-refresh-") as tmp:
            source = _data(data, settings, Path(tmp))
            runs = [
                _one(v, source, Path(tmp), settings, w, forward) for v in variants for w in workers
            ]
    finally:
        if info.started:
            import ray

            ray.shutdown()
    return {
        "model": settings["model"],
        "images": settings["n"] if data is None else None,
        "image_size": 224,
        "batch_size": settings["batch_size"],
        "threads_per_worker": threads,
        "precision": "bf16" if device != "cpu" else "fp32",
        "forward_img_per_s_per_worker": round(forward, 1),
        "runs": runs,
    }
