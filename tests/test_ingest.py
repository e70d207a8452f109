"""Ingest, manifest validation, the demo set and the CLI's error lines."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from salient.jobs.cli import main
from salient.pipeline.demo import DEMO_OBJECTS, DEMO_VARIANTS, make_scene
from salient.pipeline.ingest import IngestError, ingest_demo, ingest_folder
from salient.pipeline.manifest import DatasetError, open_dataset, sample_key


def _image_bytes(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path):
    """cat/ (3 jpg + 1 truncated jpg), dog/ (2 png, one misnamed .jpg), a notes.txt."""
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    files = {}
    for i in range(3):
        files[f"cat/{i}.jpg"] = _image_bytes(i)
    files["dog/a.png"] = _image_bytes(10, "PNG")
    files["dog/b.jpg"] = _image_bytes(11, "PNG")  # a PNG named .jpg: stored as png
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    (src / "cat" / "broken.jpg").write_bytes(_image_bytes(5)[:200])
    (src / "dog" / "notes.txt").write_text("not an image")
    return src, files


def test_ingest_tree_round_trips_through_webdataset(tree, tmp_path):
    src, files = tree
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="broken.jpg"):
        manifest = ingest_folder(src, out, shard_size=2)
    assert manifest.classes == ["cat", "dog"]
    assert manifest.num_samples == 5 and [s.count for s in manifest.shards] == [2, 2, 1]
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert "unreadable image" in reasons["cat/broken.jpg"]
    assert reasons["dog/notes.txt"] == "not an image suffix"

    dataset = open_dataset(out)
    rows = list(wds.WebDataset(dataset.shard_urls(), shardshuffle=False))
    expected = sorted(files)  # class order, then path order
    assert [r["__key__"] for r in rows] == [sample_key(i) for i in range(5)]
    for row, rel in zip(rows, expected):
        ext = "png" if rel.startswith("dog") else "jpg"
        assert row[ext] == files[rel], rel  # bytes as they were, no re-encode
        assert int(row["cls"]) == (0 if rel.startswith("cat") else 1)
        assert row["path.txt"].decode() == rel
    for shard in dataset.shards:  # ids contiguous per shard
        keys = [r["__key__"] for r in wds.WebDataset(dataset.shard_url(shard), shardshuffle=False)]
        assert keys == [sample_key(i) for i in range(shard.first_id, shard.stop_id)]


def test_flat_folder_has_no_labels(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(_image_bytes(i))
    manifest = ingest_folder(src, tmp_path / "out")
    rows = list(wds.WebDataset(open_dataset(tmp_path / "out").shard_urls(), shardshuffle=False))
    assert manifest.classes is None and len(rows) == 3 and all("cls" not in r for r in rows)


def test_fingerprint_depends_on_layout(tree, tmp_path):
    src, _ = tree
    with pytest.warns(UserWarning):
        a = ingest_folder(src, tmp_path / "a", shard_size=2)
    with pytest.warns(UserWarning):
        b = ingest_folder(src, tmp_path / "b", shard_size=3)
    with pytest.warns(UserWarning):
        c = ingest_folder(src, tmp_path / "c", shard_size=2)
    assert a.fingerprint == c.fingerprint != b.fingerprint


def test_missing_and_truncated_shards_are_named(tmp_path):
    out = tmp_path / "d"
    ingest_demo(out, n=12, shard_size=4, image_size=48)
    open_dataset(out)
    shard = out / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="shard-000001.tar is truncated"):
        open_dataset(out)
    shard.unlink()
    with pytest.raises(DatasetError, match="shard shard-000001.tar .* is missing"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="holds no manifest.json"):
        open_dataset(tmp_path)


def test_demo_is_deterministic_and_boxes_hold_objects(tmp_path):
    a = ingest_demo(tmp_path / "a", n=24, seed=3, shard_size=10, image_size=64)
    ingest_demo(tmp_path / "b", n=24, seed=3, shard_size=10, image_size=64)
    ingest_demo(tmp_path / "c", n=24, seed=4, shard_size=10, image_size=64)
    for shard in a.shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (
            tmp_path / "b" / shard.name
        ).read_bytes()
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() != (
        tmp_path / "c" / "shard-000000.tar"
    ).read_bytes()

    rows = list(wds.WebDataset(open_dataset(tmp_path / "a").shard_urls(), shardshuffle=False))
    assert len(rows) == 24 and len({int(r["cls"]) for r in rows}) > 1
    for row in rows:
        box = json.loads(row["box.json"])
        image = np.asarray(Image.open(io.BytesIO(row["jpg"])).convert("RGB"), dtype=np.float32)
        assert image.shape == (64, 64, 3)
        assert 0 <= box["x0"] < box["x1"] <= 64 and 0 <= box["y0"] < box["y1"] <= 64


def test_demo_object_differs_from_background():
    """Inside the box the pixels are the object photo, not the background texture."""
    for index in range(12):
        scene = make_scene(seed=0, index=index, image_size=96)
        x0, y0, x1, y1 = scene.box
        pixels = np.asarray(scene.image, dtype=np.float32)
        inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
        mask = np.ones(pixels.shape[:2], bool)
        mask[y0:y1, x0:x1] = False
        outside = pixels[mask]
        # the background is a tinted grey texture: channels scale together; objects are not
        hist_in = np.histogramdd(inside // 32, bins=8, range=[(0, 8)] * 3)[0].ravel()
        hist_out = np.histogramdd(outside // 32, bins=8, range=[(0, 8)] * 3)[0].ravel()
        overlap = np.minimum(hist_in / hist_in.sum(), hist_out / hist_out.sum()).sum()
        assert overlap < 0.6, (index, scene.name, overlap)


def test_cli_errors_are_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("user data")
    cases = [
        (["ingest", str(tmp_path / "missing"), str(tmp_path / "o1")], "is not a directory"),
        (["ingest", "--demo", str(taken)], "is not empty"),
        (["ingest", "--demo", str(taken), "--overwrite"], "did not write"),
        (["ingest", "--demo", str(tmp_path / "o2"), "--shard-size", "0"], "--shard-size"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (taken / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "--demo", str(tmp_path / "o3"), "--n", "many"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_overwrite_replaces_own_dataset(tmp_path):
    out = tmp_path / "d"
    ingest_demo(out, n=10, shard_size=4, image_size=48)
    with pytest.raises(IngestError, match="not empty"):
        ingest_demo(out, n=6, shard_size=4, image_size=48)
    manifest = ingest_demo(out, n=6, shard_size=4, image_size=48, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert open_dataset(out).num_samples == manifest.num_samples == 6


# ---------------------------------------------------------------- held-out splits


def test_demo_val_split_has_the_classes_and_none_of_the_training_scenes(tmp_path):
    train = [np.asarray(make_scene(0, i, 48).image) for i in range(60)]
    val = [make_scene(0, i, 48, split="val") for i in range(60)]
    assert not any(np.array_equal(v.image, t) for v in val for t in train)
    assert {v.label for v in val} == set(range(len(DEMO_OBJECTS)))
    assert np.array_equal(np.asarray(make_scene(0, 3, 48, split="train").image), train[3])
    manifest = ingest_demo(tmp_path / "val", n=8, shard_size=4, image_size=48, split="val")
    assert manifest.demo["split"] == "val" and manifest.classes == list(DEMO_OBJECTS)
    with pytest.raises(IngestError, match="--split must be one of train, val"):
        ingest_demo(tmp_path / "test", n=8, split="test")


def _object_colour(scene) -> np.ndarray:
    """Mean (r, g, b) / 255 of the pixels inside the object box."""
    x0, y0, x1, y1 = scene.box
    return np.asarray(scene.image, dtype=np.float64)[y0:y1, x0:x1].reshape(-1, 3).mean(0) / 255


def test_colour_random_variant_recolours_the_object_and_nothing_else(tmp_path):
    """Every class's object colour spreads across scenes (plain: one photo per class, only a
    mild jitter); the background, box and label of each scene are plain's."""
    spread = {}
    for variant in DEMO_VARIANTS:
        by_class: dict[int, list] = {}
        for index in range(140):
            scene = make_scene(0, index, 64, variant=variant)
            by_class.setdefault(scene.label, []).append(_object_colour(scene))
        spread[variant] = {k: np.std(v, axis=0).sum() for k, v in by_class.items()}
    assert set(spread["plain"]) == set(range(len(DEMO_OBJECTS)))
    for label, plain in spread["plain"].items():  # sd over scenes, summed over r, g, b
        assert spread["colour-random"][label] > 1.8 * plain, (label, spread)
    mean_spread = {variant: np.mean(list(by.values())) for variant, by in spread.items()}
    assert mean_spread["colour-random"] > 2.5 * mean_spread["plain"], mean_spread
    changed = 0
    for index in range(30):
        plain, recoloured = (make_scene(0, index, 64, variant=v) for v in DEMO_VARIANTS)
        assert (plain.box, plain.label) == (recoloured.box, recoloured.label)
        a, b = np.asarray(plain.image), np.asarray(recoloured.image)
        x0, y0, x1, y1 = plain.box
        outside = np.ones(a.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a[outside], b[outside])
        changed += not np.array_equal(a[~outside], b[~outside])
    assert changed >= 20  # a grey object (the clock) made grey again stays as it was
    manifest = ingest_demo(
        tmp_path / "c", n=8, shard_size=4, image_size=48, variant="colour-random"
    )
    assert manifest.demo["variant"] == "colour-random"
    assert "variant" not in ingest_demo(tmp_path / "p", n=8, shard_size=4, image_size=48).demo
    with pytest.raises(IngestError, match="--variant must be one of plain, colour-random"):
        ingest_demo(tmp_path / "x", n=8, variant="sepia")
    assert main(["ingest", str(tmp_path), str(tmp_path / "y"), "--variant", "colour-random"]) == 2


