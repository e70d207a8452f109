"""Existing webdataset shards through every job: ``salient index``, then ``refresh``, ``train``,
``eval``, ``inspect`` and ``compare`` read them as they read ingested data — locally and on
the S3 endpoint — and no tar is rewritten.

The tars are written by webdataset's own TarWriter in the layout of the public ImageNet shards
(``tests/test_adopt.imagenet_shards``: keys ``n01440764_10026``, fields jpg / cls / json,
shards of 7, 5, 9 and 3 samples, so ids 7, 8, 14..17 are unused); one sample's jpg field
holds a 13000 × 13000 PNG, over the pixel budget. Every job runs through the CLI
(``salient.jobs.cli.main``), on the session's local Ray. What the jobs wrote is checked
through plain zarr, the tars' own bytes and an independent teacher computation.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from test_adopt import SIZES, imagenet_shards
from timm.models.vision_transformer import VisionTransformer

from salient import urls
from salient.jobs.cli import main
from salient.pipeline.adopt import key_ids
from salient.pipeline.manifest import open_dataset
from salient.trainer.teacher import preprocess, saliency
from salient.trainer.teacher_load import load_teacher

SIDE, PATCH = 32, 8
HUGE = 5  # the sample (by order) whose jpg field holds the 13000² PNG: shard 0, id 5
ENCODER = dict(img_size=SIDE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.glob("*.tar"))
    }


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny salient checkpoint (patch 8 at 32 px: 4 × 4 maps), weights spread out."""
    torch.manual_seed(0)
    model = VisionTransformer(**ENCODER)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("teacher") / "vit.pt"
    body = {"config": {"model": "vit-test"}, "encoder_kwargs": ENCODER, "epoch": 1}
    torch.save({**body, "encoder": model.state_dict()}, path)
    return path


def _teacher_map(teacher_file: Path, jpg: bytes) -> np.ndarray:
    """The teacher's map of one image, decoded by PIL here (not by the job's reading code)."""
    teacher = load_teacher(str(teacher_file), image_size=SIDE)
    pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    x = preprocess(
        [torch.from_numpy(pixels.copy()).permute(2, 0, 1)], SIDE, teacher.mean, teacher.std
    )
    return saliency(teacher.model, x, kind="cls_attn")[0].numpy()


