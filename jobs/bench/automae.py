"""``salient bench automae``: what storing AutoMAE's per-head maps costs and what it saves.

AutoMAE's paper runs its frozen teacher on every augmented batch; salient runs it once per
image (``salient refresh --kind heads``) and crops the stored heads with each image (README,
"Decisions", "AutoMAE's maps from the store"). On a demo set written for the run, with one
teacher (``teacher``, else a ViT trained here on the demo labels, whose attention finds the
objects: ``jobs/compare/teacher.py``) refreshed into a heads generation by the refresh job:

- ``fidelity`` — the mean Spearman rank correlation over every (sample, head) pair between a
  loader batch's cropped stored heads and the teacher's attention recomputed on the batch's
  own crops (``pipeline.map_stats.head_map_fidelity``), over ``batches`` batches, overall and
  per head. Rows: ``crops`` (training's crops: scale 0.2–1, flips), with beside it
  ``uncropped``, the stored whole-image heads against the same recomputed crops (what joint
  cropping buys over ignoring the crop); ``whole`` (scale 1, square, no flip: the crop is the
  image, so this is the resize differences alone, near 1).
- ``saving`` — AutoMAE's training step rate (``train_one_epoch`` with the family and its
  hooks: generator, discriminator step, MAE) with ``store`` maps against ``online`` ones (the
  teacher's forward on every batch), on the real loader and on synthetic batches already on
  the device (the teacher's cost alone), alternated over ``rounds`` in one process:
  ``store_vs_online`` = the ratio of step rates.

CPU: MAE-Tiny student and teacher, 64 px, 8 px patches (the demo's setting); ``quick``: the
micro model at 32 px, 4 px patches. CUDA: MAE-B at 224 px in bf16 (the paper's setting; its
teacher is MAE-B too).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from salient.jobs.bench.steps import step_rate
from salient.jobs.compare.teacher import train_label_teacher
from salient.jobs.refresh.driver import RefreshConfig, run_refresh
from salient.jobs.train.config import TrainConfig
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.loader import SalientLoader
from salient.pipeline.map_stats import spearman
from salient.store import SaliencyStore
from salient.trainer.automae import teacher_input
from salient.trainer.family import FAMILIES
from salient.trainer.loop import build_optimizer
from salient.trainer.teacher import saliency
from salient.trainer.teacher_load import load_teacher

__all__ = ["bench_automae"]


@dataclass(frozen=True)
class _Setup:
    model: str
    n: int
    scene: int
    image_size: int
    patch_size: int
    batch_size: int
    batches: int  # fidelity: loader batches per row
    teacher_epochs: int  # the label teacher's, at most
    warmup_steps: int
    steps: int
    rounds: int
    loader_workers: int


def _setup(device: torch.device, quick: bool) -> _Setup:
    if device.type == "cuda":
        return _Setup("mae-base", 2048, 256, 224, 16, 64, 20, 10, 3, 10, 2, 8)
    if quick:
        return _Setup("mae-micro", 64, 64, 32, 4, 16, 2, 1, 1, 2, 1, 0)
    return _Setup("mae-tiny", 400, 128, 64, 8, 32, 12, 30, 2, 8, 2, 1)


# ---------------------------------------------------------------- inputs


def _inputs(root: Path, setup: _Setup, teacher: str | None, device: torch.device) -> dict:
    """The demo sets, the teacher and its heads generation (``salient refresh --kind heads``)."""
    for split, n in (("train", setup.n), ("val", max(16, setup.n // 4))):
        ingest_demo(root / split, n=n, seed=0, shard_size=max(16, setup.n // 4),
                    image_size=setup.scene, split=split)  # fmt: skip
    trained = None
    if teacher is None:
        teacher = str(root / "teacher.pt")
        trained = train_label_teacher(
            str(root / "train"), str(root / "val"), teacher, setup.model, setup.image_size,
            setup.patch_size, epochs=setup.teacher_epochs, target=0.9, device=str(device),
        )  # fmt: skip
    refresh = run_refresh(
        RefreshConfig(
            data=str(root / "train"),
            store=str(root / "heads.zarr"),
            teacher=teacher,
            allow_random_teacher=teacher.startswith("timm:"),
            kind="heads",
            image_size=setup.image_size,
            gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
            cpus_per_worker=1.0,
        ),
        progress=False,
    )
    return {
        "data": str(root / "train"),
        "store": str(root / "heads.zarr"),
        "teacher": teacher,
        "label_teacher": trained,
        "refresh_img_s": refresh.get("img_per_s"),
    }


def _run(setup: _Setup, inputs: dict, heads: int, **fields) -> TrainConfig:
    """An AutoMAE run's settings on the bench's data (its loader, its model)."""
    return TrainConfig(
        data=inputs["data"],
        store=inputs["store"],
        model=setup.model,
        family="automae",
        strategy="random",
        image_size=setup.image_size,
        patch_size=setup.patch_size,
        batch_size=setup.batch_size,
        loader_workers=setup.loader_workers,
        generator_heads=heads,
        **fields,
    )


# ---------------------------------------------------------------- fidelity


def _fidelity_row(loader_config, teacher, reader, batches: int, device) -> dict:
    """Spearman per (sample, head) of cropped stored heads against the teacher on the crops;
    and of the uncropped stored heads against the same."""
    loader = SalientLoader(loader_config)
    cropped, uncropped = [], []
    for batch in itertools.islice(loader.epoch(0), batches):
        keep = torch.as_tensor(batch["has_saliency"]).cpu().numpy()
        recomputed = saliency(teacher.model, teacher_input(batch["images"], teacher), kind="heads")
        stored = batch["head_maps"].float().cpu().numpy()[keep]
        recomputed = recomputed.float().cpu().numpy()[keep]
        whole = np.stack([reader.read_head_maps(i, i + 1)[0] for i in batch["ids"][keep].tolist()])
        b, h = stored.shape[:2]
        cropped.append(spearman(stored.reshape(b * h, -1), recomputed.reshape(b * h, -1)))
        if whole.shape[-1] == stored.shape[-1]:  # the store's grid is the model's
            uncropped.append(spearman(whole.reshape(b * h, -1), recomputed.reshape(b * h, -1)))
    rho = np.concatenate(cropped).reshape(-1, h)  # [samples, H]
    row = {
        "samples": len(rho),
        "mean": round(float(np.nanmean(rho)), 4),
        "per_head": [round(float(v), 4) for v in np.nanmean(rho, axis=0)],
        "constant_pairs": int(np.isnan(rho).sum()),
    }
    if uncropped:
        row["uncropped_mean"] = round(float(np.nanmean(np.concatenate(uncropped))), 4)
    return row


def _fidelity(setup: _Setup, inputs: dict, teacher, heads: int, device) -> dict:
    base = _run(setup, inputs, heads).loader_config(device=str(device))
    store = SaliencyStore.open(inputs["store"])
    reader = store.bind(store.current())
    whole = replace(base, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    return {
        "crops": _fidelity_row(base, teacher, reader, setup.batches, device),
        "whole": _fidelity_row(whole, teacher, reader, setup.batches, device),
    }


# ---------------------------------------------------------------- saving


def _synthetic(setup: _Setup, heads: int, device, count: int = 4) -> list[dict]:
    generator = torch.Generator(device).manual_seed(0)
    g, b = setup.image_size // setup.patch_size, setup.batch_size
    batches = []
    for _ in range(count):
        maps = torch.rand(b, heads, g * g, generator=generator, device=device).softmax(-1)
        batches.append(
            {
                "images": torch.randn(
                    b, 3, setup.image_size, setup.image_size, generator=generator, device=device
                ),
                "head_maps": maps.view(b, heads, g, g),
                "has_saliency": torch.ones(b, dtype=torch.bool),
                "ids": torch.arange(b),
                "generation": None,
            }
        )
    return batches


def _step_rate(setup: _Setup, run: TrainConfig, batches, device) -> float:
    """Images per second of AutoMAE's step (the family's forward and hooks) after warm-up."""
    family = FAMILIES["automae"]
    torch.manual_seed(0)
    model = family.build(**family.settings(run)).to(device)
    optimizer = build_optimizer(model, lr=1.5e-4)
    hooks = family.hooks(model, optimizer)  # online: loads the teacher onto the device
    return step_rate(
        model, optimizer, batches, lr=1.5e-4, warmup=setup.warmup_steps, steps=setup.steps,
        batch_size=setup.batch_size, device=device, family=family, hooks=hooks,
    )  # fmt: skip


def _loader_batches(run: TrainConfig, device):
    loader = SalientLoader(run.loader_config(device=str(device)))
    return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())


def _saving(setup: _Setup, inputs: dict, heads: int, device) -> dict:
    store = _run(setup, inputs, heads)
    online = _run(setup, inputs, heads, map_source="online", map_teacher=inputs["teacher"])
    synthetic = _synthetic(setup, heads, device)
    without_maps = [{k: v for k, v in b.items() if k != "head_maps"} for b in synthetic]
    arms = {
        ("synthetic", "store"): lambda: _step_rate(
            setup, store, itertools.cycle(synthetic), device
        ),
        ("synthetic", "online"): lambda: _step_rate(
            setup, online, itertools.cycle(without_maps), device
        ),
        ("loader", "store"): lambda: _step_rate(
            setup, store, _loader_batches(store, device), device
        ),
        ("loader", "online"): lambda: _step_rate(
            setup, online, _loader_batches(online, device), device
        ),
    }
    rates: dict = {arm: [] for arm in arms}
    for _ in range(setup.rounds):  # alternated, so a change of load hits both sources alike
        for arm, measure in arms.items():
            rates[arm].append(measure())
    result = {}
    for source in ("synthetic", "loader"):
        store_rate, online_rate = (np.mean(rates[(source, s)]) for s in ("store", "online"))
        result[source] = {
            "store_img_s": round(float(store_rate), 1),
            "online_img_s": round(float(online_rate), 1),
            "store_vs_online": round(float(store_rate / online_rate), 3),
        }
    return result


# ---------------------------------------------------------------- the bench


def bench_automae(quick: bool = False, device: str = "auto", teacher: str | None = None) -> dict:
    """Fidelity of stored per-head maps and the step-rate saving of storing them (module
    docstring), on a demo set written for the run; ``teacher``: a checkpoint or timm:NAME
    (random weights) instead of the label teacher trained here.

    Returns ``fidelity`` (``crops`` and ``whole``: ``mean``, ``per_head``, ``samples``,
    ``constant_pairs``, ``uncropped_mean``), ``saving`` (``synthetic`` and ``loader``:
    ``store_img_s``, ``online_img_s``, ``store_vs_online``), the teacher and the setup.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    setup = _setup(dev, quick)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="salient-bench-automae-") as tmp:
        inputs = _inputs(Path(tmp), setup, teacher, dev)
        loaded = load_teacher(
            inputs["teacher"], image_size=setup.image_size, allow_random=True, device=dev
        )
        heads = loaded.model.blocks[-1].attn.num_heads
        fidelity = _fidelity(setup, inputs, loaded, heads, dev)
        saving = _saving(setup, inputs, heads, dev)
    return {
        "model": setup.model,
        "image_size": setup.image_size,
        "patch_size": setup.patch_size,
        "batch_size": setup.batch_size,
        "scenes": setup.n,
        "heads": heads,
        "teacher": teacher or "label teacher trained here",
        "label_teacher": inputs["label_teacher"],
        "refresh_img_s": inputs["refresh_img_s"],
        "bf16": dev.type == "cuda",
        "threads": torch.get_num_threads(),
        "fidelity": fidelity,
        "saving": saving,
        "seconds": round(time.perf_counter() - start, 1),
    }
