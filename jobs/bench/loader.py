"""``salient bench loader``: img/s of the streaming loader beside a bare decode, and mask planning.

- ``bare_img_s`` (per row): a bare single-process PIL decode + ``RandomResizedCrop(224)`` (with
  the loader's interpolation, bicubic by default as in MAE) + flip (torchvision transforms on
  PIL images, uint8 tensors out) over the same shards, their bytes read beforehand — the
  least any loader must do per image — measured right before and right after the row, so a
  change of load on the shared machine skews both alike.
- ``cpu``: the CPU path (DataLoader workers decode with PIL and crop; ``decode="worker"``,
  ``device="cpu"``) at 224 px / patch 16 (N = 196), AMT 45 / 40 masking, with 0, 1 and 2
  DataLoader workers, and with 0 and 2 workers without read prefetching, with one torch
  thread in the main process (a per-core comparison; workers have one each). Each figure is the
  whole epochs after a first, untimed one: worker start-up and the end-of-epoch drain are
  included, as a training run pays them. ``per_core_vs_decode`` = loader img/s per process
  core (``max(1, workers)``) ÷ the bare rate (target ≥ 0.85); ``cpu_cores`` = CPU seconds of
  the loader's process, threads and workers ÷ wall seconds, and ``per_cpu_vs_decode`` =
  images per such CPU second ÷ the bare decode's.
- ``planning_ms_*``: median ms per ``[256, 196]`` batch of ``plan_masks("amt")`` alone and of
  the loader's ``plan_batch`` (normalisation + ``amt`` + a random fallback row), on the CPU
  and, on CUDA, on the GPU. Target ≤ 1 ms.
- on CUDA, ``gpu``: the GPU path (``decode="device"``: workers ship JPEG bytes, box and map
  crop; the main process decodes with nvjpeg, crops and resizes on the GPU) at 224 px,
  batch 256: ``main_img_s`` is the main process alone on prepared samples (its ceiling) and
  ``loader_img_s`` the whole loader with ``workers`` DataLoader workers. Target ≥ 5,000 img/s
  on one H100 (an AMT 45/40 ViT-B step consumes 5.0k img/s there).

``data`` benchmarks an existing dataset (a path or a URL: ``s3://…`` against any endpoint,
with the usual credentials and storage options) instead of a generated one; a store of random
maps is made for it in a temporary directory. For a URL the same rows are measured again on a
local copy (``cpu_local_copy``), so object storage and local disk stand side by side.
"""

from __future__ import annotations

import io
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from salient import urls
from salient.pipeline import shards
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import (
    EpochStats,
    SalientLoader,
    _Passes,
    decode_and_crop,
    plan_batch,
)
from salient.pipeline.loader_config import LoaderConfig
from salient.pipeline.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    fingerprint,
    open_dataset,
    sample_key,
    shard_name,
)
from salient.pipeline.masking import plan_masks
from salient.store import SaliencyStore

__all__ = ["bench_loader", "device_path_rates", "image_bytes", "random_store"]

IMAGE, PATCH, MASK, THROW = 224, 16, 0.45, 0.40


def _settings(quick: bool, cuda: bool) -> dict:
    cpu = {
        "n": 192 if quick else 1024,
        "scene": 256,
        "shard_size": 64 if quick else 128,
        "batch": 32 if quick else 64,
        "epochs": 1 if quick else 2,
        "workers": (0, 1, 2),
        "serial": (0, 2),  # worker counts measured again without read prefetching
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
    ingest_demo(out, n=n, seed=0, shard_size=shard_size, image_size=scene)
    return out


def _tiled(src: Path, out: Path, copies: int, shard_size: int) -> Path:
    """``copies`` × the samples of ``src`` under fresh ids: a large set without re-rendering
    scenes (decode cost per image is what a throughput figure needs, not distinct content)."""
    import webdataset as wds

    records, shards = image_bytes(str(src)) * copies, []
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


def image_bytes(data: str) -> list[bytes]:
    """Every image's bytes, in id order (the shard access layer reads them)."""

    out = []
    for url in open_dataset(data).shard_urls():
        for sample in shards.iter_samples(url, None, {"image"}):
            out.append(sample[shards.image_field(sample)])
    return out


def _local_copy(url: str, out: Path) -> str:
    """The dataset at ``url`` copied to ``out`` (shards, then the manifest)."""

    out.mkdir(parents=True)
    dataset = open_dataset(url)
    for shard in dataset.shards:
        (out / shard.name).write_bytes(urls.read_bytes(dataset.shard_url(shard)))
    (out / MANIFEST_NAME).write_bytes(urls.read_bytes(urls.join(dataset.root, MANIFEST_NAME)))
    return str(out)


def random_store(
    data: Path | str, url: Path | str, grid: int = IMAGE // PATCH, patch_size: int = PATCH
) -> str:
    """A store with one published generation of random ``grid x grid`` maps for ``data``."""

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


def _loader(
    data: Path | str,
    store: str,
    batch: int,
    workers: int,
    device: str,
    decode: str,
    prefetch: int = 64,
):
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
            prefetch=prefetch,
        )
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its children (DataLoader workers), from
    /proc (Linux; elsewhere this process alone)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[1] == me:  # ppid; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _epochs_rate(loader, epochs: int) -> dict:
    """img/s over ``epochs`` whole epochs after one untimed epoch, and the CPU cores the loader
    kept busy meanwhile (its process, threads and workers: CPU seconds ÷ wall seconds)."""
    list(loader.epoch(0))
    samples, start, cpu = 0, time.perf_counter(), _cpu_seconds()
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
        "cpu_cores": round((_cpu_seconds() - cpu) / seconds, 2),
    }


