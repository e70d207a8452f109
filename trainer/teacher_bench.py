"""Speed of :func:`~salient.trainer.teacher.saliency` against the teacher's plain forward."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from salient.trainer.teacher import saliency

__all__ = ["bench_saliency"]


def bench_saliency(
    model: VisionTransformer,
    batch_size: int = 64,
    image_size: int = 224,
    kind: str = "cls_attn",
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> dict:
    """Seconds per batch of :func:`saliency` vs the plain full forward, best of ``repeats``.

    The two are timed alternately, after one warm-up each, so a busy machine slows both alike.
    """
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    runs = {"forward": lambda: model(images), "saliency": lambda: saliency(model, images, kind)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for name, run in runs.items():
                times[name].append(_timed(run, torch.device(device)))
    forward_s, saliency_s = (min(times[name][1:]) for name in ("forward", "saliency"))
    return {
        "kind": kind,
        "batch_size": batch_size,
        "image_size": image_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "saliency_s": round(saliency_s, 4),
        "forward_s": round(forward_s, 4),
        "saliency_over_forward": round(saliency_s / forward_s, 3),
        "saliency_img_per_s": round(batch_size / saliency_s, 1),
        "forward_img_per_s": round(batch_size / forward_s, 1),
    }


def _timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
