"""``salient compare``: arms, the noise rule, where masks land, and one real comparison.

The pure parts (arm names and their configs, the noise rule, patch coverage of a cropped
box) are checked against independent computations: Welch's t from its formula, coverage by
sampling points of each patch. One comparison runs for real on a real local Ray: two arms
(random masks, and AMT on the label teacher's maps) × two seeds on an ingested ImageFolder
tree — not the demo preset — with micro models, 1 epoch; its tables are recomputed from the
per-run records with ``statistics`` and looked for in the printed text and the HTML page.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from salient.jobs.cli import main
from salient.jobs.compare import CompareConfig, CompareError, render_compare, run_compare
from salient.jobs.compare.arms import ArmError, arm_config, parse_arm
from salient.jobs.compare.measure import crop_coverage, mask_box_shares
from salient.jobs.compare.noise import ALPHA, difference, equal_time_epoch, summarise
from salient.pipeline.ingest import ingest_folder
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore
from salient.trainer.checkpoint import checkpoint_path

# ---------------------------------------------------------------- the noise rule


def _welch(a, b) -> float:
    """Welch's two-sided p from its formula (t, Welch–Satterthwaite degrees of freedom)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_noise_rule_at_three_seeds_is_welchs_test():
    apart = difference([0.50, 0.51, 0.53], [0.40, 0.42, 0.41])
    close = difference([0.50, 0.44, 0.53], [0.47, 0.52, 0.45])
    for v, a, b in ((apart, [0.50, 0.51, 0.53], [0.40, 0.42, 0.41]),
                    (close, [0.50, 0.44, 0.53], [0.47, 0.52, 0.45])):  # fmt: skip
        assert v["rule"] == "welch" and v["p"] == pytest.approx(_welch(a, b))
        assert v["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
        assert v["exceeds"] == (v["p"] < ALPHA)
    assert apart["exceeds"] and not close["exceeds"]
    assert difference([0.5] * 3, [0.5] * 3)["exceeds"] is False  # no spread, no difference
    assert difference([0.5] * 3, [0.4] * 3)["exceeds"] is True


def test_noise_rule_at_two_seeds_and_one():
    pooled = math.sqrt((statistics.variance([0.5, 0.6]) + statistics.variance([0.4, 0.5])) / 2)
    v = difference([0.5, 0.6], [0.4, 0.5])
    assert v["rule"] == "2sd" and v["noise"] == pytest.approx(2 * pooled)
    assert not v["exceeds"]  # 0.1 apart, 2 × pooled sd = 0.141
    assert difference([0.50, 0.52], [0.30, 0.32])["exceeds"]
    one = difference([0.5], [0.4], held_out=500)  # binomial sd of the difference: 0.0313
    assert one["rule"] == "binomial" and one["noise"] == pytest.approx(
        2 * math.sqrt((0.5 * 0.5 + 0.4 * 0.6) / 500)
    )
    assert one["exceeds"] and not difference([0.5], [0.4], held_out=50)["exceeds"]
    assert difference([0.5], [0.4])["exceeds"] is None  # no seeds, no held-out size: unknown


def test_summarise_and_equal_time_epoch():
    values = [0.31, 0.35, 0.29]
    s = summarise(values)
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["sd"] == pytest.approx(np.std(values, ddof=1))
    assert summarise([0.3])["sd"] is None and summarise([])["n"] == 0
    ends = [10.0, 20.0, 31.0, 40.0]
    assert equal_time_epoch(ends, 30.0) == (2, False)
    assert equal_time_epoch(ends, 31.0) == (3, False)
    assert equal_time_epoch(ends, 45.0) == (4, True)  # faster than the budget: all of them
    assert equal_time_epoch(ends, 5.0) == (1, False)  # none yet: the first checkpoint


# ---------------------------------------------------------------- arms


@pytest.mark.parametrize(
    ("name", "base", "teacher", "strategy"),
    [
        ("random", "random", None, "random"),
        ("block", "block", None, "block"),
        ("amt", "amt", "self", "amt"),
        ("amt-self", "amt", "self", "amt"),
        ("amt-label", "amt", "label", "amt"),
        ("attmask-high-label", "attmask-high", "label", "attmask_high"),
        ("mae", "mae", None, "random"),
        ("amt-mae", "amt-mae", "self", "amt"),
        ("amt-simmim-label", "amt-simmim", "label", "amt"),
        ("gpa-mae", "gpa-mae", "label", "gpa"),  # a frozen teacher's recipe
        ("automae", "automae", "label", "random"),  # its generator reads the teacher's heads
        ("attmask-ibot-high", "attmask-ibot-high", "self", "attmask_high"),
        ("attmask-ibot-high-self", "attmask-ibot-high", "self", "attmask_high"),
    ],
)
def test_arm_names(name, base, teacher, strategy):
    arm = parse_arm(name)
    assert (arm.base, arm.teacher, arm.values["strategy"]) == (base, teacher, strategy)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("bogus", "unknown arm 'bogus'"),
        ("mae-label", "masks without maps"),
        ("random-self", "masks without maps"),
        ("automae-self", "reads a frozen teacher's maps"),
    ],
)
def test_arm_names_refused(name, match):
    with pytest.raises(ArmError, match=match):
        parse_arm(name)
    assert main(["compare", "--demo", "--arms", f"random,{name}", "--print-config"]) == 2


