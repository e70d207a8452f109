"""``salient bench ibot``: iBOT's train-step rate with AttMask's online masks against iBOT's
own random and block masks, and the multi-crop loader beside it.

Three arms through the real step (``salient.trainer.loop.train_one_epoch`` with the iBOT
family: the teacher's and the student's forwards, both losses, backward, per-parameter
clipping, AdamW, the EMA update), on synthetic multi-crop batches already on the device:

- ``attmask_high``: the batches carry no masks; the step reads the EMA teacher's last-block
  [CLS] attention from the forward it runs anyway (``teacher.cls_attention``) and plans
  AttMask-High's masks from it (``plan_mask_flags``): AttMask's online source;
- ``random`` and ``block``: the batches carry masks planned beforehand, as the loader plans
  them, so the step only runs the model.

Masks as the recipes plan them: ratio 0.3 ± 0.2 per batch, half the views masked. The step
rate is images over the wall time between step ends, after warm-up steps. Sizes: on CUDA
AttMask's ViT-S/16 setting, 2 global crops of 224 and 10 local crops of 96, 64 images per
step, bf16 autocast; on the CPU the micro model at 64 px with 2 local crops of 32 (``quick``:
32 px, 16 px locals). ``views_loader_img_s``: the multi-crop loader alone (DINO's
augmentations in its workers, AttMask's online source: no store read) over a demo set, or
``data``; the step cannot run faster than it.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from salient.jobs.bench.steps import step_rate
from salient.jobs.train.recipes import recipe_config
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import SalientLoader
from salient.pipeline.masking import plan_mask_flags
from salient.trainer.family import FAMILIES
from salient.trainer.loop import build_optimizer

__all__ = ["ARMS", "bench_ibot"]

ARMS = ("attmask_high", "block", "random")
_RATIO, _MASKS = 0.3, {"mask_prob": 0.5, "ratio_var": 0.2}  # the ibot recipes' masks


@dataclass(frozen=True)
class _Setup:
    model: str
    image_size: int
    patch_size: int
    local_crops: int
    local_size: int
    batch_size: int
    warmup_steps: int
    steps: int
    loader_workers: int
    loader_batches: int
    images: int  # demo scenes written for the loader run when no data is given

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _setup(device: torch.device, quick: bool, cpus: int) -> _Setup:
    if device.type == "cuda":  # AttMask README: ViT-S/16, 2 × 224 + 10 × 96, 60 per GPU
        workers = max(1, min(16, cpus - 2))
        return _Setup("ibot-small", 224, 16, 10, 96, 64, 3, 5 if quick else 20, workers, 8, 512)
    if quick:
        return _Setup("ibot-micro", 32, 8, 2, 16, 8, 1, 3, 1, 3, 64)
    return _Setup("ibot-micro", 64, 8, 2, 32, 16, 2, 6, 2, 6, 256)


def _batches(setup: _Setup, strategy: str, device: torch.device, count: int = 3) -> list[dict]:
    """``count`` multi-crop batches of random pixels on ``device``; with masks planned as the
    loader plans them, except for a strategy the step plans online (``attmask_high``)."""
    generator = torch.Generator(device).manual_seed(0)
    b, views = setup.batch_size, 2

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    batches = []
    for index in range(count):
        batch = {
            "global_images": pixels(views, b, 3, setup.image_size, setup.image_size),
            "local_images": pixels(setup.local_crops, b, 3, setup.local_size, setup.local_size),
            "mask_seed": index,
            "ids": torch.arange(b),
            "has_saliency": torch.zeros(b, dtype=torch.bool),
            "generation": None,
        }
        if strategy != "attmask_high":
            weights = torch.ones(views * b, setup.grid**2, device=device)
            flags = plan_mask_flags(strategy, weights, _RATIO, generator=generator, **_MASKS)
            batch["masks"] = flags.view(views, b, -1)
        batches.append(batch)
    return batches


def _step_rate(setup: _Setup, strategy: str, device: torch.device) -> float:
    """Images per second of iBOT's step on ``strategy``'s batches."""
    family = FAMILIES["ibot"]
    torch.manual_seed(0)
    model = family.build(
        setup.model,
        setup.image_size,
        setup.patch_size,
        strategy=strategy,
        mask_ratio=_RATIO,
        strategy_options=dict(_MASKS),
    ).to(device)
    optimizer = build_optimizer(model, 5e-4, 0.04, (0.9, 0.999))
    return step_rate(
        model, optimizer, itertools.cycle(_batches(setup, strategy, device)), lr=5e-4,
        warmup=setup.warmup_steps, steps=setup.steps, batch_size=setup.batch_size,
        device=device, family=family, hooks=family.hooks(model, optimizer), clip_grad=3.0,
    )  # fmt: skip


def _loader_rate(setup: _Setup, data: str, device: torch.device) -> float:
    """Images per second of the multi-crop loader alone, configured as the
    ``attmask-ibot-high`` recipe at the bench's sizes configures it."""
    run = recipe_config(
        "attmask-ibot-high",
        data=data,
        model=setup.model,
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        local_crops=setup.local_crops,
        local_size=setup.local_size,
        batch_size=setup.batch_size,
        effective_batch=None,
        loader_workers=setup.loader_workers,
    )
    loader = SalientLoader(run.loader_config(device=str(device)))
    batches = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())
    next(batches)  # workers started, first chunks decoded
    start, images = time.perf_counter(), 0
    for batch in itertools.islice(batches, setup.loader_batches):
        images += len(batch["ids"])
    return images / (time.perf_counter() - start)


def bench_ibot(quick: bool = False, device: str = "auto", data: str | None = None) -> dict:
    """iBOT step img/s per arm (:data:`ARMS`), their ratios, and the multi-crop loader's
    img/s over ``data`` (a dataset path or URL; else a demo set written for the run).

    Returns ``arms`` (arm -> img/s), ``attmask_vs_random`` and ``attmask_vs_block`` (the
    online arm's rate over the others'), ``views_loader_img_s`` and the setup.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    setup = _setup(dev, quick, os.cpu_count() or 1)
    arms = {arm: round(_step_rate(setup, arm, dev), 2) for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="salient-bench-ibot-") as tmp:
        if data is None:
            data = str(Path(tmp) / "data")
            scene = max(2 * setup.image_size, 64)
            ingest_demo(
                data, n=setup.images, seed=0, shard_size=setup.images // 4, image_size=scene
            )
        loader_rate = _loader_rate(setup, data, dev)
    return {
        "model": setup.model,
        "image_size": setup.image_size,
        "patch_size": setup.patch_size,
        "local_crops": setup.local_crops,
        "local_size": setup.local_size,
        "batch_size": setup.batch_size,
        "steps": setup.steps,
        "warmup_steps": setup.warmup_steps,
        "bf16": dev.type == "cuda",
        "threads": torch.get_num_threads(),
        "arms": arms,
        "attmask_vs_random": round(arms["attmask_high"] / arms["random"], 3),
        "attmask_vs_block": round(arms["attmask_high"] / arms["block"], 3),
        "views_loader_img_s": round(loader_rate, 1),
        "loader_workers": setup.loader_workers,
    }
