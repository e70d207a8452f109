"""``salient bench loader``: img/s of the streaming loader, and mask planning time per batch.

- ``cpu``: the CPU path (DataLoader workers decode with PIL and crop; ``decode="worker"``,
  ``device="cpu"``) at 224 px / patch 16 (N = 196), AMT 45 / 40 masking, with 0, 1 and 2
  DataLoader workers, on a generated demo set with a store of random maps. Each figure is
  the whole epochs after a first, untimed one: worker start-up and the end-of-epoch drain
  are included, as a training run pays them.
- ``planning_ms_*``: median ms per ``[256, 196]`` batch of ``plan_masks("amt")`` alone and of
  the loader's ``plan_batch`` (normalisation + ``amt`` + a random fallback row), on the CPU
  and, on CUDA, on the GPU. Target ≤ 1 ms.
- on CUDA, ``gpu``: the GPU path (``decode="device"``: workers ship JPEG bytes, box and map
  crop; the main process decodes with nvjpeg, crops and resizes on the GPU) at 224 px,
  batch 256: ``main_img_s`` is the main process alone on prepared samples (its ceiling) and
  ``loader_img_s`` the whole loader with ``workers`` DataLoader workers. Target ≥ 5,000 img/s
  on one H100 (an AMT 45/40 ViT-B step consumes 5.0k img/s there).

``data`` benchmarks an existing dataset directory instead of a generated one (a store of
random maps is made for it in a temporary directory).
"""

from __future__ import annotations

import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["bench_loader", "device_path_rates", "jpeg_bytes", "random_store"]

IMAGE, PATCH, MASK, THROW = 224, 16, 0.45, 0.40


def _settings(quick: bool, cuda: bool) -> dict:
    cpu = {
        "n": 192 if quick else 1024,
        "scene": 256,
        "shard_size": 64 if quick else 128,
        "batch": 32 if quick else 64,
        "epochs": 1 if quick else 2,
        "workers": (0, 1, 2),
    }
    gpu = {
        "distinct": 256 if quick else 1024,
        "copies": 4 if quick else 16,
        "scene": 384,
        "shard_size": 512,
        "batch": 256,
        "epochs": 1 if quick else 2,
        "workers": min(12, max(1, _cpus() - 2)),
    }
    return {"cpu": cpu, "gpu": gpu if cuda else None, "plan_reps": 20 if quick else 200}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------- inputs


def _demo(out: Path, n: int, scene: int, shard_size: int) -> Path:
    from salient.pipeline.ingest import ingest_demo

    ingest_demo(out, n=n, seed=0, shard_size=shard_size, image_size=scene)
    return out


def _tiled(src: Path, out: Path, copies: int, shard_size: int) -> Path:
    """``copies`` × the samples of ``src`` under fresh ids: a large set without re-rendering
    scenes (decode cost per image is what a throughput figure needs, not distinct content)."""
    import webdataset as wds

    from salient.pipeline.manifest import Manifest, ShardInfo, fingerprint, sample_key, shard_name

    records, shards = jpeg_bytes(src) * copies, []
    out.mkdir(parents=True)
    for index, first in enumerate(range(0, len(records), shard_size)):
        part = records[first : first + shard_size]
        with wds.TarWriter(str(out / shard_name(index)), encoder=False) as writer:
            for offset, data in enumerate(part):
                writer.write({"__key__": sample_key(first + offset), "jpg": data})
        shards.append(
            ShardInfo(
                index, shard_name(index), first, len(part), (out / shard_name(index)).stat().st_size
            )
        )
    manifest = Manifest(
        num_samples=len(records),
        shard_size=shard_size,
        shards=shards,
        classes=None,
        source="bench",
        fingerprint=fingerprint(shards, len(records)),
    )
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def random_store(
    data: Path | str, url: Path | str, grid: int = IMAGE // PATCH, patch_size: int = PATCH
) -> str:
    """A store with one published generation of random ``grid x grid`` maps for ``data``."""
    from salient.pipeline.manifest import open_dataset
    from salient.store import SaliencyStore

    dataset = open_dataset(data)
    store = SaliencyStore.create(str(url), dataset, grid=grid)
    writer = store.begin_generation(
        {"path": None, "sha256": "random", "name": "bench"},
        "cls_attn",
        image_size=grid * patch_size,
        patch_size=patch_size,
    )
    rng = np.random.default_rng(0)
    for shard in dataset.shards:
        maps = rng.random((shard.count, grid, grid)).astype(np.float16)
        writer.write_shard(shard.index, maps, np.ones(shard.count, np.uint8))
    writer.publish()
    return str(url)


# ---------------------------------------------------------------- measurements


