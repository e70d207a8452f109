"""``salient eval`` on a real local Ray: probes far above chance on classes a random encoder
sees (colour), chance on shuffled labels, cached features reused, features deterministic, and
the refusals before any work.

Three runs share the module; a feature pass on Ray costs ~10–40 s here, mostly actors
importing torch on the shared cores.

Data: ImageFolder trees of noisy single-colour PNGs (4 colour classes; 64 training images in
4 shards, 32 held-out in 2), ingested by our own ingest; the held-out tree keeps the training
set's class indices (``classes_from``). The encoder is the micro MAE's (32 px, patch 8) saved
as a salient checkpoint. Caches are read back through plain zarr.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from PIL import Image

from salient.jobs.eval.config import EvalConfig, EvalError
from salient.jobs.eval.driver import initial_checkpoint, run_eval
from salient.pipeline.ingest import ingest_folder
from salient.pipeline.manifest import open_dataset
from salient.trainer.checkpoint import save_checkpoint
from salient.trainer.models import build_model
from salient.trainer.teacher import TeacherError

COLOURS = {
    "blue": (40, 60, 200),
    "green": (40, 180, 60),
    "red": (200, 40, 40),
    "yellow": (210, 200, 40),
}
PER_CLASS = {"train": 16, "val": 8}
SHARD = 16


def _png(colour, seed) -> bytes:
    rng = np.random.default_rng(seed)
    side = int(rng.integers(36, 56))
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (side, side, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(root: Path, split: str, shuffled: bool = False) -> Path:
    """Class folders of noisy colour images. ``shuffled``: image k of colour c goes to class
    ``(c + k) % C`` instead, so every colour carries every label equally often and the labels
    say nothing about the images."""
    names = sorted(COLOURS)
    for c, name in enumerate(names):
        for k in range(PER_CLASS[split]):
            folder = root / (names[(c + k) % len(names)] if shuffled else name)
            folder.mkdir(parents=True, exist_ok=True)
            seed = [c, k, list(PER_CLASS).index(split)]
            (folder / f"{name}-{k}.png").write_bytes(_png(COLOURS[name], seed))
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("colour")
    train = ingest_folder(_tree(root / "src-train", "train"), root / "train", shard_size=SHARD)
    ingest_folder(_tree(root / "src-shuffled", "train", True), root / "shuffled", shard_size=SHARD)
    ingest_folder(
        _tree(root / "src-val", "val"), root / "val", shard_size=SHARD, classes_from=root / "train"
    )
    assert train.classes == sorted(COLOURS)
    return {name: root / name for name in ("train", "shuffled", "val")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The micro MAE as a run with seed 3 builds it, its weights then moved (a 'trained' one)."""
    torch.manual_seed(3)
    model = build_model("mae-micro", 32, 8)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-00001.pt"
    config = {"model": "mae-micro", "image_size": 32, "patch_size": 8, "seed": 3}
    return save_checkpoint(path, model, None, None, 1, 10, None, config)


def config_for(checkpoint, data, val, out, **overrides) -> EvalConfig:
    fields = dict(
        checkpoint=str(checkpoint),
        data=str(data),
        val=str(val),
        out=str(out),
        workers=2,
        cpus_per_worker=0.5,
        batch_size=16,
        k=10,
        linear_epochs=30,
        linear_batch=16,
    )
    return EvalConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def runs(ray_session, colour_data, checkpoint, tmp_path_factory) -> dict:
    """first: both probes, 2 workers; again: k-NN only, same out; shuffled: the same images
    under labels that say nothing about them, same out, 1 worker, batches of 7 instead of 16."""
    out = tmp_path_factory.mktemp("out")
    config = config_for(checkpoint, colour_data["train"], colour_data["val"], out)
    shuffled = replace(config, data=str(colour_data["shuffled"]), workers=1, batch_size=7)
    return {
        "out": out,
        "first": run_eval(config),
        "again": run_eval(replace(config, knn=True, k=5)),
        "shuffled": run_eval(shuffled),
    }


def test_probes_see_what_a_random_encoder_sees(runs):
    first = runs["first"]
    assert first["classes"] == 4 and first["chance"]["uniform"] == 0.25
    assert first["images"] == {"train": 64, "val": 32}
    assert first["excluded"] == {"train": 0, "val": 0}
    for probe in ("knn", "linear"):
        for kind in ("cls", "mean"):
            assert first[probe][kind]["top1"] >= 0.9, (probe, kind, first[probe][kind])
            assert first[probe][kind]["top5"] == 1.0  # 4 classes: top-5 holds them all
    assert first["view"] == {
        "image_size": 32,  # the checkpoint's own training size
        "crop_ratio": 0.875,
        "resize_shorter_to": 36,
        "interpolation": "bicubic",
    }


def test_shuffled_training_labels_give_chance(runs):
    shuffled = runs["shuffled"]
    for probe in ("knn", "linear"):
        for kind in ("cls", "mean"):
            assert shuffled[probe][kind]["top1"] <= 0.45, (probe, kind, shuffled[probe][kind])
    written = json.loads((runs["out"] / "eval.json").read_text())  # the last run into out
    assert written == json.loads(json.dumps(shuffled))