def _class_tree(root, names, per_class: int = 1):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_image_bytes(100 * k + i, "PNG"))
    return root


def test_classes_from_keeps_the_training_sets_class_indices(demo_data, tmp_path):
    src = _class_tree(tmp_path / "val", DEMO_OBJECTS)  # folders sort otherwise than the demo
    manifest = ingest_folder(src, tmp_path / "out", classes_from=demo_data)
    assert manifest.classes == list(DEMO_OBJECTS) != sorted(DEMO_OBJECTS)
    rows = wds.WebDataset(open_dataset(tmp_path / "out").shard_urls(), shardshuffle=False)
    by_folder = {r["path.txt"].decode().split("/")[0]: int(r["cls"]) for r in rows}
    assert by_folder == {name: k for k, name in enumerate(DEMO_OBJECTS)}


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (DEMO_OBJECTS[:-1], r"missing \['colorwheel'\], extra none"),
        ((*DEMO_OBJECTS, "zebra"), r"missing none, extra \['zebra'\]"),
    ],
)
def test_classes_from_refuses_other_class_folders(demo_data, tmp_path, names, match):
    src = _class_tree(tmp_path / "val", names)
    with pytest.raises(IngestError, match=match):
        ingest_folder(src, tmp_path / "out", classes_from=demo_data)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_console_names_every_skipped_file_without_source_paths(tree, tmp_path, capfd):
    """Through the CLI: a corrupt image and a file that is no image each get a warning in the
    job's own words, without the source file and line of the code that warned."""
    import warnings

    from salient.jobs.cli import main

    src, _ = tree
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["ingest", str(src), str(tmp_path / "out")]) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert any(
        line.startswith(
            "salient ingest: warning: skipping 1 file(s), not an image suffix: "
            "dog/notes.txt (listed in manifest.json)"
        )
        for line in lines
    ), err
    assert any(
        line.startswith("salient ingest: warning: skipping cat/broken.jpg: unreadable image")
        for line in lines
    ), err
    assert ".py:" not in err and "warnings.warn" not in err, err