def _loader(data: Path, store: str, batch: int, workers: int, device: str, decode: str):
    from salient.pipeline.loader import LoaderConfig, SalientLoader

    return SalientLoader(
        LoaderConfig(
            data=str(data),
            store=store,
            image_size=IMAGE,
            patch_size=PATCH,
            batch_size=batch,
            strategy="amt",
            mask_ratio=MASK,
            throw_ratio=THROW,
            num_workers=workers,
            device=device,
            decode=decode,
        )
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _epochs_rate(loader, epochs: int) -> dict:
    """img/s over ``epochs`` whole epochs after one untimed epoch."""
    list(loader.epoch(0))
    samples, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in loader.epoch(epoch):
            samples += len(batch["ids"])
        _sync(loader.config.device)
    seconds = time.perf_counter() - start
    return {
        "img_s": round(samples / seconds, 1),
        "images": samples,
        "seconds": round(seconds, 3),
        "workers": loader.num_workers,
    }


def _cpu_rates(data: Path, store: str, settings: dict) -> list[dict]:
    rows = []
    for workers in settings["workers"]:
        loader = _loader(data, store, settings["batch"], workers, "cpu", "worker")
        rows.append(_epochs_rate(loader, settings["epochs"]))
    return rows


def _planning_ms(device: str, reps: int) -> dict:
    """Median ms per ``[256, 196]`` batch: ``plan_masks("amt")`` alone, and the loader's
    ``plan_batch`` (per-image normalisation + amt + random masking for one fallback row)."""
    from salient.pipeline.loader import plan_batch
    from salient.pipeline.masking import plan_masks

    dev = torch.device(device)
    gen = torch.Generator(dev).manual_seed(0)
    weights = torch.rand(256, 196, generator=gen, device=dev)
    has_map = torch.ones(256, dtype=torch.bool, device=dev)
    has_map[0] = False
    calls = {
        "plan_masks_amt": lambda: plan_masks("amt", weights, MASK, THROW, generator=gen),
        "plan_batch": lambda: plan_batch("amt", weights, has_map, MASK, THROW, gen, 0.0, {}),
    }
    return {name: _median_ms(call, reps, dev) for name, call in calls.items()}


def _median_ms(call, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps + 3):  # three warm-up calls
        start = time.perf_counter()
        call()
        _sync(device.type)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times[3:]), 4)


def _main_rate(loader, batches: int) -> float:
    """img/s of the main process alone on prepared samples: decode + crop + normalise + plan
    (the device path's ceiling; the workers only read tars and parse headers)."""
    from salient.pipeline.loader import EpochStats

    stats = EpochStats(epoch=0, rank=0, generation=None)
    passes = loader._items(0, loader.bind_generation(), stats)
    size, device = loader.config.batch_size, loader.config.device
    items = [[passes.next() for _ in range(size)] for _ in range(batches)]
    times = []
    for index, group in enumerate(items * 2):
        _sync(device)
        start = time.perf_counter()
        ready = loader._images_for(group, stats)
        loader._batch(ready, 0, index, stats.generation, 0.0, stats)
        _sync(device)
        times.append(time.perf_counter() - start)
    timed = times[batches:]  # the second round: nvjpeg and the allocator warmed up
    return round(size * len(timed) / sum(timed), 1)


def device_path_rates(
    data: Path, store: str, device: str, batch: int, workers: int, epochs: int = 1
) -> dict:
    """The device decode path (``decode="device"``) on ``data``: ``main_img_s`` (the main
    process alone on prepared samples: its ceiling) and ``loader_img_s`` (whole epochs)."""
    loader = _loader(data, store, batch, workers, device, "device")
    main = _main_rate(loader, batches=4)
    whole = _epochs_rate(loader, epochs)
    return {
        "main_img_s": main,
        "loader_img_s": whole["img_s"],
        "workers": whole["workers"],
        "images": whole["images"],
    }


def jpeg_bytes(data: Path) -> list[bytes]:
    """Every JPEG of a dataset's shards, in id order (what a bare decode benchmark decodes)."""
    records = []
    for path in sorted(Path(data).glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    records.append(tar.extractfile(member).read())
    return records


def _device_path(work: Path, settings: dict, device: str) -> dict:
    distinct = _demo(work / "gpu-distinct", settings["distinct"], settings["scene"], 256)
    data = _tiled(distinct, work / "gpu-data", settings["copies"], settings["shard_size"])
    store = random_store(data, work / "gpu.zarr")
    rates = device_path_rates(
        data, store, device, settings["batch"], settings["workers"], settings["epochs"]
    )
    return {
        "image_size": IMAGE,
        "batch_size": settings["batch"],
        "scene_px": settings["scene"],
        **rates,
        "target_img_s": 5000,
    }


def bench_loader(quick: bool = False, device: str = "auto", data: str | None = None) -> dict:
    """Loader img/s (CPU path with 0 / 1 / 2 workers; GPU path on CUDA) and planning ms.

    Returns ``cpu`` (a row per worker count: ``img_s``, ``images``, ``seconds``, ``workers``),
    ``planning_ms_cpu`` (and ``planning_ms_cuda``: ``{"plan_masks_amt", "plan_batch"}``),
    ``gpu`` on CUDA, and the sizes used.
    """
    cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    settings = _settings(quick, cuda)
    cpu = settings["cpu"]
    with tempfile.TemporaryDirectory(prefix="salient-bench-loader-") as tmp:
        work = Path(tmp)
        source = (
            Path(data) if data else _demo(work / "data", cpu["n"], cpu["scene"], cpu["shard_size"])
        )
        store = random_store(source, work / "saliency.zarr")
        result = {
            "image_size": IMAGE,
            "patch_size": PATCH,
            "mask_ratio": MASK,
            "throw_ratio": THROW,
            "batch_size": cpu["batch"],
            "scene_px": cpu["scene"],
            "dataset": str(data) if data else f"demo n={cpu['n']}",
            "cpu": _cpu_rates(source, store, cpu),
            "planning_ms_cpu": _planning_ms("cpu", settings["plan_reps"]),
        }
        if cuda:
            result["planning_ms_cuda"] = _planning_ms("cuda", settings["plan_reps"])
            result["gpu"] = _device_path(work, settings["gpu"], "cuda")
    return result
