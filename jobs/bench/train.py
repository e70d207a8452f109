"""``salient bench train``: train-step throughput of MAE / SimMIM, random masking vs AMT.

Four cases (AMT Sec. "Implementation Details"): MAE random 75 %, MAE AMT r=0.45 t=0.40,
SimMIM random 60 %, SimMIM AMT r=0.44 t=0.26. Each is timed twice in one process, without
Ray, through the real step (``salient.trainer.loop.train_one_epoch``: lr, forward, backward,
clip, AdamW step, loss read back):

- ``synthetic``: a few random batches (images + mask plans) already on the device, cycled,
  so only the model's step is measured;
- ``loader``: the real loader (``SalientLoader``) over a demo dataset written for the run,
  with a store holding random maps for the AMT cases, so decode, crop and planning must keep
  up with the step.

The step rate is images over the wall time between step ends, after warm-up steps. On CUDA
the models are ViT-B/16 at 224 px in bf16 autocast (AMT's setting); on CPU a ViT-Ti/16 at
112 px in float32 (``quick``: the micro model at 64 px). Reported ratios: AMT / random
step rate per model (AMT throws patches, so its steps are shorter), loader / synthetic per
case (1.0 = the loader keeps up).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from salient.jobs.bench.loader import random_store
from salient.jobs.bench.steps import step_rate
from salient.jobs.train.config import TrainConfig
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import SalientLoader
from salient.pipeline.masking import plan_masks
from salient.trainer.loop import build_optimizer
from salient.trainer.models import build_model

__all__ = ["CASES", "bench_train"]

# name -> (model kind, strategy, mask ratio, throw ratio)
CASES = {
    "mae_random_75": ("mae", "random", 0.75, 0.0),
    "mae_amt_45_40": ("mae", "amt", 0.45, 0.40),
    "simmim_random_60": ("simmim", "random", 0.60, 0.0),
    "simmim_amt_44_26": ("simmim", "amt", 0.44, 0.26),
}


@dataclass(frozen=True)
class _Setup:
    size: str
    image_size: int
    patch_size: int
    batch_size: int
    warmup_steps: int
    steps: int
    images: int  # demo images written for the loader runs
    loader_workers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _setup(device: torch.device, quick: bool) -> _Setup:
    if device.type == "cuda":
        if quick:
            return _Setup("base", 224, 16, 64, 3, 10, 1024, 8)
        return _Setup("base", 224, 16, 256, 5, 30, 4096, 12)
    if quick:
        return _Setup("micro", 64, 8, 16, 2, 6, 128, 1)
    return _Setup("tiny", 112, 16, 32, 2, 8, 256, 2)


# ---------------------------------------------------------------- inputs


def _synthetic(
    setup: _Setup,
    strategy: str,
    mask_ratio: float,
    throw_ratio: float,
    device: torch.device,
    count: int = 4,
) -> list[dict]:
    """``count`` batches of random images and plans (random weights for AMT), on ``device``."""

    generator = torch.Generator(device).manual_seed(0)
    n, b = setup.grid**2, setup.batch_size
    batches = []
    for _ in range(count):
        weights = torch.rand(b, n, generator=generator, device=device) + 1e-6
        plan = plan_masks(strategy, weights, mask_ratio, throw_ratio, generator=generator)
        batches.append(
            {
                "images": torch.randn(
                    b, 3, setup.image_size, setup.image_size, generator=generator, device=device
                ),
                "visible_idx": plan.visible_idx,
                "mask_idx": plan.mask_idx,
                "throw_idx": plan.throw_idx,
                "ids": torch.arange(b),
                "has_saliency": torch.ones(b, dtype=torch.bool),
                "generation": None,
            }
        )
    return batches


def _write_inputs(root: Path, setup: _Setup, data: str | None = None) -> tuple[str, str]:
    """A demo dataset (or ``data``) and a store with one published generation of random maps."""

    if data is None:
        data = root / "data"
        ingest_demo(
            data,
            n=setup.images,
            seed=0,
            shard_size=max(setup.images // 8, setup.batch_size),
            image_size=max(setup.image_size, 64),
        )
    store_url = random_store(data, root / "saliency.zarr", setup.grid, setup.patch_size)
    return str(data), store_url


def _loader_batches(
    setup: _Setup, name: str, data: str, store: str, device: torch.device
) -> Iterator[dict]:
    """The real loader's batches of case ``name``, epoch after epoch, configured as a
    training run of that case configures it."""
    kind, strategy, mask_ratio, throw_ratio = CASES[name]
    run = TrainConfig(
        data=data,
        store=store,
        model=f"{kind}-{setup.size}",
        strategy=strategy,
        mask_ratio=mask_ratio,
        throw_ratio=throw_ratio,
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        batch_size=setup.batch_size,
        loader_workers=setup.loader_workers,
    )
    loader = SalientLoader(run.loader_config(device=str(device)))
    return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())


# ---------------------------------------------------------------- timing


def _step_rate(setup: _Setup, kind: str, batches: Iterator[dict], device: torch.device) -> float:
    """Images per second of the train step, over ``steps`` steps after ``warmup_steps``."""

    torch.manual_seed(0)
    model = build_model(f"{kind}-{setup.size}", setup.image_size, setup.patch_size).to(device)
    optimizer = build_optimizer(model, lr=1.5e-4)
    return step_rate(
        model, optimizer, batches, lr=1.5e-4, warmup=setup.warmup_steps, steps=setup.steps,
        batch_size=setup.batch_size, device=device, clip_grad=5.0,
    )  # fmt: skip


def _case(setup: _Setup, name: str, device: torch.device, data: str, store: str) -> dict:
    kind, strategy, mask_ratio, throw_ratio = CASES[name]
    synthetic = _synthetic(setup, strategy, mask_ratio, throw_ratio, device)
    synthetic_rate = _step_rate(setup, kind, itertools.cycle(synthetic), device)
    loader = _loader_batches(setup, name, data, store, device)
    loader_rate = _step_rate(setup, kind, loader, device)
    return {
        "synthetic_img_s": round(synthetic_rate, 1),
        "loader_img_s": round(loader_rate, 1),
        "loader_vs_synthetic": round(loader_rate / synthetic_rate, 3),
    }


def bench_train(quick: bool = False, device: str = "auto", data: str | None = None) -> dict:
    """Step img/s of the four cases with synthetic inputs and with the real loader (over
    ``data``, a dataset path or URL, when given; else a demo set written for the run).

    Returns ``cases`` (per case: ``synthetic_img_s``, ``loader_img_s``,
    ``loader_vs_synthetic``), ``amt_vs_random`` (per model, synthetic and loader) and the
    setup (model size, image and patch size, batch size, steps).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    setup = _setup(dev, quick)
    with tempfile.TemporaryDirectory(prefix="salient-bench-train-") as tmp:
        data, store = _write_inputs(Path(tmp), setup, data)
        cases = {name: _case(setup, name, dev, data, store) for name in CASES}
    ratio = {
        model: {
            source: round(cases[amt][f"{source}_img_s"] / cases[rnd][f"{source}_img_s"], 3)
            for source in ("synthetic", "loader")
        }
        for model, amt, rnd in (
            ("mae", "mae_amt_45_40", "mae_random_75"),
            ("simmim", "simmim_amt_44_26", "simmim_random_60"),
        )
    }
    return {
        "model_size": setup.size,
        "image_size": setup.image_size,
        "patch_size": setup.patch_size,
        "batch_size": setup.batch_size,
        "steps": setup.steps,
        "warmup_steps": setup.warmup_steps,
        "loader_workers": setup.loader_workers,
        "bf16": dev.type == "cuda",
        "threads": torch.get_num_threads(),
        "cases": cases,
        "amt_vs_random": ratio,
    }