def test_adopted_shards_go_through_refresh_train_eval_and_inspect(
    ray_session, huge_png, teacher_file, tmp_path, capsys
):
    data, val = tmp_path / "train", tmp_path / "val"
    rows = imagenet_shards(data, replace={HUGE: huge_png.read_bytes()})
    imagenet_shards(val, sizes=(4, 6))
    before = {**_digests(data), **_digests(val)}

    code, out, _ = _cli(capsys, "index", data, "--workers", 2, "--json")
    summary = json.loads(out)
    assert code == 0 and (summary["shards"], summary["samples"]) == (4, sum(SIZES))
    assert (summary["shard_size"], summary["unused_ids"], summary["skipped"]) == (9, 6, 1)
    assert summary["first_skipped"][0]["id"] == HUGE
    assert "pixel budget" in summary["first_skipped"][0]["reason"]
    code, out, _ = _cli(capsys, "index", val, "--label-key", "label", "--classes-from", data)
    assert code == 0 and out.startswith("indexed 10 samples in 2 shards")
    dataset = open_dataset(data)
    gaps = sorted(set(range(dataset.num_ids)) - set(dataset.sample_ids().tolist()))
    assert gaps == [7, 8, 14, 15, 16, 17]

    # refresh: one row per id, gaps and the over-budget image without a map
    store = tmp_path / "saliency.zarr"
    code, out, err = _cli(
        capsys, "refresh", "--data", data, "--store", store, "--teacher", teacher_file,
        "--image-size", SIDE, "--workers", 2, "--batch-size", 4,
    )  # fmt: skip
    assert code == 0, err
    refreshed = json.loads(out)
    assert (refreshed["images"], refreshed["invalid"]) == (sum(SIZES), 1)
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    gen = root[refreshed["generation"]]
    maps, valid = gen["maps"][:], gen["valid"][:]
    assert maps.shape == (dataset.num_ids, 4, 4)
    usable = [i for i in dataset.sample_ids().tolist() if i != HUGE]
    lost = [*gaps, HUGE]  # rows without a map: unused ids and the over-budget image
    assert valid[usable].all() and not valid[lost].any()
    assert np.isnan(maps[lost]).all() and np.isfinite(maps[usable]).all()
    key = rows[12]["__key__"]  # shard 2's first sample: id 18
    (row,) = key_ids(dataset, [key]).values()
    assert row == 18
    np.testing.assert_allclose(
        maps[row].astype(np.float32), _teacher_map(teacher_file, rows[12]["jpg"]), rtol=2e-3,
        atol=1e-5,
    )  # fmt: skip

    # train: a warmup epoch, then one on the run's own maps (the store also holds another
    # teacher's generation: --maps own leaves it alone)
    run = tmp_path / "run"
    code, out, err = _cli(
        capsys, "train", "--data", data, "--store", store, "--run-dir", run,
        "--model", "mae-micro", "--strategy", "amt", "--epochs", 2, "--warmup-epochs", 1,
        "--refresh-every", 1, "--refresh-wait", "--workers", 1, "--batch-size", 8,
        "--image-size", SIDE, "--patch-size", PATCH, "--lr", "1e-3", "--loader-workers", 0,
        "--refresh-batch-size", 16,
    )  # fmt: skip
    assert code == 0, err
    assert err.count("salient train: corrupt 1 images in epoch") == 1  # said once, not per epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["corrupt"] for e in epochs] == [1, 1]  # the over-budget image, nothing else
    assert [e["generation"] for e in epochs] == [None, "gen-000002"]
    assert epochs[0]["teacher"] is None
    assert epochs[1]["teacher"]["path"] == str(run / "checkpoint-00001.pt")
    assert epochs[1]["saliency_share"] == 1.0 and epochs[1]["corrupt_maps"] == 0
    own = root["gen-000002"]["valid"][:]
    assert own[usable].all() and not own[lost].any()

    # eval: features of every sample, the gaps and the over-budget image left out
    out_dir = tmp_path / "eval"
    code, out, err = _cli(
        capsys, "eval", "--checkpoint", run / "checkpoint-00002.pt", "--data", data,
        "--val", val, "--out", out_dir, "--knn", "--workers", 1,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["images"] == {"train": sum(SIZES), "val": 10}
    assert result["excluded"] == {"train": 1, "val": 0}
    cache = zarr.open_group(result["caches"]["train"], mode="r", use_consolidated=False)
    assert cache["valid"].shape == (dataset.num_ids,)
    assert cache["valid"][:][usable].all() and not cache["valid"][:][lost].any()
    labels = cache["labels"][:]
    assert [labels[i] for i in usable] == [
        r["cls"] for i, r in zip(dataset.sample_ids().tolist(), rows) if i != HUGE
    ]

    # inspect: a report, one sample by its key, an id in a gap, a verified generation
    code, out, err = _cli(capsys, "inspect", "--store", store, "--data", data, "--out",
                          tmp_path / "report", "--n", 30, "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["generation"] == "gen-000002" and report["panels"] == len(usable)
    assert report["teacher"]["path"] == str(run / "checkpoint-00001.pt")
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert sorted(stats["ids"]) == usable  # drawn among the samples with an image
    assert stats["generations"]["gen-000002"]["stats"]["corrupt_maps"] == 0
    code, out, _ = _cli(capsys, "inspect", "--store", store, "--data", data, "--key", key)
    assert code == 0
    assert out.startswith("sample 18 · generation gen-000002 · shard imagenet1k-train-0002.tar")
    code, _, err = _cli(capsys, "inspect", "--store", store, "--data", data, "--id", 7)
    assert code == 2 and "no sample has id 7" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _cli(capsys, "inspect", "--store", store, "--verify")
    assert code == 0 and "none damaged" in out

    assert {**_digests(data), **_digests(val)} == before  # no tar rewritten, not even touched


@pytest.fixture
def bucket(s3_endpoint):
    """``s3://salient-index-jobs`` with dummy keys as this process's storage options."""
    previous = urls.storage_options()
    urls.set_storage_options({"key": "k", "secret": "s"})
    fs, _ = urls.filesystem("s3://salient-index-jobs")
    if not fs.exists("salient-index-jobs"):
        fs.mkdir("salient-index-jobs")
    yield fs, "s3://salient-index-jobs"
    urls.set_storage_options(previous)


def test_shards_on_s3_are_indexed_refreshed_and_read_in_place(
    ray_session, bucket, teacher_file, tmp_path, capsys
):
    fs, root = bucket
    rows = imagenet_shards(tmp_path / "local")
    fs.put(str(tmp_path / "local") + "/", "salient-index-jobs/in1k/", recursive=True)
    remote, store = f"{root}/in1k", f"{root}/saliency.zarr"
    before = {p: fs.info(p)["ETag"] for p in fs.ls("salient-index-jobs/in1k")}
    keys = ("--storage-option", "key=k", "--storage-option", "secret=s")

    code, out, err = _cli(capsys, "index", remote, *keys, "--json")
    assert code == 0, err
    assert json.loads(out)["manifest"] == f"{remote}/manifest.json"
    code, out, err = _cli(
        capsys, "refresh", "--data", remote, "--store", store, "--teacher", teacher_file,
        "--image-size", SIDE, "--workers", 2, "--batch-size", 4, *keys,
    )  # fmt: skip
    assert code == 0, err
    name = json.loads(out)["generation"]

    assert {p: fs.info(p)["ETag"] for p in before} == before  # no tar rewritten
    added = set(fs.ls("salient-index-jobs/in1k")) - set(before)
    assert added == {"salient-index-jobs/in1k/ids.tsv", "salient-index-jobs/in1k/manifest.json"}
    group = zarr.open_group(
        store, mode="r", use_consolidated=False, storage_options=urls.fsspec_options(store)
    )
    maps, valid = group[name]["maps"][:], group[name]["valid"][:]
    dataset = open_dataset(remote)
    ids = dataset.sample_ids().tolist()
    assert valid[ids].all() and valid.sum() == len(ids) and len(valid) == dataset.num_ids
    for n in (0, 9, 23):  # one sample of the first, third and last shards
        np.testing.assert_allclose(
            maps[ids[n]].astype(np.float32), _teacher_map(teacher_file, rows[n]["jpg"]),
            rtol=2e-3, atol=1e-5,
        )  # fmt: skip
    code, out, err = _cli(capsys, "inspect", "--store", store, "--data", remote, *keys,
                          "--key", rows[9]["__key__"])  # fmt: skip
    assert code == 0 and out.startswith(f"sample {ids[9]} · generation {name}"), err

    # train on those maps and eval the result, the shards still read in place from S3
    run = tmp_path / "run"
    code, out, err = _cli(
        capsys, "train", "--data", remote, "--store", store, "--run-dir", run, *keys,
        "--model", "mae-micro", "--strategy", "amt", "--maps", "any", "--epochs", 1,
        "--warmup-epochs", 0, "--refresh-every", 0, "--workers", 1, "--batch-size", 8,
        "--image-size", SIDE, "--patch-size", PATCH, "--lr", "1e-3", "--loader-workers", 1,
    )  # fmt: skip
    assert code == 0, err
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in epochs if r["kind"] == "epoch"]
    assert (epoch["generation"], epoch["saliency_share"], epoch["corrupt"]) == (name, 1.0, 0)
    imagenet_shards(tmp_path / "val", sizes=(4, 6))  # a held-out split beside it on S3
    fs.put(str(tmp_path / "val") + "/", "salient-index-jobs/val/", recursive=True)
    val = f"{root}/val"
    code, _, err = _cli(capsys, "index", val, "--label-key", "label", "--classes-from", remote,
                        *keys)  # fmt: skip
    assert code == 0, err
    code, out, err = _cli(
        capsys, "eval", "--checkpoint", run / "checkpoint-00001.pt", "--data", remote,
        "--val", val, "--out", tmp_path / "eval", "--knn", "--workers", 1, *keys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["images"] == {"train": len(ids), "val": 10}
    assert result["excluded"] == {"train": 0, "val": 0}
    assert {p: fs.info(p)["ETag"] for p in before} == before  # still no tar rewritten


def test_compare_runs_on_adopted_shards_through_the_cli(ray_session, tmp_path, capsys):
    """`salient compare --data --val` on indexed ImageNet-style tars (not the demo preset):
    an arm trains, is probed on the held-out split, and the report is written."""
    data, val = tmp_path / "train", tmp_path / "val"
    imagenet_shards(data)
    imagenet_shards(val, sizes=(4, 6))
    assert _cli(capsys, "index", data)[0] == 0
    assert _cli(capsys, "index", val, "--label-key", "label", "--classes-from", data)[0] == 0
    out = tmp_path / "cmp"
    code, printed, err = _cli(
        capsys, "compare", "--data", data, "--val", val, "--out", out, "--arms", "random",
        "--size", "micro", "--image-size", SIDE, "--patch-size", PATCH, "--epochs", 1,
        "--batch-size", 8, "--workers", 1, "--loader-workers", 0, "--probe-every", 0,
        "--mask-samples", 8, "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(printed)
    figures = summary["arms"]["random"]["figures"]
    assert figures["knn_cls"]["n"] == 1 and 0 <= figures["knn_cls"]["mean"] <= 1
    assert summary["data"] == str(data) and summary["val"] == str(val)
    assert (out / "index.html").is_file() and (out / "runs/random/seed-0/record.json").is_file()
