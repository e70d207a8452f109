"""``salient demo``: the whole AMT loop on the bundled demo data, on an embedded local Ray.

Stages, in order; each one is skipped or resumed when its output already exists, so a second
``make demo`` continues instead of redoing work (``--fresh`` starts over):

1. **ingest** the demo set into ``OUT/data`` (webdataset shards + manifest);
2. **train** an MAE on Ray Train (2 CPU workers, gloo): warmup epochs with random masking
   at 75 %, then a refresh from the latest checkpoint writes a generation of CLS-attention
   maps into ``OUT/saliency.zarr``, and the following epochs mask with AMT (45 % masked,
   40 % thrown), refreshing again every ``refresh_every`` epochs — the model being trained is
   its own teacher (AMT);
3. **inspect** the store: stats of the newest generation, a diff against the first one, and
   an HTML report in ``OUT/report/index.html``, with the loss curve of the run;
4. **eval**: the k-NN probe (``salient eval``) of the final checkpoint on a held-out demo
   split (``OUT/val``: the same classes, scenes the training split never holds), beside the
   same encoder at its random initialisation — the baseline to beat, since random ViT
   features already carry colour and texture.

Sizes are chosen to run in about five minutes on 2 CPU cores: 64 px crops, 8 px patches (an
8×8 grid), ViT-Tiny encoder; one MAE-Tiny step on 2 cores trains ~20 img/s at 96 px, where
the decoder over 145 tokens dominates, so larger crops would not fit the 10-minute budget.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from salient.errors import SalientError

__all__ = ["DemoConfig", "run_demo", "summarize_dataset"]


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_run"
    n: int = 2000
    seed: int = 0
    image_size: int = 192  # stored scenes; the trainer crops them to train_size
    shard_size: int = 500
    model: str = "mae-tiny"
    train_size: int = 64
    patch_size: int = 8
    epochs: int = 5
    warmup_epochs: int = 2
    refresh_every: int = 1
    workers: int = 2
    batch_size: int = 64
    report_images: int = 12
    val_n: int = 500
    fresh: bool = False

    def __post_init__(self):
        if self.n < 16 or self.val_n < 16:
            raise SalientError(
                f"the demo needs at least 16 scenes in each split (got --n {self.n}, "
                f"val_n {self.val_n})"
            )
        if self.epochs <= self.warmup_epochs:
            raise SalientError(
                f"the demo needs --epochs > --warmup-epochs ({self.epochs} <= "
                f"{self.warmup_epochs}) so that AMT epochs follow the warmup"
            )


def summarize_dataset(data: str | Path) -> dict:
    """Classes and object-box statistics of a demo dataset, read back from its shards."""
    from salient.pipeline.manifest import open_dataset

    dataset = open_dataset(data)
    labels: Counter[int] = Counter()
    area_share = []
    size = (dataset.manifest.demo or {}).get("image_size")
    for url in dataset.shard_urls():
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    labels[int(tar.extractfile(member).read())] += 1
                elif member.name.endswith(".box.json") and size:
                    box = json.loads(tar.extractfile(member).read())
                    area_share.append((box["x1"] - box["x0"]) * (box["y1"] - box["y0"]) / size**2)
    classes = dataset.manifest.classes or []
    return {
        "images": dataset.num_samples,
        "shards": len(dataset.shards),
        "per_class": {
            classes[k] if k < len(classes) else str(k): v for k, v in sorted(labels.items())
        },
        "mean_box_area_share": round(sum(area_share) / len(area_share), 4) if area_share else None,
    }


def _stage_ingest(config: DemoConfig, data: Path, split: str = "train") -> dict:
    from salient.jobs.progress import progress_bar
    from salient.pipeline.ingest import ingest_demo
    from salient.pipeline.manifest import DatasetError, open_dataset

    n = config.n if split == "train" else config.val_n
    stage = "ingest" if split == "train" else "ingest_val"
    try:
        dataset = open_dataset(data)
        demo = dataset.manifest.demo or {}
        if (dataset.num_samples, demo.get("seed"), demo.get("split", "train")) == (
            n,
            config.seed,
            split,
        ):
            return {stage: "reused"}
    except DatasetError:
        pass
    start = time.perf_counter()
    with progress_bar(n, f"demo {split} scenes") as bar:
        ingest_demo(
            data,
            n=n,
            seed=config.seed,
            shard_size=config.shard_size,
            image_size=config.image_size,
            overwrite=True,
            progress=bar,
            split=split,
        )
    return {stage: "written", f"{stage}_seconds": round(time.perf_counter() - start, 2)}


def _train_config(config: DemoConfig, out: Path):
    from salient.jobs.train import TrainConfig
    from salient.trainer.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = out / "run"
    latest = latest_checkpoint(run_dir)
    done = latest is not None and load_checkpoint(latest)["epoch"] >= config.epochs
    train = TrainConfig(
        data=str(out / "data"),
        store=str(out / "saliency.zarr"),
        model=config.model,
        strategy="amt",
        mask_ratio=0.45,
        throw_ratio=0.40,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        refresh_every=config.refresh_every,
        refresh_wait=True,
        workers=config.workers,
        run_dir=str(run_dir),
        resume=latest is not None,
        batch_size=config.batch_size,
        image_size=config.train_size,
        patch_size=config.patch_size,
        seed=config.seed,
        loader_workers=1,
        refresh_batch_size=128,
    )
    return train, done


def _stage_train(config: DemoConfig, out: Path) -> dict:
    from salient.jobs.train import run_train

    train, done = _train_config(config, out)
    if done:
        return {"train": "reused", "run_dir": train.run_dir}
    summary = run_train(train)
    return {"train": summary}


def _stage_inspect(config: DemoConfig, out: Path) -> dict:
    from salient.jobs.inspect import InspectConfig, run_inspect
    from salient.store import SaliencyStore

    store = out / "saliency.zarr"
    published = [
        g["name"]
        for g in SaliencyStore.open(str(store)).generations()
        if g["status"] == "published"
    ]
    compare = published[0] if len(published) > 1 else None
    report = run_inspect(
        InspectConfig(
            store=str(store),
            data=str(out / "data"),
            out=str(out / "report"),
            n=config.report_images,
            compare=compare,
            seed=config.seed,
            run_dir=str(out / "run"),
        )
    )
    return {"inspect": report}


def _stage_eval(config: DemoConfig, out: Path) -> dict:
    """k-NN of the final checkpoint and of its run's random init on the held-out split."""
    from salient.jobs.eval import EvalConfig, run_eval
    from salient.trainer.checkpoint import latest_checkpoint

    result = run_eval(
        EvalConfig(
            checkpoint=str(latest_checkpoint(out / "run")),
            data=str(out / "data"),
            val=str(out / "val"),
            out=str(out / "eval"),
            knn=True,
            baseline=True,
            image_size=config.train_size,
            batch_size=128,
            workers=config.workers,
        )
    )
    return {
        "eval": {
            "knn_top1": result["knn"]["cls"]["top1"],
            "baseline_knn_top1": result["baseline"]["knn"]["cls"]["top1"],
            "chance": result["chance"]["uniform"],
            "knn": result["knn"],
            "baseline_knn": result["baseline"]["knn"],
            "images": result["images"],
            "seconds": result["seconds"],
            "report": str(out / "eval" / "eval.json"),
        }
    }


def run_demo(config: DemoConfig) -> dict:
    """Run every stage of the demo flow; returns a JSON-able summary."""
    out = Path(config.out).resolve()
    if config.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict = {"out": str(out)}
    result.update(_stage_ingest(config, out / "data"))
    result.update(_stage_ingest(config, out / "val", split="val"))
    result["dataset"] = summarize_dataset(out / "data")
    result.update(_stage_train(config, out))
    result.update(_stage_inspect(config, out))
    result.update(_stage_eval(config, out))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
