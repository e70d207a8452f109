"""What ``salient compare`` measures of one run: probes, maps and masks.

- **Probes** (``salient eval``, its feature cache shared by every run of the comparison under
  ``OUT/eval``): weighted k-NN (DINO's) on the CLS and the mean patch token of the checkpoints
  of the probed epochs (the curve), and at the end k-NN and MAE's linear probe on the final
  checkpoint and on the run's random initialisation.
- **Maps**: the box lift and hit share (``salient inspect``'s statistics) of every generation
  the run trained on, and of the CLS attention of its final encoder on the held-out split
  (datasets with object boxes: the demo set). A run that plans its masks online (iBOT's EMA
  teacher) has no generation: its teacher's maps at each probed checkpoint stand for them.
- **Masks through the loader**: the run's own loader (its strategy, ratios, options and crops,
  bound to the store's current generation: the last one the run trained on) over up to
  ``samples`` training images; each patch's share of area inside the object box, cropped and
  flipped with the image (``inspect.stats.box_coverage`` on the crop's coordinates), averaged
  over the masked patches, the thrown ones and all of them. ``lift`` = masked ÷ all: 1 for
  random masks, above 1 when the masks land on the objects.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from salient.jobs.eval.config import EvalConfig
from salient.jobs.eval.driver import init_checkpoint, run_eval
from salient.jobs.inspect.data import demo_hw, shard_boxes
from salient.jobs.inspect.driver import generation_stats
from salient.jobs.inspect.stats import box_coverage
from salient.jobs.refresh.driver import RefreshConfig, run_refresh
from salient.jobs.train.config import TrainConfig
from salient.pipeline.loader import SalientLoader
from salient.pipeline.manifest import open_dataset

__all__ = [
    "PROBES",
    "box_figures",
    "crop_coverage",
    "init_probes",
    "maps_of_checkpoint",
    "mask_box_shares",
    "probe",
]

PROBES = ("knn_cls", "knn_mean", "linear_cls", "linear_mean")  # top-1 on the held-out split


def probe(config: TrainConfig, val: str, out: Path, checkpoint: str, linear: bool) -> dict:
    """Held-out top-1 of ``checkpoint``'s encoder: ``{"knn_cls", "knn_mean"}`` and with
    ``linear`` also ``{"linear_cls", "linear_mean"}`` (``salient eval``'s probes)."""
    result = run_eval(
        EvalConfig(
            checkpoint=checkpoint,
            data=config.data,
            val=val,
            out=str(out),
            knn=not linear,  # both probes when linear, else the k-NN alone
            image_size=config.image_size,
            batch_size=128,
            workers=config.workers,
            gpus_per_worker=1.0 if config.gpu else 0.0,
            address=config.address,
        )
    )
    return {
        f"{name}_{kind}": round(result[name][kind]["top1"], 4)
        for name in ("knn", "linear")
        if name in result
        for kind in ("cls", "mean")
    }


def init_probes(config: TrainConfig, val: str, out: Path) -> dict:
    """Every probe of the run's random initialisation (the encoder it starts from)."""
    return probe(config, val, out, init_checkpoint(config.as_dict(), out), linear=True)


def box_figures(stats: dict) -> dict:
    """``{"lift", "hit_share"}`` of one generation's statistics (None without boxes)."""
    box = stats.get("box") or {}
    return {
        "lift": _rounded(box.get("lift_mean")),
        "hit_share": _rounded(box.get("hit_share")),
    }


def _rounded(value, digits: int = 4):
    return None if value is None else round(value, digits)


def maps_of_checkpoint(config: TrainConfig, val: str, store: str, checkpoint: str) -> dict:
    """Box lift and hit share of the CLS-attention maps of ``checkpoint``'s encoder over the
    held-out split (one refresh into ``store``)."""
    run_refresh(
        RefreshConfig(
            data=val,
            store=store,
            teacher=checkpoint,
            image_size=config.image_size,
            batch_size=128,
            workers=config.workers,
            gpus_per_worker=1.0 if config.gpu else 0.0,
            address=config.address,
        ),
        progress=False,
    )
    return box_figures(next(iter(generation_stats(store, val).values())))


def generation_figures(store: str, data: str) -> dict:
    """``{generation: {"lift", "hit_share"}}`` of every published generation of ``store``."""
    return {name: box_figures(s) for name, s in generation_stats(store, data).items()}


def crop_coverage(boxes: np.ndarray, crops: np.ndarray, grid: int) -> np.ndarray:
    """Each output patch's share of area inside the object box: ``boxes [B, 4]`` (x0, y0, x1,
    y1 image px), ``crops [B, 5]`` (top, left, height, width, flip: the loader's
    ``crop_boxes``) -> ``[B, grid²]`` in patch order (row-major, as ``mask_idx`` counts)."""
    boxes, crops = np.asarray(boxes, dtype=np.float64), np.asarray(crops, dtype=np.float64)
    top, left, height, width, flip = crops.T
    relative = np.stack(  # the box in the crop's unit square
        [
            (boxes[:, 0] - left) / width,
            (boxes[:, 1] - top) / height,
            (boxes[:, 2] - left) / width,
            (boxes[:, 3] - top) / height,
        ],
        axis=1,
    )
    cover = box_coverage(relative, (1.0, 1.0), grid)  # [B, g, g]; coverage clips to the square
    cover = np.where(flip.astype(bool)[:, None, None], cover[:, :, ::-1], cover)  # mirrored crop
    return cover.reshape(len(boxes), grid * grid)


def _gathered_sum(cover: np.ndarray, idx: torch.Tensor) -> tuple[float, int]:
    """Summed coverage of the patches ``idx [B, K]`` and their count."""
    if idx.numel() == 0:
        return 0.0, 0
    return float(np.take_along_axis(cover, idx.cpu().numpy(), axis=1).sum()), idx.numel()


def mask_box_shares(config: TrainConfig, samples: int) -> dict | None:
    """The share of masked (and thrown) patch area inside the object box through the run's
    loader (module docstring); None for a dataset without boxes or masks planned in the step
    (iBOT's online masks, AutoMAE's generator: the loader's plan is not what they mask)."""
    if config.framework == "automae":
        return None
    dataset = open_dataset(config.data)
    if demo_hw(dataset) is None:
        return None
    boxes = np.concatenate([shard_boxes(dataset, shard) for shard in dataset.shards])
    loader_config = replace(config.loader_config(0, 1, "cpu"), num_workers=0)
    loader = SalientLoader(loader_config)
    grid = config.image_size // config.patch_size
    sums = {"masked": [0.0, 0], "thrown": [0.0, 0], "all": [0.0, 0]}
    seen, generation = 0, None
    for batch in loader.epoch(0):
        if "mask_idx" not in batch:
            return None
        cover = crop_coverage(boxes[batch["ids"].numpy()], batch["crop_boxes"].numpy(), grid)
        for name, key in (("masked", "mask_idx"), ("thrown", "throw_idx")):
            total, count = _gathered_sum(cover, batch[key])
            sums[name][0] += total
            sums[name][1] += count
        sums["all"][0] += float(cover.sum())
        sums["all"][1] += cover.size
        seen, generation = seen + len(cover), batch["generation"]
        if seen >= samples:
            break
    share = {name: (s / n if n else None) for name, (s, n) in sums.items()}
    return {
        "samples": seen,
        "generation": generation,
        "masked_in_box": _rounded(share["masked"]),
        "thrown_in_box": _rounded(share["thrown"]),
        "box_area": _rounded(share["all"]),
        "lift": _rounded(share["masked"] / share["all"]) if share["masked"] else None,
    }


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]