def _shared(**overrides) -> dict:
    config = CompareConfig(demo=True, **overrides)
    return config.shared("/data/d", seed=3)


def test_every_arm_shares_data_seed_schedule_and_size():
    shared = _shared()
    configs = {
        name: arm_config(parse_arm(name), shared, f"/runs/{name}", "/s.zarr")
        for name in ("random", "amt-self", "amt-label", "amt-mae", "attmask-mae", "amt-simmim")
    }
    for name, c in configs.items():
        assert (c.data, c.seed, c.epochs, c.lr_warmup, c.image_size, c.patch_size) == (
            "/data/d", 3, 8, 2, 64, 8,
        ), name  # fmt: skip
        assert (c.global_batch, c.base_lr, c.min_lr) == (128, 1.5e-4 * 128 / 256, 0.0), name
        assert c.model.endswith("-tiny") and c.keep_checkpoints == 0, name
    assert configs["amt-mae"].model == "mae-tiny"  # the recipe's mae-base at the shared size
    assert configs["amt-mae"].saliency_reduce == "minmax_mean"  # the recipe's own maps
    assert configs["amt-simmim"].mask_unit == 16  # SimMIM's 2 × 2 patches at 8 px patches
    assert (configs["amt-self"].warmup_epochs, configs["amt-self"].refresh_every) == (2, 2)
    assert configs["amt-self"].refresh_wait
    assert (configs["attmask-mae"].warmup_epochs, configs["attmask-mae"].refresh_every) == (0, 1)
    assert (configs["amt-label"].warmup_epochs, configs["amt-label"].refresh_every) == (0, 0)
    # the families beside MAE: iBOT's schedule fitted to 8 epochs, its maps online from its
    # EMA teacher or, with -label, from the store; AutoMAE's generator on the teacher's heads
    ibot = arm_config(parse_arm("attmask-ibot-high"), shared, "/runs/i", "/s.zarr")
    assert (ibot.framework, ibot.model, ibot.maps_from, ibot.epochs) == (
        "ibot", "ibot-tiny", "online", 8,
    )  # fmt: skip
    assert 1 <= ibot.warmup_teacher_temp_epochs < 8  # the recipe's 30 of 100 epochs, scaled
    assert ibot.store is None  # nothing to read, so nothing for the measures to open
    assert ibot.local_size == 24  # the recipe's 96 of 224 px at 64 px, in 8 px patches
    label = arm_config(parse_arm("attmask-ibot-high-label"), shared, "/runs/l", "/s.zarr")
    assert label.maps_from == "store" and label.needs_saliency and not label.refreshes
    stored = arm_config(parse_arm("attmask-ibot-high-self"), shared, "/runs/s", "/s.zarr")
    assert (stored.maps_from, stored.store, stored.refresh_every) == ("store", "/s.zarr", 1)
    assert stored.refreshes and stored.refresh_wait  # AttMask's every epoch, from itself
    automae = arm_config(parse_arm("automae"), shared, "/runs/a", "/s.zarr")
    assert (automae.framework, automae.saliency_kind, automae.maps_from) == (
        "automae", "heads", "store",
    )  # fmt: skip
    assert configs["random"].mask_ratio == 0.75 and configs["amt-self"].mask_ratio == 0.45