def _bare_rate(datas: list[bytes]) -> dict:
    """img/s of a bare single-process PIL decode + RandomResizedCrop(224) + flip, uint8 tensors
    out (torchvision's transforms), over image bytes read beforehand; and images per CPU
    second (what it would do on a core of its own). The crop resamples as the loader does
    (bicubic by default, MAE's ``RandomResizedCrop(224, interpolation=3)``)."""
    import torchvision.transforms.v2 as T
    from PIL import Image

    mode = T.InterpolationMode[LoaderConfig.interpolation.upper()]  # the loader's default
    crop = T.Compose(
        [
            T.RandomResizedCrop(IMAGE, interpolation=mode, antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )
    start, cpu = time.perf_counter(), time.process_time()
    for data_bytes in datas:
        with Image.open(io.BytesIO(data_bytes)) as image:
            crop(image.convert("RGB"))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"img_s": round(len(datas) / wall, 1), "img_per_cpu_s": round(len(datas) / cpu, 1)}


def _mean(rates: list[dict]) -> dict:
    return {k: round(statistics.mean(r[k] for r in rates), 1) for k in rates[0]}


def _cpu_rates(data: Path | str, store: str, settings: dict, datas: list[bytes]) -> list[dict]:
    """A row per case, each beside the bare decode measured right before and right after it
    (``bare_img_s``: their mean), so a change of load on the machine skews both alike.

    ``per_core_vs_decode``: img/s per process core (``max(1, workers)``) ÷ the bare img/s;
    ``per_cpu_vs_decode``: images per CPU second the loader used (all its threads and
    workers) ÷ the bare decode's.
    """
    cases = [(w, 64) for w in settings["workers"]] + [(w, 0) for w in settings["serial"]]
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # one core's work, as the bare decode (workers have one each)
    try:
        for workers, prefetch in cases:
            rows.append(_cpu_row(data, store, settings, datas, workers, prefetch))
    finally:
        torch.set_num_threads(threads)
    return rows


def _cpu_row(data, store: str, settings: dict, datas: list[bytes], workers: int, prefetch: int):
    before = _bare_rate(datas)
    loader = _loader(data, store, settings["batch"], workers, "cpu", "worker", prefetch)
    row = {**_epochs_rate(loader, settings["epochs"]), "prefetch": prefetch}
    del loader  # its persistent workers end with it
    bare = _mean([before, _bare_rate(datas)])
    row["bare_img_s"] = bare["img_s"]
    row["per_core_vs_decode"] = round(row["img_s"] / max(1, workers) / bare["img_s"], 3)
    per_cpu = row["img_s"] / max(row["cpu_cores"], 1e-9)
    row["per_cpu_vs_decode"] = round(per_cpu / bare["img_per_cpu_s"], 3)
    return row


def _planning_ms(device: str, reps: int) -> dict:
    """Median ms per ``[256, 196]`` batch: ``plan_masks("amt")`` alone, and the loader's
    ``plan_batch`` (per-image normalisation + amt + random masking for one fallback row)."""

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

    stats = EpochStats(epoch=0, rank=0, generation=None)
    passes = _Passes(loader, 0, loader.bind_generation(), stats)
    size, device = loader.config.batch_size, loader.config.device
    runs = [passes.take(size) for _ in range(batches)]
    times = []
    for index, group in enumerate(runs * 2):
        _sync(device)
        start = time.perf_counter()
        ready = [
            decode_and_crop(rows, loader.device, IMAGE, loader.config.interpolation)[0]
            for rows in group
        ]
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
    """Loader img/s (CPU path with 0 / 1 / 2 workers; GPU path on CUDA) beside the bare decode
    rate, and planning ms.

    Returns ``cpu`` (a row per case: ``img_s``, ``images``, ``seconds``, ``workers``,
    ``cpu_cores``, ``prefetch``, ``bare_img_s``, ``per_core_vs_decode``,
    ``per_cpu_vs_decode``); for a remote ``data`` also
    ``cpu_local_copy``; ``planning_ms_cpu`` (and ``planning_ms_cuda``: ``{"plan_masks_amt",
    "plan_batch"}``), ``gpu`` on CUDA, and the sizes used.
    """

    cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    settings = _settings(quick, cuda)
    cpu = settings["cpu"]
    with tempfile.TemporaryDirectory(prefix="salient-bench-loader-") as tmp:
        work = Path(tmp)
        source = (
            urls.normalise(data)
            if data
            else _demo(work / "data", cpu["n"], cpu["scene"], cpu["shard_size"])
        )
        local = _local_copy(source, work / "copy") if data and urls.is_remote(source) else None
        store = random_store(source, work / "saliency.zarr")
        datas = image_bytes(str(local or source))
        result = {
            "image_size": IMAGE,
            "patch_size": PATCH,
            "mask_ratio": MASK,
            "throw_ratio": THROW,
            "batch_size": cpu["batch"],
            "scene_px": cpu["scene"],
            "dataset": str(source) if data else f"demo n={cpu['n']}",
            "cpu": _cpu_rates(source, store, cpu, datas),
            "planning_ms_cpu": _planning_ms("cpu", settings["plan_reps"]),
        }
        if local:
            result["cpu_local_copy"] = _cpu_rates(local, store, cpu, datas)
        if cuda:
            result["planning_ms_cuda"] = _planning_ms("cuda", settings["plan_reps"])
            result["gpu"] = _device_path(work, settings["gpu"], "cuda")
    return result
