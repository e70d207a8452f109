"""``salient bench masking``: mask-planning time per batch of 256 at N=196, every strategy.

The target is ≤ 1 ms per batch for planning, so that masks never bound a loader
worker. CPU figures use one torch thread, as inside a DataLoader worker. Also timed: the
per-batch weights path in front of planning (``crop_maps`` of 256 maps onto the 14×14
grid, ``normalize_weights``) and one ``sample_crop_box``.
"""

from __future__ import annotations

import statistics
import time

import torch

from salient.pipeline.crops import crop_maps, normalize_weights, sample_crop_box
from salient.pipeline.masking import STRATEGIES, plan_masks

__all__ = ["bench_masking"]

BATCH, GRID, IMAGE = 256, 14, 224
RATIOS = {"r0.45_t0.40": (0.45, 0.40), "r0.75_t0.00": (0.75, 0.0)}  # AMT with MAE; MAE


def bench_masking(quick: bool = False, device: str = "cpu") -> dict:
    """Median milliseconds per batch for each strategy and ratio pair, and the weights path."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        return _measure(20 if quick else 200, device)
    finally:
        torch.set_num_threads(threads)


def _measure(repeats: int, device: str) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    box_generator = torch.Generator().manual_seed(1)
    boxes = [sample_crop_box(IMAGE, IMAGE, box_generator) for _ in range(BATCH)]
    hws = [(IMAGE, IMAGE)] * BATCH
    maps = torch.rand(BATCH, GRID, GRID, device=device, generator=generator)
    weights = normalize_weights(crop_maps(maps, boxes, hws, GRID))  # [256, 196]

    def plan(name, ratios):
        return lambda: plan_masks(name, weights, *ratios, generator=generator, progress=0.5)

    plan_ms = {
        name: {
            label: _median_ms(plan(name, ratios), repeats, device)
            for label, ratios in RATIOS.items()
        }
        for name in STRATEGIES
    }
    return {
        "batch": BATCH,
        "patches": GRID * GRID,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "target_plan_ms": 1.0,
        "plan_ms": plan_ms,
        "crop_maps_ms": _median_ms(lambda: crop_maps(maps, boxes, hws, GRID), repeats, device),
        "normalize_weights_ms": _median_ms(lambda: normalize_weights(maps), repeats, device),
        "sample_crop_box_us": 1000
        * _median_ms(lambda: sample_crop_box(IMAGE, IMAGE, box_generator), repeats, "cpu"),
    }


def _median_ms(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls, after 3 warm-up calls."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)