def test_momentum_teacher_reaches_the_ibot_arms_only():
    shared = _shared(momentum_teacher=0.99)
    ibot = arm_config(parse_arm("attmask-ibot-high"), shared, "/runs/i", "/s.zarr")
    mae = arm_config(parse_arm("amt-self"), shared, "/runs/a", "/s.zarr")
    assert ibot.momentum_teacher == 0.99  # MAE refuses iBOT settings, so it must not get it
    assert mae.framework == "mae" and mae.momentum_teacher == 0.996  # built: not refused
    recipe = arm_config(parse_arm("ibot"), _shared(), "/r", None)
    assert recipe.momentum_teacher == 0.996  # AttMask README: the recipe's when not given


def test_compare_config_refusals(capsys):
    with pytest.raises(CompareError, match="--data DATASET and --val"):
        CompareConfig(data="/d")
    with pytest.raises(CompareError, match="not both"):
        CompareConfig(demo=True, data="/d", val="/v")
    with pytest.raises(CompareError, match="names an arm twice"):
        CompareConfig(demo=True, arms=("random", "random"))
    with pytest.raises(CompareError, match="--seeds must be a positive integer"):
        CompareConfig(demo=True, seeds=0)
    assert main(["compare", "--demo", "--arms", "random,amt-label", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arms"] == ["random", "amt-label"] and printed["variant"] == "colour-random"


# ---------------------------------------------------------------- where masks land


def _coverage_by_sampling(box, crop, grid: int, k: int = 40) -> np.ndarray:
    """Each output patch's share inside ``box``: k × k points per patch mapped back through
    the crop (and its flip) into image pixels."""
    top, left, height, width, flip = crop
    x0, y0, x1, y1 = box
    out = np.zeros(grid * grid)
    offsets = (np.arange(k) + 0.5) / k
    for row in range(grid):
        for col in range(grid):
            u = (col + offsets) / grid  # output columns, in the crop's unit square
            u = 1 - u if flip else u
            xs = left + u * width
            ys = top + (row + offsets) / grid * height
            inside = ((xs >= x0) & (xs < x1))[None, :] & ((ys >= y0) & (ys < y1))[:, None]
            out[row * grid + col] = inside.mean()
    return out


def test_crop_coverage_matches_sampled_points():
    rng = np.random.default_rng(0)
    boxes, crops = [], []
    for _ in range(12):
        x0, y0 = rng.uniform(0, 100, 2)
        boxes.append([x0, y0, x0 + rng.uniform(10, 80), y0 + rng.uniform(10, 80)])
        top, left = rng.integers(0, 60, 2)
        crops.append([top, left, rng.integers(40, 120), rng.integers(40, 120), rng.integers(2)])
    got = crop_coverage(np.array(boxes), np.array(crops), 8)
    for i, (box, crop) in enumerate(zip(boxes, crops)):
        np.testing.assert_allclose(got[i], _coverage_by_sampling(box, crop, 8), atol=0.03)
    assert got.max() <= 1 and got.min() >= 0 and 0 < got.mean() < 1


def _box_store(data: Path, path: Path, grid: int = 12) -> str:
    """A store whose one generation holds each scene's box coverage (boxes read from the tars,
    scenes of 96 px) as its map: a teacher that finds every object exactly."""
    boxes = {}
    for tar_path in sorted(data.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "box.json":
                    box = json.loads(tar.extractfile(member).read())
                    boxes[int(key)] = [box["x0"], box["y0"], box["x1"], box["y1"]]
    edges = np.arange(grid + 1) * 96 / grid
    maps = np.zeros((len(boxes), grid, grid), np.float32)
    for i, (x0, y0, x1, y1) in boxes.items():
        cover_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
        cover_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
        maps[i] = np.outer(cover_y, cover_x)
    dataset = open_dataset(data)
    store = SaliencyStore.create(str(path), dataset, grid=grid)
    teacher = {"path": "boxes", "sha256": "0" * 64, "name": "boxes", "kind": "cls_attn"}
    writer = store.begin_generation(teacher=teacher, kind="cls_attn", image_size=96, patch_size=8)
    for shard in dataset.shards:
        rows = slice(shard.first_id, shard.stop_id)
        writer.write_shard(shard.index, maps[rows].astype(np.float16), np.ones(shard.count, "u1"))
    writer.publish()
    return str(path)


def test_masks_land_on_the_objects_through_the_loader(demo_data, tmp_path):
    """AMT on maps that are the boxes masks the objects; random masks do not; both see the
    same crops, so the box's share of the crops is the same."""
    store = _box_store(demo_data, tmp_path / "boxes.zarr")
    compare = CompareConfig(demo=True, size="micro", image_size=64, batch_size=16, workers=1)
    shared = compare.shared(str(demo_data), seed=0)
    amt = arm_config(parse_arm("amt-label"), shared, str(tmp_path / "a"), store)
    random = arm_config(parse_arm("random"), shared, str(tmp_path / "r"), None)
    on_boxes, at_random = mask_box_shares(amt, 96), mask_box_shares(random, 96)
    assert on_boxes["samples"] == at_random["samples"] == 96
    assert on_boxes["box_area"] == pytest.approx(at_random["box_area"])
    assert 0.05 < at_random["box_area"] < 0.9
    assert on_boxes["generation"] == SaliencyStore.open(store).current()
    assert on_boxes["lift"] > 1.3 and 0.8 < at_random["lift"] < 1.2
    ratio = on_boxes["masked_in_box"] / on_boxes["box_area"]
    assert on_boxes["lift"] == pytest.approx(ratio, rel=1e-3)  # each figure rounded to 4 digits
    assert at_random["thrown_in_box"] is None  # random 75 % throws nothing


# ---------------------------------------------------------------- a real comparison

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def _tree(root: Path, per_class: int, split: int) -> Path:
    """Class folders of noisy colour squares (not the demo set: no boxes, no demo manifest)."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            rng = np.random.default_rng([c, k, split])
            pixels = np.clip(np.array(colour) + rng.normal(0, 50, (40, 40, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
            (root / name / f"{k}.png").write_bytes(buffer.getvalue())
    return root


@pytest.fixture(scope="module")
def compared(ray_session, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    ingest_folder(_tree(root / "src-train", 16, 0), root / "train", shard_size=16)
    ingest_folder(
        _tree(root / "src-val", 6, 1), root / "val", shard_size=9, classes_from=root / "train"
    )
    config = CompareConfig(
        data=str(root / "train"),
        val=str(root / "val"),
        out=str(root / "out"),
        arms=("random", "amt-label"),
        seeds=2,
        size="micro",
        image_size=32,
        patch_size=8,
        epochs=1,
        batch_size=8,
        loader_workers=0,
        probe_every=0,
        teacher_epochs=2,
    )
    return {"config": config, "summary": run_compare(config), "out": root / "out"}


def _records(out: Path, arm: str) -> list[dict]:
    paths = sorted((out / "runs" / arm).glob("seed-*/record.json"))
    return [json.loads(p.read_text()) for p in paths]


def test_compare_reports_the_mean_and_sd_of_its_seeds(compared):
    summary, out = compared["summary"], compared["out"]
    text = render_compare(summary)
    page = (out / "index.html").read_text()
    on_disk = json.loads((out / "compare.json").read_text())
    for arm in ("random", "amt-label"):
        records = _records(out, arm)
        assert [r["seed"] for r in records] == [0, 1]
        for probe in ("knn_cls", "knn_mean", "linear_cls", "linear_mean"):
            values = [r["final"][probe] for r in records]
            mean, sd = statistics.fmean(values), statistics.stdev(values)
            figures = summary["arms"][arm]["figures"][probe]
            assert figures["mean"] == pytest.approx(mean) and figures["sd"] == pytest.approx(sd)
            assert on_disk["arms"][arm]["figures"][probe]["mean"] == pytest.approx(mean)
            assert f"{mean:.3f} ± {sd:.3f}" in text and f"{mean:.3f} ± {sd:.3f}" in page
        # one run per seed: the seeds trained differently (their losses differ)
        assert records[0]["loss"] != records[1]["loss"]
        for r in records:
            assert r["images"] == 48 and r["equal_time"]["epochs_done"] == 1
            assert r["masks"] is None and r["final_maps"] is None  # no object boxes here
            assert set(r["curve"]) == {"0", "1"} and r["curve"]["0"] == r["init"]
    versus = summary["arms"]["amt-label"]["versus_reference"]["knn_cls"]
    a = [r["final"]["knn_cls"] for r in _records(out, "amt-label")]
    b = [r["final"]["knn_cls"] for r in _records(out, "random")]
    assert versus == difference(a, b, summary["held_out"]) and versus["rule"] == "2sd"


def test_label_arm_trains_on_the_teachers_fixed_maps(compared):
    summary, out = compared["summary"], compared["out"]
    teacher = summary["teacher"]
    assert teacher["epochs"] == 2 and len(teacher["val_top1_per_epoch"]) == 2
    parts = teacher["decode_s"] + teacher["train_s"] + teacher["eval_s"]
    assert 0 < parts <= teacher["seconds"] + 0.002  # each part rounded to 1 ms
    (store,) = teacher["stores"].values()
    for record in _records(out, "amt-label"):
        assert record["config"]["store"] == store["store"]
        assert record["config"]["refresh_every"] == 0
        assert list(record["generations"]) == list(store["generations"])  # one, the teacher's
        metrics = (Path(record["config"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        epochs = [json.loads(line) for line in metrics if '"kind": "epoch"' in line]
        assert all(e["strategy"] == "amt" and e["saliency_share"] == 1.0 for e in epochs)


def test_the_same_command_again_keeps_the_finished_runs(compared):
    out = compared["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/run/metrics.jsonl")}
    records = sorted(out.glob("runs/*/seed-*/record.json"))
    older = json.loads(records[0].read_text())
    del older["config"]["step_delay_s"]  # as written before TrainConfig had the setting
    records[0].write_text(json.dumps(older))
    again = run_compare(compared["config"])
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing trained again
    assert again["arms"] == compared["summary"]["arms"]

    other = json.loads(records[1].read_text())
    other["config"]["step_delay_s"] = 0.01  # a setting that differs: another run
    records[1].write_text(json.dumps(other))
    run_compare(compared["config"])
    trained = {p for p, mtime in before.items() if p.stat().st_mtime_ns != mtime}
    assert trained == {records[1].parent / "run" / "metrics.jsonl"}


def test_another_label_teacher_retrains_its_arms_and_refreshes_its_maps(compared):
    # A rerun whose teacher differs (another --teacher-epochs) must not reuse the maps or the
    # runs of the old one: its stores are refreshed anew and its label arms retrain; the arms
    # without a teacher are kept. (The last test of the comparison: it changes it.)
    out = compared["out"]
    config = replace(compared["config"], teacher_epochs=1)
    runs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/run/metrics.jsonl")}
    summary = run_compare(config)
    trained = {p.parts[-4] for p, mtime in runs.items() if p.stat().st_mtime_ns != mtime}
    assert trained == {"amt-label"}
    assert summary["teacher"]["settings"]["epochs"] == 1
    for record in out.glob("runs/amt-label/seed-*/record.json"):
        assert json.loads(record.read_text())["teacher_settings"]["epochs"] == 1
    (store,) = summary["teacher"]["stores"].values()
    assert SaliencyStore.open(store["store"]).current() == "gen-000001"  # refreshed anew


def test_an_online_arm_reports_its_teachers_box_lift_per_probed_epoch(
    ray_session, demo_data, demo_val, tmp_path
):
    """iBOT plans AttMask's masks from its EMA teacher in the step: no store generation
    exists, so the teacher's maps are measured at every probed checkpoint instead, each by a
    refresh of that checkpoint over the held-out scenes, and reported as the arm's
    generations (the last one is the final encoder's)."""
    config = CompareConfig(
        data=str(demo_data),
        val=str(demo_val),
        out=str(tmp_path / "out"),
        arms=("attmask-ibot-high",),
        seeds=1,
        size="micro",
        image_size=32,
        patch_size=8,
        epochs=2,
        batch_size=16,
        loader_workers=0,
        probe_every=1,
        mask_samples=16,
    )
    run_compare(config)
    (record,) = _records(tmp_path / "out", "attmask-ibot-high")
    assert record["config"]["store"] is None and record["config"]["model"] == "ibot-micro"
    assert list(record["generations"]) == ["epoch-1", "epoch-2"]
    assert record["final_maps"] == record["generations"]["epoch-2"]
    root = tmp_path / "out" / "runs" / "attmask-ibot-high" / "seed-0"
    paths = {1: str(checkpoint_path(record["config"]["run_dir"], 1)), 2: record["checkpoint"]}
    for epoch, path in paths.items():
        (generation,) = SaliencyStore.open(root / f"maps-epoch-{epoch}.zarr").generations()
        assert generation["teacher"]["path"] == path  # that epoch's checkpoint, no other
        lift = record["generations"][f"epoch-{epoch}"]["lift"]
        assert lift is not None and lift > 0
