"""``salient inspect``: report files, statistics checked through plain zarr, errors, text view.

The store is real (our writer API, zarr on disk) and filled with maps made from the demo
object boxes plus noise, so the box statistics have a known direction; the expected numbers
are recomputed here from the zarr arrays and webdataset tars directly, with per-image loops
and pixel rasterisation instead of the module's vectorised code.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import zarr
from PIL import Image

from salient.errors import SalientError
from salient.jobs.inspect.config import InspectConfig, InspectError
from salient.jobs.inspect.driver import SHADES, print_sample, run_inspect
from salient.jobs.inspect.stats import (
    HIST_BINS,
    box_coverage,
    map_entropy,
    map_mass,
    mask_plan_grid,
    normalize_maps,
    top_mass,
)

GRID = 8  # 96 px demo images -> 12 px cells
INVALID_A = (3, 40)  # rows marked invalid in the first generation
INVALID_B = (41,)
CONSTANT_B = 50  # a constant map in the second generation (no ranking, uniform mass)


def _teacher(kind: str, epoch: int) -> dict:
    return {
        "path": f"/synthetic/{kind}-{epoch}.pth",
        "sha256": f"{epoch:064x}",
        "name": "synthetic",
        "epoch": epoch,
        "kind": kind,
        "image_size": 64,
        "patch_size": 8,
        "reduce": "mean",
        "block": -1,
        "head": None,
    }


def read_boxes(data) -> dict[int, tuple[int, int, int, int]]:
    """Boxes straight from the tars through webdataset (not the module's tarfile reader)."""
    import webdataset as wds

    from salient.pipeline.manifest import open_dataset

    dataset = open_dataset(data)
    boxes = {}
    for sample in wds.WebDataset(dataset.shard_urls(), shardshuffle=False, empty_check=False):
        box = json.loads(sample["box.json"])
        boxes[int(sample["__key__"])] = (box["x0"], box["y0"], box["x1"], box["y1"])
    return boxes


def _pixel_cover(box, size: int, grid: int) -> np.ndarray:
    """Box coverage per cell by rasterising the box on the pixel grid: [G, G] (rows, cols)."""
    mask = np.zeros((size, size))
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1.0
    cell = size // grid
    return mask.reshape(grid, cell, grid, cell).mean(axis=(1, 3))


def _synthetic_maps(boxes: dict, size: int, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = np.empty((len(boxes), GRID, GRID), dtype=np.float32)
    for i in range(len(boxes)):
        cover = _pixel_cover(boxes[i], size, GRID)
        noise = rng.normal(0.0, 0.25, (GRID, GRID))
        # cls_attn: a positive share; gpa: raw logits that go negative
        if kind == "cls_attn":
            maps[i] = (cover + 0.3 + noise * 0.3).clip(0.01)
        else:
            maps[i] = 3 * cover - 1 + noise
    return maps


def _write_generation(store, dataset, maps, invalid, kind, epoch, publish=True):
    valid = np.ones(len(maps), dtype=np.uint8)
    maps = maps.copy()
    for i in invalid:
        valid[i] = 0
        maps[i] = np.nan
    writer = store.begin_generation(
        _teacher(kind, epoch), kind, image_size=64, patch_size=8, epoch=epoch
    )
    for shard in dataset.shards:
        rows = slice(shard.first_id, shard.stop_id)
        writer.write_shard(shard.index, maps[rows].astype(np.float16), valid[rows])
    if publish:
        writer.publish()
    return writer.name


def build_demo_store(data, url) -> dict:
    """Two published generations of synthetic maps for the demo set at ``data``."""
    from salient.pipeline.manifest import open_dataset
    from salient.store import SaliencyStore

    dataset = open_dataset(data)
    size = dataset.manifest.demo["image_size"]
    boxes = read_boxes(data)
    store = SaliencyStore.create(str(url), dataset, grid=GRID)
    first = _write_generation(
        store, dataset, _synthetic_maps(boxes, size, 1, "cls_attn"), INVALID_A, "cls_attn", 40
    )
    second_maps = _synthetic_maps(boxes, size, 2, "gpa")
    second_maps[CONSTANT_B] = 0.5
    second = _write_generation(store, dataset, second_maps, INVALID_B, "gpa", 80)
    return {"url": str(url), "first": first, "second": second, "boxes": boxes, "size": size}


@pytest.fixture(scope="module")
def demo_store(demo_data, tmp_path_factory):
    return build_demo_store(demo_data, tmp_path_factory.mktemp("store") / "saliency.zarr")


# ---------------------------------------------------------------- independent computation


def _plain_zarr(url: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return np.asarray(group[name]["maps"][:], dtype=np.float64), np.asarray(group[name]["valid"][:])


def _expected_stats(url, name, boxes, size, rows=None) -> dict:
    maps, valid = _plain_zarr(url, name)
    entropy, top, mass, area, cells = [], [], [], [], []
    for i in range(len(maps)):
        if valid[i] != 1 or (rows is not None and i not in rows):
            continue
        m = maps[i]
        p = np.ones_like(m) if m.max() == m.min() else (m - m.min()) / (m.max() - m.min())
        q = p / p.sum()
        nz = q[q > 0]
        entropy.append(-(nz * np.log(nz)).sum())
        top.append(np.sort(q.ravel())[::-1][: GRID * GRID // 4].sum())
        cover = _pixel_cover(boxes[i], size, GRID)
        mass.append((q * cover).sum())
        area.append(cover.mean())
        cells.append(p.ravel())
    mass, area = np.array(mass), np.array(area)
    return {
        "valid_share": valid.mean(),
        "usable": len(entropy),
        "entropy": np.mean(entropy),
        "top": np.mean(top),
        "mass": mass.mean(),
        "area": area.mean(),
        "lift": (mass / area).mean(),
        "hit": (mass > area).mean(),
        "hist": np.histogram(np.concatenate(cells), bins=HIST_BINS, range=(0, 1))[0],
    }


def _expected_diff(url, first, second) -> dict:
    from scipy.stats import spearmanr

    a, va = _plain_zarr(url, first)
    b, vb = _plain_zarr(url, second)
    change, rho, constant = [], [], 0
    for i in range(len(a)):
        if va[i] != 1 or vb[i] != 1:
            continue
        pa, pb = (
            (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.ones_like(m)
            for m in (a[i], b[i])
        )
        change.append(np.abs(pa - pb).mean())
        if a[i].max() == a[i].min() or b[i].max() == b[i].min():
            constant += 1
        else:
            rho.append(spearmanr(a[i].ravel(), b[i].ravel()).statistic)
    return {
        "images": len(change),
        "change": np.mean(change),
        "rho": np.mean(rho),
        "constant": constant,
    }


# ---------------------------------------------------------------- the report


def test_report_has_a_panel_per_id_and_stats_match_plain_zarr(demo_data, demo_store, tmp_path):
    ids = (17, 0, 3, CONSTANT_B, 95)  # panels keep the order asked
    out = tmp_path / "report"
    summary = run_inspect(
        InspectConfig(
            store=demo_store["url"],
            data=str(demo_data),
            out=str(out),
            ids=ids,
            compare=demo_store["first"],
        )
    )
    assert summary["generation"] == demo_store["second"]  # the current one by default
    assert summary["compare"] == demo_store["first"] and summary["panels"] == len(ids)

    index = (out / "index.html").read_text()
    for i in ids:
        for png in (out / f"panels/{i:09d}.png", out / f"panels/{i:09d}-compare.png"):
            with Image.open(png) as image:
                assert image.format == "PNG" and image.width > 200
            assert f'src="{png.relative_to(out)}"' in index
    positions = [index.index(f'src="panels/{i:09d}.png"') for i in ids]
    assert positions == sorted(positions)
    assert 'src="histogram.png"' in index and (out / "histogram.png").stat().st_size > 0
    assert not list(out.rglob(".*.partial"))

    body = json.loads((out / "stats.json").read_text())
    assert body["ids"] == list(ids)
    for name in (demo_store["first"], demo_store["second"]):
        got = body["generations"][name]["stats"]
        want = _expected_stats(demo_store["url"], name, demo_store["boxes"], demo_store["size"])
        assert got["samples"] == 96 and got["usable"] == want["usable"]
        assert got["valid_share"] == pytest.approx(want["valid_share"], abs=1e-12)
        assert got["entropy_mean"] == pytest.approx(want["entropy"], rel=1e-9)
        assert got["entropy_norm_mean"] == pytest.approx(want["entropy"] / math.log(GRID**2))
        assert got["top25_mass_mean"] == pytest.approx(want["top"], rel=1e-9)
        assert got["histogram"]["counts"] == want["hist"].tolist()
        box = got["box"]
        assert box["images"] == want["usable"]
        assert box["mass_mean"] == pytest.approx(want["mass"], rel=1e-9)
        assert box["area_mean"] == pytest.approx(want["area"], rel=1e-9)
        assert box["lift_mean"] == pytest.approx(want["lift"], rel=1e-9)
        assert box["hit_share"] == pytest.approx(want["hit"], abs=1e-12)
        assert box["lift_mean"] > 1.2  # the synthetic maps point at the boxes
    diff = body["compare"]
    want = _expected_diff(demo_store["url"], demo_store["first"], demo_store["second"])
    assert diff["images"] == want["images"] == 96 - 3 and diff["constant"] == want["constant"] == 1
    assert diff["mean_abs_change"] == pytest.approx(want["change"], rel=1e-9)
    assert diff["spearman_mean"] == pytest.approx(want["rho"], rel=1e-9)


def test_n_draws_ids_with_the_seed_and_invalid_rows_fall_back_to_random(
    demo_data, demo_store, tmp_path
):
    config = dict(
        store=demo_store["url"],
        data=str(demo_data),
        generation=demo_store["first"],
        n=6,
        seed=3,
        strategy="attmask_high",
    )
    first = run_inspect(InspectConfig(out=str(tmp_path / "a"), **config))
    again = run_inspect(InspectConfig(out=str(tmp_path / "b"), **config))
    ids = json.loads((tmp_path / "a/stats.json").read_text())["ids"]
    assert ids == json.loads((tmp_path / "b/stats.json").read_text())["ids"]
    assert len(set(ids)) == 6 and first["panels"] == again["panels"] == 6
    assert first["compare"] is None and first["diff"] is None
    # every published generation is shown beside each panel, --compare or not
    assert first["history"] == [demo_store["first"], demo_store["second"]]
    assert "Across generations" in (tmp_path / "a/index.html").read_text()
    panels = sorted(p.name for p in (tmp_path / "a/panels").iterdir())
    assert panels == sorted(f"{i:09d}{end}.png" for i in ids for end in ("", "-compare"))

    invalid = run_inspect(
        InspectConfig(out=str(tmp_path / "c"), **{**config, "n": 32}, ids=INVALID_A)
    )
    assert invalid["panels"] == 2
    index = (tmp_path / "c/index.html").read_text()
    assert index.count("no valid map (random plan)</figcaption>") == 2


def test_mask_plan_grid_counts_and_fallback():
    import torch

    from salient.pipeline.masking import mask_counts

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(GRID, GRID))
    visible, masked, thrown = mask_counts(GRID * GRID, 0.45, 0.40)
    for strategy in ("amt", "random", "attmask_high"):
        state, used = mask_plan_grid(
            raw, GRID, strategy, 0.45, 0.40, torch.Generator().manual_seed(1)
        )
        assert used == strategy and state.shape == (GRID, GRID)
        assert [(state == k).sum() for k in (0, 1, 2)] == [visible, masked, thrown]
    state, _ = mask_plan_grid(raw, GRID, "attmask_high", 0.5, 0.0, torch.Generator().manual_seed(1))
    top = np.argsort(raw.ravel())[::-1][: (state == 1).sum()]
    assert set(np.flatnonzero(state.ravel() == 1)) == set(top)  # masked = the most salient
    state, used = mask_plan_grid(None, GRID, "amt", 0.45, 0.40, torch.Generator().manual_seed(1))
    assert used == "random" and (state == 2).sum() == thrown


# ---------------------------------------------------------------- statistics (pure)


def test_statistics_of_uniform_peaked_and_negative_maps():
    uniform = np.full((1, 4, 4), -3.0)
    peaked = np.zeros((1, 4, 4))
    peaked[0, 1, 2] = -1.0
    peaked[0] -= 5.0  # all negative, one cell lower: min-max makes it 0, the rest 1
    p = normalize_maps(np.concatenate([uniform, peaked]))
    q = map_mass(p)
    assert np.allclose(q.sum(axis=1), 1.0)
    assert map_entropy(q)[0] == pytest.approx(math.log(16))
    assert map_entropy(q)[1] == pytest.approx(math.log(15))
    assert top_mass(q)[0] == pytest.approx(0.25) and top_mass(q)[1] == pytest.approx(4 / 15)
    onehot = np.zeros((1, 16))
    onehot[0, 5] = 1.0
    assert map_entropy(onehot)[0] == 0.0 and top_mass(onehot)[0] == 1.0


@pytest.mark.parametrize(
    "box", [(10.25, 0.0, 57.75, 33.5), (0, 0, 100, 100), (99.0, 99.0, 100, 100)]
)
def test_box_coverage_counts_partial_cells_by_area(box):
    size, grid, fine = 100, 7, 2800  # 28 sub-pixels per px: box edges in quarters land exactly
    x0, y0, x1, y1 = (round(v * fine / size) for v in box)
    mask = np.zeros((fine, fine))
    mask[y0:y1, x0:x1] = 1.0
    want = mask.reshape(grid, fine // grid, grid, fine // grid).mean(axis=(1, 3))
    got = box_coverage(np.array([box]), (size, size), grid)[0]
    assert np.allclose(got, want, atol=1e-9)
    assert got.sum() / grid**2 == pytest.approx((box[2] - box[0]) * (box[3] - box[1]) / size**2)


# ---------------------------------------------------------------- errors


def _config(demo_data, store_url, out, **kw):
    return InspectConfig(store=str(store_url), data=str(demo_data), out=str(out), **kw)


def test_unknown_generation_ids_out_of_range_and_self_compare(demo_data, demo_store, tmp_path):
    with pytest.raises(InspectError, match="unknown generation 'gen-999999'.*published"):
        run_inspect(_config(demo_data, demo_store["url"], tmp_path, generation="gen-999999"))
    with pytest.raises(InspectError, match="unknown generation 'nope'"):
        run_inspect(_config(demo_data, demo_store["url"], tmp_path, compare="nope"))
    with pytest.raises(InspectError, match=r"--ids 96, 1000 out of range.*0\.\.95"):
        run_inspect(_config(demo_data, demo_store["url"], tmp_path, ids=(1, 96, 1000)))
    with pytest.raises(InspectError, match="names the inspected generation"):
        run_inspect(_config(demo_data, demo_store["url"], tmp_path, compare=demo_store["second"]))
    with pytest.raises(InspectError, match="out of range"):
        print_sample(demo_store["url"], str(demo_data), 96)
    assert not (tmp_path / "index.html").exists()


def test_empty_store_and_unpublished_generation(demo_data, tmp_path):
    from salient.pipeline.manifest import open_dataset
    from salient.store import SaliencyStore

    dataset = open_dataset(demo_data)
    url = tmp_path / "empty.zarr"
    store = SaliencyStore.create(str(url), dataset, grid=GRID)
    with pytest.raises(InspectError, match="holds no generation yet.*salient refresh"):
        run_inspect(_config(demo_data, url, tmp_path / "out"))
    maps = np.zeros((dataset.num_samples, GRID, GRID), dtype=np.float32)
    name = _write_generation(store, dataset, maps, (), "cls_attn", 1, publish=False)
    with pytest.raises(InspectError, match="no published generation.*" + name):
        run_inspect(_config(demo_data, url, tmp_path / "out"))
    with pytest.raises(InspectError, match=f"{name}' is not published"):
        print_sample(str(url), str(demo_data), 0, generation=name)


def test_gc_keeps_what_a_report_or_a_verify_reads_until_it_is_done(
    demo_data, tmp_path, monkeypatch
):
    """gc runs while the report is being written (its last file) and while every chunk is
    verified: the generations read are held by ``salient inspect`` and kept; afterwards the
    leases are gone and gc collects the old one."""
    from salient.jobs.inspect import driver, report
    from salient.store import SaliencyStore

    built = build_demo_store(demo_data, tmp_path / "s.zarr")
    store = SaliencyStore.open(built["url"])
    during = []

    def gc_meanwhile(original):
        def run(*args, **kwargs):
            plan = {p["name"]: p["reason"] for p in store.gc_plan(keep=1, grace_s=0)}
            during.append((plan, store.gc(keep=1, grace_s=0)))
            return original(*args, **kwargs)

        return run

    monkeypatch.setattr(report, "write_index", gc_meanwhile(report.write_index))
    monkeypatch.setattr(SaliencyStore, "verify", gc_meanwhile(SaliencyStore.verify))
    first = built["first"]
    run_inspect(_config(demo_data, built["url"], tmp_path / "r", ids=(0,), generation=first))
    driver.verify_store(built["url"], first)
    for plan, removed in during:  # the report (first, and the history), then the verify
        assert removed == [] and plan[first].startswith("held by a reader: salient inspect")
    assert len(during) == 2 and store.readers() == []
    assert store.gc(keep=1, grace_s=0) == [first]


def test_store_of_another_dataset_or_no_store_is_refused(demo_data, demo_store, tmp_path):
    from salient.pipeline.ingest import ingest_demo
    from salient.store import FingerprintMismatchError, StoreNotFoundError

    other = tmp_path / "other"
    ingest_demo(other, n=40, seed=1, shard_size=20, image_size=64)
    with pytest.raises(FingerprintMismatchError, match="made for another dataset"):
        run_inspect(_config(other, demo_store["url"], tmp_path / "out"))
    with pytest.raises(FingerprintMismatchError, match="made for another dataset"):
        print_sample(demo_store["url"], str(other), 0)
    with pytest.raises(StoreNotFoundError, match="no saliency store"):
        run_inspect(_config(demo_data, tmp_path / "missing.zarr", tmp_path / "out"))
    assert issubclass(FingerprintMismatchError, SalientError)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mask_ratio=0.6, throw_ratio=0.5), r"must be < 1 \(got 0.6 \+ 0.5\)"),
        (dict(mask_ratio=0.0), "mask-ratio must be in"),
        (dict(strategy="bogus"), "unknown --strategy 'bogus'.*amt"),
        (dict(n=0), "--n must be a positive integer"),
        (dict(ids=()), "--ids is empty"),
        (dict(ids=(1, -2)), "non-negative"),
        (dict(out=""), "needs --out DIR for the report, --id N or --key KEY"),
        (dict(store=""), "needs --store URL and --data DIR"),
    ],
)
def test_config_is_checked(kw, message):
    base = dict(store="s.zarr", data="d", out="o")
    with pytest.raises(InspectError, match=message):
        InspectConfig(**{**base, **kw})


def test_out_must_be_a_directory(demo_data, demo_store, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InspectError, match="not a directory"):
        run_inspect(_config(demo_data, demo_store["url"], target, ids=(0,)))


# ---------------------------------------------------------------- terminal view


def test_print_sample_text_heat_map_and_stats(demo_data, demo_store):
    sample_id = 17
    text = print_sample(
        demo_store["url"], str(demo_data), sample_id, generation=demo_store["first"]
    )
    lines = text.splitlines()
    assert lines[0].startswith(f"sample {sample_id} · generation {demo_store['first']}")
    assert lines[1] == "┌" + "─" * 2 * GRID + "┐"
    assert lines[2 + GRID] == "└" + "─" * 2 * GRID + "┘"
    heat = [row[1:-1] for row in lines[2 : 2 + GRID]]
    assert all(len(row) == 2 * GRID and set(row) <= set(SHADES) for row in heat)
    maps, _ = _plain_zarr(demo_store["url"], demo_store["first"])
    m = maps[sample_id]
    top_v, top_u = np.unravel_index(m.argmax(), m.shape)
    low_v, low_u = np.unravel_index(m.argmin(), m.shape)
    assert heat[top_v][2 * top_u] == SHADES[-1] and heat[low_v][2 * low_u] == SHADES[0]
    want = _expected_stats(
        demo_store["url"], demo_store["first"], demo_store["boxes"], demo_store["size"]
    )
    p = (m - m.min()) / (m.max() - m.min())
    q = p / p.sum()
    entropy = -(q[q > 0] * np.log(q[q > 0])).sum()
    assert f"entropy {entropy:.3f} nats" in text
    assert "box mass" in text and "box area" in text and want["usable"] == 94

    missing = print_sample(
        demo_store["url"], str(demo_data), INVALID_A[0], generation=demo_store["first"]
    )
    assert "no saliency map (valid=0)" in missing and SHADES[-1] not in missing


# ---------------------------------------------------------------- per class, training curves


def read_labels(data) -> dict[int, int]:
    """Labels straight from the tars through webdataset."""
    import webdataset as wds

    from salient.pipeline.manifest import open_dataset

    rows = wds.WebDataset(open_dataset(data).shard_urls(), shardshuffle=False)
    return {int(r["__key__"]): int(r["cls"]) for r in rows}


def test_per_class_statistics_match_plain_zarr(demo_data, demo_store, tmp_path):
    from salient.pipeline.demo import DEMO_OBJECTS

    run_inspect(_config(demo_data, demo_store["url"], tmp_path / "r", ids=(0,)))
    per_class = json.loads((tmp_path / "r/stats.json").read_text())["per_class"]
    labels = read_labels(demo_data)
    assert sorted(per_class) == sorted(DEMO_OBJECTS[k] for k in set(labels.values()))
    assert sum(c["samples"] for c in per_class.values()) == 96
    for name, got in per_class.items():
        rows = {i for i, label in labels.items() if label == DEMO_OBJECTS.index(name)}
        want = _expected_stats(
            demo_store["url"], demo_store["second"], demo_store["boxes"], demo_store["size"], rows
        )
        assert got["samples"] == len(rows) and got["usable"] == want["usable"]
        assert got["entropy_mean"] == pytest.approx(want["entropy"], rel=1e-9)
        assert got["box"]["lift_mean"] == pytest.approx(want["lift"], rel=1e-9)
        assert got["box"]["hit_share"] == pytest.approx(want["hit"], abs=1e-12)
    assert "Per class" in (tmp_path / "r/index.html").read_text()


def test_run_dir_adds_the_loss_curve_and_probe_accuracies(demo_data, demo_store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {"kind": "epoch", "epochs_done": 1, "loss": 0.9, "strategy": "random", "generation": None},
        {"kind": "epoch", "epochs_done": 2, "loss": 0.7, "strategy": "amt", "generation": "g1"},
        {"kind": "refresh", "epochs_done": 2, "generation": "gen-000002"},
        {"kind": "eval", "epochs_done": 2, "knn": {"cls": {"top1": 0.4}, "mean": {"top1": 0.5}}},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config(demo_data, demo_store["url"], tmp_path / "r", ids=(0,), run_dir=str(run_dir))
    summary = run_inspect(config)
    assert [
        (e["epochs_done"], e["loss"], e["knn_cls"], e["knn_mean"]) for e in summary["training"]
    ] == [
        (1, 0.9, None, None),
        (2, 0.7, 0.4, 0.5),
    ]
    index = (tmp_path / "r/index.html").read_text()
    assert 'src="training.png"' in index and "<td>0.400</td><td>0.500</td>" in index
    with Image.open(tmp_path / "r/training.png") as image:
        assert image.format == "PNG"
    with pytest.raises(InspectError, match="holds no metrics.jsonl"):
        run_inspect(replace(config, out=str(tmp_path / "x"), run_dir=str(tmp_path)))
    assert not (tmp_path / "x").exists()  # refused before the report was started
