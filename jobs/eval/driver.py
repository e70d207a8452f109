"""``salient eval``: did the pretraining help? Frozen-encoder features → k-NN and linear probes.

The driver checks everything before any work (both datasets open and carry the same class
list, the checkpoint loads as a ViT with a class token), then computes the features of every
image of the training set (``data``) and the held-out set (``val``) on Ray the way refresh
computes maps: one actor per worker holds the encoder, one shard per task
(``salient.jobs.runtime.shard_pool``, ``salient.jobs.eval.worker``), each shard written as one
chunk of a feature cache under ``OUT/features`` (``salient.jobs.eval.cache``), keyed by the
checkpoint's
sha256, the dataset (fingerprint and manifest) and the view — so a second run with other probe
settings computes nothing. Then, on the driver, for both the CLS token and the mean patch token:

- weighted k-NN on cosine similarity, DINO's (k = 20, T = 0.07), top-1 / top-5;
- MAE's linear probe (BatchNorm without affine parameters + one Linear) on the cached
  features, top-1 / top-5 (``salient.trainer.probes`` says how and why).

``baseline`` also probes the same architecture at its random initialisation (a salient
checkpoint: the very init of its run, rebuilt from its config and seed): random ViT features
carry colour and texture, so that is the figure to beat, not chance. The summary is printed
and written to ``OUT/eval.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from salient import urls
from salient.jobs.eval.cache import FeatureCache, cache_url
from salient.jobs.eval.config import EvalConfig, EvalError
from salient.jobs.eval.worker import FeatureSpec, FeatureWorker
from salient.jobs.runtime.placement import Ask
from salient.jobs.runtime.progress import progress_bar
from salient.jobs.runtime.ray_env import ensure_ray
from salient.jobs.runtime.shard_pool import ActorInputs, run_shards, started_pool
from salient.pipeline.manifest import open_dataset
from salient.trainer.checkpoint import load_checkpoint, save_checkpoint
from salient.trainer.family import FAMILIES
from salient.trainer.probes import knn_probe, linear_probe
from salient.trainer.specs import MODEL_FAMILIES, family_of
from salient.trainer.teacher_load import load_teacher

__all__ = [
    "check_class_lists",
    "init_checkpoint",
    "initial_checkpoint",
    "render_eval",
    "run_eval",
]

FEATURES = ("cls", "mean")


# ---------------------------------------------------------------- checks before any work


def check_class_lists(train, val) -> list[str]:
    """The class list both datasets share; EvalError when either has none or they differ."""
    classes = {name: ds.manifest.classes for name, ds in (("data", train), ("val", val))}
    for name, found in classes.items():
        if not found:
            raise EvalError(
                f"--{name} {(train if name == 'data' else val).root} has no class "
                "labels; probes need an ImageFolder tree or the demo set"
            )
    if classes["data"] != classes["val"]:
        a, b = classes["data"], classes["val"]
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise EvalError(
            f"--data and --val have different class lists ({len(a)} vs {len(b)} classes, first "
            f"difference at index {where}: {a[where] if where < len(a) else '–'!r} vs "
            f"{b[where] if where < len(b) else '–'!r}); ingest the held-out folder with "
            "--classes-from DATA"
        )
    return list(classes["data"])


def _checkpoint_image_size(checkpoint: str) -> int:
    """The training image size a salient checkpoint records; 224 for anything else."""
    import torch

    if checkpoint.startswith("timm:") or not Path(checkpoint).is_file():
        return 224
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["encoder_kwargs"]["img_size"])
    except Exception:  # not ours: load_teacher names the problem in one line
        return 224


def _load_encoder(config: EvalConfig, checkpoint: str, image_size: int, baseline: bool):
    """The encoder as a teacher (timm ViT, eval mode, on the driver's CPU); the baseline of a
    ``timm:NAME`` checkpoint is that model with random (seeded) weights."""

    teacher = load_teacher(
        checkpoint,
        weights=None if baseline else config.weights,
        allow_random=baseline or config.allow_random,
        image_size=image_size,
        device="cpu",
    )
    if getattr(teacher.model, "cls_token", None) is None:
        raise EvalError(
            f"{checkpoint} is a ViT without a class token; the probes read the CLS token"
        )
    return teacher


def initial_checkpoint(checkpoint: str, out: str | Path) -> str:
    """The random initialisation of a salient checkpoint's run, saved once under ``out``
    (:func:`init_checkpoint` of its config). ``timm:NAME`` specs give ``timm:NAME`` (random
    weights, seeded, by ``load_teacher``). Raises EvalError for a checkpoint that does not
    record a salient model.
    """
    if checkpoint.startswith("timm:"):
        return checkpoint
    config = load_checkpoint(checkpoint)["config"]
    if config.get("model") not in MODEL_FAMILIES:
        raise EvalError(
            f"--baseline needs a salient training checkpoint; {checkpoint} records model "
            f"{config.get('model')!r}"
        )
    return init_checkpoint(config, out)


def init_checkpoint(config: dict, out: str | Path) -> str:
    """The random initialisation of the run of ``config`` (a TrainConfig's ``as_dict``), saved
    once under ``out/baseline``: rebuilt as the trainer builds it (the run's family and model
    after seeding with the run's seed), so it is the very encoder the run starts from."""
    import torch

    run = SimpleNamespace(**config)  # the run's settings, as its family's builder reads them
    seed = config.get("seed", 0)
    family_name = family_of(run.model, config.get("family"))
    name = f"init-{config['model']}-{config['image_size']}px-p{config['patch_size']}-seed{seed}"
    if family_name != MODEL_FAMILIES[run.model]:
        name += f"-{family_name}"  # another family builds other modules from the same seed
    path = Path(out) / "baseline" / f"{name}.pt"  # what the init depends on, nothing else
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # as salient.jobs.train.worker builds it
            family = FAMILIES[family_name]
            model = family.build(**family.settings(run))
        save_checkpoint(path, model, None, None, 0, 0, None, config)
    return str(path)


# ---------------------------------------------------------------- features on Ray


def _cache_key(teacher, dataset, image_size: int, crop_ratio: float) -> dict:
    """What the features depend on. The fingerprint covers the shard layout only, so two
    datasets of equal layout (a train and a val split of one size, a relabelled copy) would
    share it: the manifest's hash (source, classes, shard sizes in bytes, demo seed and split)
    tells them apart without reading the shards."""
    return {
        "checkpoint_sha256": teacher.meta["sha256"],
        "checkpoint_name": teacher.meta["name"],
        "fingerprint": dataset.fingerprint,
        "manifest_sha256": hashlib.sha256(dataset.manifest.to_json().encode()).hexdigest(),
        "image_size": image_size,
        "crop_ratio": crop_ratio,
        "dim": int(teacher.model.embed_dim),
        "num_samples": dataset.num_samples,
        "num_ids": dataset.num_ids,  # the cache's rows: one past the last id
        "shard_size": dataset.shard_size,
    }


def _tasks(caches: dict, datasets: dict) -> list[tuple[tuple[str, int], tuple]]:
    tasks = []
    for split, cache in caches.items():
        dataset = datasets[split]
        for index in cache.missing_shards():
            args = (split, index, dataset.source(dataset.shards[index]))
            tasks.append(((split, index), args))
    return tasks


def _give_up(key: tuple[str, int], attempts: int, exc: Exception) -> EvalError:
    split, shard = key
    return EvalError(
        f"{split} shard {shard} failed {attempts} times, last because its worker died "
        f"({type(exc).__name__}: {str(exc).splitlines()[0]}); fix the cause and rerun the "
        "same command: finished shards are kept"
    )


def _compute_features(config: EvalConfig, teacher, spec, caches: dict, datasets: dict) -> dict:
    """Fill every missing shard of the caches on Ray; returns shards computed per split."""

    tasks = _tasks(caches, datasets)
    computed = dict.fromkeys(caches, 0)
    if not tasks:
        return computed
    ensure_ray(config.address)  # before Ray is imported: it reads its auth mode then
    import ray

    flags = "--workers, --cpus-per-worker or --gpus-per-worker"
    count = min(config.workers, len(tasks))
    ask = Ask.of("feature actor", count, config.cpus_per_worker, config.gpus_per_worker, flags)
    caches_at = {split: cache.url for split, cache in caches.items()}
    args = (ray.put(teacher.model), spec, caches_at, urls.carry())
    with (
        started_pool(FeatureWorker, args, ask, config.placement_timeout_s) as pool,
        progress_bar(len(tasks), "feature shards") as advance,
    ):

        def done(result: dict) -> None:
            computed[result["split"]] += 1
            advance(1)

        run_shards(pool, tasks, config.max_retries, done, _give_up)
    return computed


def _features(
    config: EvalConfig, checkpoint: str, datasets: dict, image_size: int, baseline: bool
) -> dict:
    """Features, labels and validity of both splits for one encoder, from the cache (filled
    first where shards are missing); plus the counts of shards computed and reused."""

    teacher = _load_encoder(config, checkpoint, image_size, baseline)
    caches = {}
    for split, dataset in datasets.items():
        key = _cache_key(teacher, dataset, image_size, config.crop_ratio)
        caches[split] = FeatureCache.open_or_create(cache_url(config.out, key), key)
    spec = FeatureSpec(
        crop_ratio=config.crop_ratio,
        inputs=ActorInputs.of(
            teacher, image_size, config.batch_size, config.gpus_per_worker, config.cpus_per_worker
        ),
    )
    computed = _compute_features(config, teacher, spec, caches, datasets)
    for cache in caches.values():
        cache.mark_complete()
    return {
        "arrays": {
            split: _rows_of_samples(cache.read(), datasets[split])
            for split, cache in caches.items()
        },
        "computed": computed,
        "reused": {s: len(datasets[s].shards) - computed[s] for s in datasets},
        "sha256": teacher.meta["sha256"],
        "caches": {split: cache.url for split, cache in caches.items()},
    }


def _rows_of_samples(arrays: dict, dataset) -> dict:
    """The cache's rows of the ids a sample holds (an adopted dataset leaves the ids after a
    short shard unused: they are no images a probe could exclude)."""
    ids = dataset.sample_ids()
    return {name: rows[ids] for name, rows in arrays.items()}


# ---------------------------------------------------------------- the probes


def _usable(arrays: dict) -> dict:
    """Rows with a decoded image and a label, as tensors: features per kind, labels."""
    import numpy as np
    import torch

    keep = (arrays["valid"] == 1) & (arrays["labels"] >= 0)
    return {
        "labels": torch.from_numpy(arrays["labels"][keep]),
        "excluded": int((~keep).sum()),
        **{kind: torch.from_numpy(np.ascontiguousarray(arrays[kind][keep])) for kind in FEATURES},
    }


def _probe_device(config: EvalConfig) -> str:
    import torch

    if config.probe_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.probe_device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--probe-device cuda but this driver sees no GPU; use auto or cpu")
    return config.probe_device


def _run_probes(config: EvalConfig, arrays: dict, num_classes: int) -> dict:
    """Top-1 / top-5 of each probe asked for, on each feature kind."""
    import numpy as np

    train, val = _usable(arrays["train"]), _usable(arrays["val"])
    if len(train["labels"]) < 2 or len(val["labels"]) < 1:
        raise EvalError(
            f"too few usable images to probe ({len(train['labels'])} train, "
            f"{len(val['labels'])} val with an image and a label)"
        )
    device = _probe_device(config)
    result: dict = {}
    for kind in FEATURES:
        if "knn" in config.probes:
            result.setdefault("knn", {})[kind] = knn_probe(
                train[kind].to(device),
                train["labels"].to(device),
                val[kind].to(device),
                val["labels"].to(device),
                num_classes,
                config.k,
                config.temperature,
            )
        if "linear" in config.probes:
            result.setdefault("linear", {})[kind] = linear_probe(
                train[kind],
                train["labels"],
                val[kind],
                val["labels"],
                num_classes,
                epochs=config.linear_epochs,
                lr=config.linear_lr,
                batch_size=config.linear_batch,
                seed=config.seed,
                device=device,
            )
    result["excluded"] = {"train": train["excluded"], "val": val["excluded"]}
    counts = np.bincount(val["labels"].numpy(), minlength=num_classes)
    result["chance"] = {"uniform": 1 / num_classes, "majority": float(counts.max() / counts.sum())}
    return result


def _evaluate(
    config: EvalConfig, checkpoint: str, datasets: dict, classes, size: int, baseline=False
) -> dict:
    features = _features(config, checkpoint, datasets, size, baseline)
    probes = _run_probes(config, features["arrays"], len(classes))
    return {
        "checkpoint": checkpoint,
        "sha256": features["sha256"],
        **probes,
        "shards_computed": features["computed"],
        "shards_reused": features["reused"],
        "caches": features["caches"],
    }


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def run_eval(config: EvalConfig) -> dict:
    """Probe the frozen encoder of ``config.checkpoint``; returns the JSON summary (also
    written to ``OUT/eval.json``).

    Summary: ``knn`` / ``linear`` → ``{"cls": {"top1", "top5"}, "mean": {...}}``; ``chance``
    (uniform 1/C and the majority class's share of the held-out set); ``shards_computed`` /
    ``shards_reused`` per split (features taken from the cache); ``excluded`` rows (no image or
    no label); ``baseline`` (the same for the random init) when asked; the view and settings.

    Raises:
        DatasetError, TeacherError, CheckpointError, EvalError: before any work when the
            inputs do not fit together; EvalError when a shard keeps failing.
    """

    start = time.perf_counter()
    datasets = {"train": open_dataset(config.data), "val": open_dataset(config.val)}
    if datasets["train"].manifest == datasets["val"].manifest:
        raise EvalError(
            f"--val {config.val} is the training set itself; probe on a held-out split "
            "(salient ingest --demo --split val, or a folder with --classes-from)"
        )
    classes = check_class_lists(datasets["train"], datasets["val"])
    size = config.image_size or _checkpoint_image_size(config.checkpoint)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    result = _evaluate(config, config.checkpoint, datasets, classes, size)
    baseline = None
    if config.baseline:
        init = initial_checkpoint(config.checkpoint, out)
        baseline = _evaluate(config, init, datasets, classes, size, baseline=True)
        baseline.pop("chance")
    summary = {
        **result,
        "data": str(datasets["train"].root),
        "val": str(datasets["val"].root),
        "images": {split: ds.num_samples for split, ds in datasets.items()},
        "classes": len(classes),
        "view": {
            "image_size": size,
            "crop_ratio": config.crop_ratio,
            "resize_shorter_to": int(size / config.crop_ratio),
            "interpolation": "bicubic",
        },
        "settings": {
            k: v for k, v in asdict(config).items() if k not in ("checkpoint", "data", "val")
        },
        "baseline": baseline,
        "seconds": round(time.perf_counter() - start, 2),
    }
    _write_json(out / "eval.json", summary)
    return summary


def _cell(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_eval(summary: dict) -> str:
    """What ``salient eval`` prints for people: a table of each probe's top-1 / top-5 on each
    feature (beside the baseline's with ``--baseline``), chance, and where ``eval.json`` is;
    ``--json`` prints the summary instead."""
    baseline = summary.get("baseline") or {}
    head = ["probe", "feature", "top-1", "top-5"]
    if baseline:
        head += ["init top-1", "init top-5"]
    rows = [head]
    for probe, name in (("knn", "k-NN"), ("linear", "linear")):
        for kind, scores in (summary.get(probe) or {}).items():
            row = [name, kind, _cell(scores["top1"]), _cell(scores["top5"])]
            if baseline:
                init = (baseline.get(probe) or {}).get(kind) or {}
                row += [_cell(init.get("top1")), _cell(init.get("top5"))]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    images, chance = summary["images"], summary["chance"]
    computed, reused = summary["shards_computed"], summary["shards_reused"]
    out = Path(summary["settings"]["out"]) / "eval.json"
    return "\n".join(
        [
            f"{Path(summary['checkpoint']).name} on {images['train']} train / {images['val']} "
            f"val images, {summary['classes']} classes, {summary['view']['image_size']} px view",
            *table,
            f"chance: uniform {chance['uniform']:.3f}, majority class {chance['majority']:.3f}",
            f"features: {sum(computed.values())} shards computed, {sum(reused.values())} "
            f"from the cache · {summary['seconds']} s",
            f"all figures: {out} (--json prints them)",
        ]
    )
