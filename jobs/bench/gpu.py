"""``salient bench gpu --out DIR``: every figure that needs a GPU, in one call.

One call measures, on one dataset made for it (demo scenes tiled into a larger set, so making
the data costs seconds, not minutes):

- ``masking_ms``: ``plan_masks`` per ``[256, 196]`` batch of every strategy on the device
  (limit: the 1 ms target);
- ``refresh_img_s``: the refresh job end to end, shards to a published generation (ViT-B/16 at
  224, bf16 and nvjpeg on CUDA; limit: the teacher's forward-only rate on the same device);
- ``loader_img_s``: the GPU loader path (workers ship JPEG bytes, the device decodes, crops and
  plans; limit: a bare batched ``decode_jpeg`` of the same bytes on the same device);
- ``train_amt_vs_random``: MAE AMT 45/40 vs MAE random 75 % step rate (synthetic input), and
  ``train_loader_img_s`` per case (limit: the same step on synthetic input);
- ``train_ibot_img_s_*``: iBOT's step on ViT-S/16 (2 × 224 + 10 × 96 crops, bf16) with
  AttMask-High's masks planned online from the EMA teacher against iBOT's random and block
  masks (limit: the random-mask step), ``train_ibot_attmask_vs_random``, and
  ``ibot_views_loader_img_s``, the multi-crop loader alone (limit: the online step);
- ``automae_*``: AutoMAE's step (MAE-B at 224, bf16) with the teacher's per-head maps read from
  the store against the teacher run on every batch (``automae_store_vs_online``, synthetic and
  through the loader), and the rank correlation of the cropped stored heads with the teacher
  recomputed on each crop (``automae_heads_spearman``; its own teacher, a label-trained ViT-B,
  is trained first).

Each figure is one JSON line in ``DIR/gpu-figures.jsonl``, written as soon as it is measured
(a call cut short still returns what it measured), stamped with the device, versions and
date. The same code runs with ``--device cpu --quick`` in the test suite; only the sizes and
the device change on a GPU (BENCHMARKS.md, "Running the GPU checks").
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from salient.jobs.bench.automae import bench_automae
from salient.jobs.bench.ibot import bench_ibot
from salient.jobs.bench.loader import _demo, _tiled, device_path_rates, image_bytes, random_store
from salient.jobs.bench.masking import bench_masking
from salient.jobs.bench.refresh import bench_refresh
from salient.jobs.bench.stamp import device_info, stamp_now
from salient.jobs.bench.train import bench_train

__all__ = ["FIGURES_FILE", "bench_gpu"]

FIGURES_FILE = "gpu-figures.jsonl"
MASK, THROW = 0.45, 0.40  # AMT with MAE


@dataclass(frozen=True)
class _Sizes:
    distinct: int  # demo scenes rendered
    copies: int  # tiled this many times
    scene: int  # px
    shard_size: int
    refresh_model: str
    refresh_batch: int
    refresh_cpus: float
    loader_batch: int
    loader_workers: int
    decode_batches: int


def _sizes(cuda: bool, quick: bool, cpus: int) -> _Sizes:
    if cuda:  # ~3 minutes of measuring on one H100 / H200, data included
        return _Sizes(
            distinct=256 if quick else 1024,
            copies=4 if quick else 16,
            scene=256,
            shard_size=1024,
            refresh_model="vit_base_patch16_224",
            refresh_batch=256,
            refresh_cpus=float(max(1, min(8, cpus - 2))),
            loader_batch=256,
            loader_workers=max(1, min(12, cpus - 2)),
            decode_batches=8 if quick else 32,
        )
    return _Sizes(
        distinct=32 if quick else 256,
        copies=2 if quick else 4,
        scene=256 if not quick else 96,
        shard_size=32 if quick else 256,
        refresh_model="vit_tiny_patch16_224",
        refresh_batch=16 if quick else 32,
        refresh_cpus=1.0,
        loader_batch=16 if quick else 64,
        loader_workers=1 if quick else 2,
        decode_batches=2 if quick else 8,
    )


class _Figures:
    """Figure lines appended to ``DIR/gpu-figures.jsonl`` as they are measured."""

    def __init__(self, out: Path | None, stamp: dict):
        self.path = None if out is None else out / FIGURES_FILE
        self.stamp = stamp
        self.rows: list[dict] = []
        if self.path is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        figure: str,
        value: float,
        unit: str,
        limit: str | None = None,
        limit_value: float | None = None,
        target: float | None = None,
        higher_is_better: bool = True,
        **details,
    ) -> None:
        row = {"figure": figure, "value": round(value, 4), "unit": unit}
        if limit_value:
            row.update(
                limit=limit, limit_value=round(limit_value, 4), ratio=round(value / limit_value, 4)
            )
        if target is not None:
            row.update(
                target=target, meets_target=value >= target if higher_is_better else value <= target
            )
        row.update(details)
        row.update(self.stamp)
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as stream:
                stream.write(json.dumps(row, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- data


def _dataset(work: Path, sizes: _Sizes) -> tuple[Path, str]:
    """Demo scenes tiled into ``distinct × copies`` samples, and a store of random maps."""

    distinct = _demo(work / "distinct", sizes.distinct, sizes.scene, sizes.distinct)
    data = _tiled(distinct, work / "data", sizes.copies, sizes.shard_size)
    return data, random_store(data, work / "maps.zarr")


# ---------------------------------------------------------------- figures


def _masking(figures: _Figures, device: str, quick: bool) -> None:
    plan_ms = bench_masking(quick=quick, device=device)["plan_ms"]
    for strategy, by_ratio in plan_ms.items():
        figures.add(
            f"masking_ms_{strategy}",
            by_ratio["r0.45_t0.40"],
            "ms",
            target=1.0,
            higher_is_better=False,
            batch=256,
            patches=196,
        )


def _refresh(figures: _Figures, data: Path, device: str, sizes: _Sizes) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        # A bare GPU machine carries Ray without its dashboard's extra packages, and a
        # benchmark needs no dashboard: start Ray here without it (bench_refresh reuses it).
        ray.init(
            address="local",
            include_dashboard=False,
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
    try:
        result = bench_refresh(
            device=device,
            workers=(1,),
            data=str(data),
            model=sizes.refresh_model,
            variants=("actors",),
            batch_size=sizes.refresh_batch,
            cpus_per_worker=sizes.refresh_cpus,
        )
    finally:
        if started:
            ray.shutdown()
    run = result["runs"][0]
    figures.add(
        "refresh_img_s",
        run["img_per_s"],
        "img/s",
        "forward-only img/s",
        result["forward_img_per_s_per_worker"],
        target=8000 if device != "cpu" else None,
        model=result["model"],
        precision=result["precision"],
        batch_size=result["batch_size"],
        images=run["images"],
    )


def _bare_decode_rate(data: Path, device: str, batch: int, batches: int) -> float:
    """img/s of ``decode_jpeg`` alone on ``device``, batches of ``batch`` images of the set
    (demo sets are all JPEG)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in image_bytes(str(data))]
    groups = [encoded[i : i + batch] for i in range(0, len(encoded) - batch + 1, batch)]
    groups = (groups * (batches // max(len(groups), 1) + 1))[: batches + 1]
    decode_jpeg(groups[0], mode=ImageReadMode.RGB, device=device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for group in groups[1:]:
        decode_jpeg(group, mode=ImageReadMode.RGB, device=device)
    _sync(device)
    return batch * (len(groups) - 1) / (time.perf_counter() - start)


def _loader(figures: _Figures, data: Path, store: str, device: str, sizes: _Sizes) -> None:
    rates = device_path_rates(data, store, device, sizes.loader_batch, sizes.loader_workers)
    bare = _bare_decode_rate(data, device, sizes.loader_batch, sizes.decode_batches)
    target = 5000 if device != "cpu" else None
    figures.add(
        "loader_img_s",
        rates["loader_img_s"],
        "img/s",
        "bare decode_jpeg img/s",
        bare,
        target=target,
        workers=rates["workers"],
        batch_size=sizes.loader_batch,
    )
    figures.add("loader_main_img_s", rates["main_img_s"], "img/s", "bare decode_jpeg img/s", bare)


def _train(figures: _Figures, data: Path, device: str, quick: bool) -> None:
    result = bench_train(quick=quick, device=device, data=str(data))
    for model, ratios in result["amt_vs_random"].items():
        figures.add(
            f"train_{model}_amt_vs_random",
            ratios["synthetic"],
            "x",
            target=1.4,
            loader_ratio=ratios["loader"],
            model_size=result["model_size"],
        )
    for case, row in result["cases"].items():
        figures.add(
            f"train_loader_img_s_{case}",
            row["loader_img_s"],
            "img/s",
            "synthetic-input img/s",
            row["synthetic_img_s"],
            target=None,
            within_5_percent=row["loader_vs_synthetic"] >= 0.95,
        )


def _ibot(figures: _Figures, data: Path, device: str, quick: bool) -> None:
    result = bench_ibot(quick=quick, device=device, data=str(data))
    arms = result["arms"]
    sizes = {k: result[k] for k in ("model", "image_size", "local_crops", "local_size")}
    for arm, rate in arms.items():
        figures.add(
            f"train_ibot_img_s_{arm}",
            rate,
            "img/s",
            "random-mask step img/s",
            arms["random"],
            batch_size=result["batch_size"],
            **sizes,
        )
    figures.add("train_ibot_attmask_vs_random", result["attmask_vs_random"], "x", **sizes)
    figures.add(
        "ibot_views_loader_img_s",
        result["views_loader_img_s"],
        "img/s",
        "attmask_high step img/s",
        arms["attmask_high"],
        workers=result["loader_workers"],
        **sizes,
    )


def _automae(figures: _Figures, device: str, quick: bool) -> None:
    result = bench_automae(quick=quick, device=device)
    sizes = {k: result[k] for k in ("model", "image_size", "batch_size", "heads")}
    for path, saving in result["saving"].items():  # synthetic, loader
        figures.add(
            f"automae_train_img_s_store_{path}",
            saving["store_img_s"],
            "img/s",
            "teacher on every batch img/s",
            saving["online_img_s"],
            **sizes,
        )
        figures.add(f"automae_store_vs_online_{path}", saving["store_vs_online"], "x", **sizes)
    crops = result["fidelity"]["crops"]
    figures.add("automae_heads_spearman", crops["mean"], "rho", samples=crops["samples"], **sizes)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the benchmark


def bench_gpu(quick: bool = False, device: str = "auto", out: str | None = None) -> dict:
    """Every GPU figure in one call; returns them (also appended to ``out/gpu-figures.jsonl``)."""

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info(device)
    sizes = _sizes(device.startswith("cuda"), quick, info["host_cpus"])
    figures = _Figures(None if out is None else Path(out), {**info, "date": stamp_now()})
    start = time.perf_counter()
    steps = {}
    with tempfile.TemporaryDirectory(prefix="salient-bench-gpu-") as tmp:
        data, store = _dataset(Path(tmp), sizes)
        for name, run in (
            ("masking", lambda: _masking(figures, device, quick)),
            ("refresh", lambda: _refresh(figures, data, device, sizes)),
            ("loader", lambda: _loader(figures, data, store, device, sizes)),
            ("train", lambda: _train(figures, data, device, quick)),
            ("ibot", lambda: _ibot(figures, data, device, quick)),
            ("automae", lambda: _automae(figures, device, quick)),
        ):
            begin = time.perf_counter()
            run()
            steps[name] = round(time.perf_counter() - begin, 1)
    return {
        "figures": figures.rows,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_step": steps,
        "images": sizes.distinct * sizes.copies,
        "file": None if figures.path is None else str(figures.path),
    }
