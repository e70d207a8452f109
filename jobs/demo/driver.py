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

It ends with a short summary for people (what ran, the headline numbers, where the report is)
and writes every figure to ``OUT/summary.json``; ``--json`` prints that instead.

``data`` and ``store`` put the dataset and the store elsewhere, e.g. on ``s3://`` (the run
directory and the report stay in OUT, a local folder); ``--fresh`` removes OUT only.

Sizes are chosen to run in 3-8 minutes on 2 CPU cores (BENCHMARKS.md, "The two commands on
a fresh clone"): 64 px crops, 8 px patches (an 8×8 grid), ViT-Tiny encoder; one MAE-Tiny step
on 2 cores trains ~20 img/s at 96 px, where the decoder over 145 tokens dominates, so larger
crops would not fit a 10-minute budget.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

from salient.jobs.demo.config import DemoConfig
from salient.jobs.eval.config import EvalConfig
from salient.jobs.eval.driver import run_eval
from salient.jobs.inspect.config import InspectConfig
from salient.jobs.inspect.driver import run_inspect
from salient.jobs.runtime.interrupt import Interrupted
from salient.jobs.runtime.progress import progress_bar
from salient.jobs.train.driver import TrainConfig, run_train
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.manifest import DatasetError, open_dataset
from salient.pipeline.shards import iter_samples
from salient.store import SaliencyStore
from salient.trainer.checkpoint import latest_checkpoint, load_checkpoint

__all__ = ["human_summary", "run_demo", "summarize_dataset"]


def summarize_dataset(data: str | Path) -> dict:
    """Classes and object-box statistics of a demo dataset, read back from its shards."""

    dataset = open_dataset(data)
    labels: Counter[int] = Counter()
    area_share = []
    size = (dataset.manifest.demo or {}).get("image_size")
    for url in dataset.shard_urls():
        for sample in iter_samples(url, None, {"cls", "box.json"}):
            if "cls" in sample:
                labels[int(sample["cls"])] += 1
            if "box.json" in sample and size:
                box = json.loads(sample["box.json"])
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


def _locations(config: DemoConfig, out: Path) -> tuple[str, str, str]:
    """The dataset, held-out split and store URLs: ``--data`` (its split beside it, as
    ``DATA-val``) / ``--store``, else inside OUT."""
    if config.data:
        data, val = config.data, config.data.rstrip("/") + "-val"
    else:
        data, val = str(out / "data"), str(out / "val")
    return data, val, config.store or str(out / "saliency.zarr")


def _stage_ingest(config: DemoConfig, data: str, split: str = "train") -> dict:
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
    run_dir = out / "run"
    latest = latest_checkpoint(run_dir)
    done = latest is not None and load_checkpoint(latest)["epoch"] >= config.epochs
    data, _, store = _locations(config, out)
    train = TrainConfig(
        data=data,
        store=store,
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
    train, done = _train_config(config, out)
    if done:
        return {"train": "reused", "run_dir": train.run_dir}
    summary = run_train(train)
    return {"train": summary}


def _stage_inspect(config: DemoConfig, out: Path) -> dict:
    data, _, store = _locations(config, out)
    published = [
        g["name"] for g in SaliencyStore.open(store).generations() if g["status"] == "published"
    ]
    compare = published[0] if len(published) > 1 else None
    report = run_inspect(
        InspectConfig(
            store=store,
            data=data,
            out=str(out / "report"),
            n=config.report_images,
            compare=compare,
            seed=config.seed,
            run_dir=str(out / "run"),
        )
    )
    return {"inspect": report}


def _training_line(train) -> str:
    if not isinstance(train, dict):
        return "reused the finished run"
    refreshes = train.get("refreshes") or []
    return (
        f"{train['model']}, {train['epochs_done']} epochs on {train['workers']} workers "
        f"({train['steps']} steps): loss {train['loss']:.4f}, {train['img_per_s']:.1f} img/s; "
        f"{len(refreshes)} refreshes published ({', '.join(refreshes) or 'none'})"
    )


def _saliency_line(inspect: dict) -> str:
    stats = inspect["stats"][inspect["generation"]]
    line = f"{inspect['generation']}: {stats['valid_share']:.0%} of maps valid"
    box = stats.get("box")
    if box:
        line += (
            f"; {box['mass_mean']:.0%} of the saliency mass falls inside the object box, which "
            f"covers {box['area_mean']:.0%} of the image (lift {box['lift_mean']:.2f}×)"
        )
    return line


def _knn_line(evaluation: dict) -> str:
    return (
        f"top-1 {evaluation['knn_top1']:.3f} on {evaluation['images']['val']} held-out scenes "
        f"(the same encoder at its random init {evaluation['baseline_knn_top1']:.3f}, chance "
        f"{evaluation['chance']:.3f})"
    )


def human_summary(result: dict, summary_file: Path) -> str:
    """A few lines for people: what ran, the headline numbers, where the report is."""
    dataset = result["dataset"]
    rows = [
        ("data", f"{dataset['images']} scenes in {dataset['shards']} shards ({result['ingest']})"),
        ("training", _training_line(result["train"])),
        ("saliency", _saliency_line(result["inspect"])),
        ("k-NN", _knn_line(result["eval"])),
        ("report", result["inspect"]["index"]),
        ("figures", f"{summary_file} (salient demo --json prints them)"),
    ]
    head = f"salient demo: the whole loop ran in {result['seconds']:.0f} s, in {result['out']}"
    return "\n".join([head, *(f"  {name:<9} {text}" for name, text in rows)])


def _stage_eval(config: DemoConfig, out: Path) -> dict:
    """k-NN of the final checkpoint and of its run's random init on the held-out split."""

    data, val, _ = _locations(config, out)
    result = run_eval(
        EvalConfig(
            checkpoint=str(latest_checkpoint(out / "run")),
            data=data,
            val=val,
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


def run_demo(config: DemoConfig) -> dict | str:
    """Run every stage of the demo flow; returns :func:`human_summary`, or with ``json`` the
    JSON-able summary (always written to ``OUT/summary.json``)."""
    out = Path(config.out).resolve()
    if config.fresh and out.exists():
        shutil.rmtree(out)
    try:
        return _demo(config, out)
    except KeyboardInterrupt as stop:  # the same command resumes, without --fresh (exit 130)
        inner = getattr(stop, "kept", None)  # a stage's own (the training's checkpoint)
        raise Interrupted(
            f"every finished stage under {out}" + (f", and {inner}" if inner else ""),
            drop=("--fresh",),
        ) from None


def _demo(config: DemoConfig, out: Path) -> dict | str:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict = {"out": str(out)}
    data, val, _ = _locations(config, out)
    result.update(_stage_ingest(config, data))
    result.update(_stage_ingest(config, val, split="val"))
    result["dataset"] = summarize_dataset(data)
    result.update(_stage_train(config, out))
    result.update(_stage_inspect(config, out))
    result.update(_stage_eval(config, out))
    result["seconds"] = round(time.perf_counter() - start, 1)
    summary_file = out / "summary.json"
    summary_file.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result if config.json else human_summary(result, summary_file)