def test_cached_features_are_reused(runs):
    first, again, shuffled = runs["first"], runs["again"], runs["shuffled"]
    assert first["shards_computed"] == {"train": 4, "val": 2}
    assert again["shards_computed"] == {"train": 0, "val": 0}
    assert again["shards_reused"] == {"train": 4, "val": 2}
    assert "linear" not in again and again["knn"]["cls"]["top1"] >= 0.9
    assert shuffled["shards_computed"] == {"train": 4, "val": 0}  # its val cache is first's
    assert shuffled["caches"]["val"] == first["caches"]["val"]


def test_the_cli_prints_a_table_and_json_on_request(runs, colour_data, checkpoint, capsys):
    """The same eval as ``again`` (features from the cache) through the CLI: a table for
    people whose cells are the summary's figures; ``--json`` the summary itself."""
    from salient.jobs.cli import main

    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(colour_data["train"])]
    argv += ["--val", str(colour_data["val"]), "--out", str(runs["out"]), "--knn", "--k", "5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    again = runs["again"]
    for kind in ("cls", "mean"):
        scores = again["knn"][kind]
        assert f"k-NN   {kind:<7}  {scores['top1']:.3f}  {scores['top5']:.3f}" in text, text
    assert "linear" not in text and "on 64 train / 32 val images, 4 classes, 32 px view" in text
    assert text.rstrip().endswith(f"all figures: {runs['out'] / 'eval.json'} (--json prints them)")
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["knn"] == again["knn"] and printed["shards_computed"] == {"train": 0, "val": 0}


def _cache(url: str) -> dict:
    group = zarr.open_group(url, mode="r", use_consolidated=False)
    assert group.attrs["complete"]
    return {name: group[name][:] for name in ("cls", "mean", "labels", "valid")}


def _sources(data: Path) -> list[str]:
    """The source file of each sample id (its ``path.txt``), without the class folder."""
    rows = wds.WebDataset(open_dataset(data).shard_urls(), shardshuffle=False)
    return [r["path.txt"].decode().split("/")[1] for r in sorted(rows, key=lambda r: r["__key__"])]


def test_features_are_deterministic(runs, colour_data):
    """The same image, encoded by another run with one worker instead of two, in batches of 7
    instead of 16 beside other images: the same bytes."""
    first, shuffled = runs["first"], runs["shuffled"]
    a, b = _cache(first["caches"]["train"]), _cache(shuffled["caches"]["train"])
    row_of = {name: i for i, name in enumerate(_sources(colour_data["train"]))}
    order = [row_of[name] for name in _sources(colour_data["shuffled"])]
    assert sorted(order) == list(range(64))
    for name in ("cls", "mean", "valid"):
        assert a[name][order].tobytes() == b[name].tobytes(), name
    assert np.isfinite(a["cls"]).all() and (a["valid"] == 1).all()
    assert (a["labels"][order] != b["labels"]).mean() > 0.5  # the labels are what differ


# ---------------------------------------------------------------- the baseline


def test_baseline_is_the_runs_own_initialisation(checkpoint, tmp_path):
    init = torch.load(initial_checkpoint(str(checkpoint), tmp_path), weights_only=True)
    torch.manual_seed(3)  # what the trainer does for seed 3 before building the model
    fresh = build_model("mae-micro", 32, 8).encoder.state_dict()
    trained = torch.load(checkpoint, weights_only=True)["encoder"]
    assert init["epoch"] == 0 and init["config"]["seed"] == 3
    assert all(torch.equal(init["encoder"][k], fresh[k]) for k in fresh)
    assert not all(torch.equal(init["encoder"][k], trained[k]) for k in fresh)


# ---------------------------------------------------------------- refusals before any work


def test_class_list_mismatch_is_one_line(colour_data, checkpoint, tmp_path):
    root = tmp_path / "src"
    for name in ("blue", "green", "red"):  # no yellow folder, and no --classes-from
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(_png(COLOURS[name], 0))
    ingest_folder(root, tmp_path / "val3")
    config = config_for(checkpoint, colour_data["train"], tmp_path / "val3", tmp_path / "out")
    with pytest.raises(EvalError, match="different class lists .4 vs 3 classes.*--classes-from"):
        run_eval(config)
    with pytest.raises(EvalError, match="is the training set itself"):
        run_eval(replace(config, val=config.data))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_not_a_vit_is_one_line(colour_data, tmp_path):
    data, val = colour_data["train"], colour_data["val"]
    with pytest.raises(TeacherError, match="timm:resnet18 as a timm VisionTransformer"):
        run_eval(config_for("timm:resnet18", data, val, tmp_path / "a", allow_random=True))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(TeacherError, match="not a salient training checkpoint"):
        run_eval(config_for(tmp_path / "other.pt", data, val, tmp_path / "b"))


def test_config_errors_are_clear():
    with pytest.raises(EvalError, match="--k must be a positive integer"):
        EvalConfig(checkpoint="c", data="d", val="v", k=0)
    with pytest.raises(EvalError, match="--crop-ratio must be in"):
        EvalConfig(checkpoint="c", data="d", val="v", crop_ratio=1.5)
    with pytest.raises(EvalError, match="eval needs --val"):
        EvalConfig(checkpoint="c", data="d", val="")
