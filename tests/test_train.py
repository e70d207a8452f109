"""The trainer on Ray Train: 2 CPU workers over gloo, the micro MAE, the 96-image demo set.

Three real runs share the session's local Ray (each ``TorchTrainer.fit`` costs ~20 s here):

- ``stopped``: 3 epochs planned, warmup 1, a refresh every 2 epochs (waited for), stopped
  right after the checkpoint of epoch 2 as a kill there would;
- ``resumed``: the same config with ``resume=True`` finishes epoch 3;
- ``straight``: the same 3 epochs uninterrupted, with its own run dir and store: the
  reference the resumed run must match step for step.

The stopped and resumed runs also run the k-NN probe on the held-out demo split (``--val``,
every 2 epochs and after the last); the straight run does not, so matching it step for step
also shows the probe leaves training alone.

Checks read the JSONL logs, the checkpoints (``torch.load``) and the store through plain
zarr, not through the trainer's own code.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zarr
from PIL import Image

from salient.jobs.eval.config import EvalError
from salient.jobs.train.driver import TrainConfig, TrainError, run_train
from salient.jobs.train.worker import refresh_due, uses_warmup_masking
from salient.pipeline.ingest import ingest_folder
from salient.pipeline.manifest import DatasetError
from salient.trainer.checkpoint import CheckpointError
from salient.trainer.loop import build_optimizer, train_one_epoch
from salient.trainer.models import build_model
from salient.trainer.schedules import WarmupCosine

WORKERS, BATCH, SAMPLES = 2, 8, 96
STEPS_PER_EPOCH = SAMPLES // (WORKERS * BATCH)  # 6


def config_for(data: Path, root: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        store=str(root / "saliency.zarr"),
        run_dir=str(root / "run"),
        model="mae-micro",
        strategy="amt",
        mask_ratio=0.45,
        throw_ratio=0.40,
        epochs=3,
        warmup_epochs=1,
        refresh_every=2,
        refresh_wait=True,
        workers=WORKERS,
        batch_size=BATCH,
        image_size=32,
        patch_size=8,
        lr=1e-3,
        loader_workers=0,
        refresh_batch_size=32,
        log_details=True,
        saliency_reduce="minmax_mean",  # AMT's code: refreshes in training choose it too
    )
    return TrainConfig(**{**fields, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def steps_of(run_dir: Path, rank: int) -> list[dict]:
    return read_jsonl(run_dir / "metrics" / f"rank-{rank}.jsonl")


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == kind]


def store_root(store: str):
    return zarr.open_group(store, mode="r", use_consolidated=False)


@pytest.fixture(scope="module")
def runs(ray_session, demo_data, demo_val, tmp_path_factory) -> dict:
    """The stopped, resumed and straight runs (see the module docstring)."""
    root = tmp_path_factory.mktemp("train")
    config = config_for(demo_data, root / "a", val=str(demo_val), eval_every=2)
    stopped = run_train(replace(config, stop_after_epochs=2), progress=False)
    after_stop = {
        "checkpoints": sorted(p.name for p in Path(config.run_dir).glob("*.pt")),
        "current": store_root(config.store).attrs["current"],
    }
    resumed = run_train(replace(config, resume=True), progress=False)
    straight_config = config_for(demo_data, root / "b")
    straight = run_train(straight_config, progress=False)
    return {
        "config": config,
        "stopped": stopped,
        "after_stop": after_stop,
        "resumed": resumed,
        "straight_config": straight_config,
        "straight": straight,
    }


# ---------------------------------------------------------------- the stopped run: 2 epochs


def test_two_epochs_run_and_checkpoint(runs):
    config, summary = runs["config"], runs["stopped"]
    assert summary["epochs_done"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert runs["after_stop"]["checkpoints"] == ["checkpoint-00001.pt", "checkpoint-00002.pt"]
    ckpt = torch.load(Path(config.run_dir) / "checkpoint-00002.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert ckpt["config"]["model"] == "mae-micro" and ckpt["optimizer"]["state"]
    epochs = events(Path(config.run_dir), "epoch")[:2]
    assert [e["epochs_done"] for e in epochs] == [1, 2]
    assert all(math.isfinite(e["loss"]) and e["img_per_s"] > 0 for e in epochs)


def test_parameters_identical_across_ranks_after_every_step(runs):
    run_dir = Path(runs["config"].run_dir)
    rank0, rank1 = steps_of(run_dir, 0), steps_of(run_dir, 1)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(1, 19))
    assert [r["checksum"] for r in rank0] == [r["checksum"] for r in rank1]
    assert len({r["checksum"] for r in rank0}) == len(rank0)  # every step changed the weights


def test_each_rank_sees_different_samples(runs):
    run_dir = Path(runs["config"].run_dir)
    for epoch in range(3):
        seen = [
            [i for r in steps_of(run_dir, rank) if r["epoch"] == epoch for i in r["ids"]]
            for rank in (0, 1)
        ]
        assert len(seen[0]) == len(seen[1]) == STEPS_PER_EPOCH * BATCH
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(SAMPLES))


def test_scheduled_refresh_publishes_a_generation_the_next_epoch_uses(runs):
    config = runs["config"]
    run_dir = Path(config.run_dir)
    refreshes = events(run_dir, "refresh")
    assert [r["epochs_done"] for r in refreshes] == [1]  # after warmup; epoch 2 is off-schedule
    generation = refreshes[0]["generation"]
    assert runs["after_stop"]["current"] == generation  # plain zarr: published as current
    attrs = dict(store_root(config.store)[generation].attrs)
    assert str(run_dir / "checkpoint-00001.pt") in json.dumps(attrs)  # its teacher
    assert attrs["teacher"]["reduce"] == "minmax_mean"  # the run's --saliency-reduce
    warmup, amt = events(run_dir, "epoch")[:2]
    assert (warmup["strategy"], warmup["mask_ratio"], warmup["throw_ratio"]) == (
        "random",
        0.75,
        0.0,
    )
    assert warmup["generation"] is None and warmup["saliency_share"] == 0.0
    assert (amt["strategy"], amt["mask_ratio"], amt["throw_ratio"]) == ("amt", 0.45, 0.40)
    assert amt["generation"] == generation and amt["saliency_share"] == 1.0
    for rank in (0, 1):
        epoch1 = [r for r in steps_of(run_dir, rank) if r["epoch"] == 1]
        assert all(r["generation"] == generation and r["with_saliency"] == BATCH for r in epoch1)


def test_knn_probe_is_logged_after_its_epochs(runs):
    config = runs["config"]
    probes = events(Path(config.run_dir), "eval")
    assert [p["epochs_done"] for p in probes] == [2, 3]  # every 2 epochs, and after the last
    for probe in probes:
        assert probe["images"] == {"train": 96, "val": 48} and probe["k"] == 20
        for kind in ("cls", "mean"):
            assert 0.0 <= probe["knn"][kind]["top1"] <= probe["knn"][kind]["top5"] <= 1.0
    assert runs["resumed"]["knn"] == {p["epochs_done"]: p["knn"]["cls"]["top1"] for p in probes}
    assert runs["straight"]["knn"] == {}


# ---------------------------------------------------------------- resume


def test_resume_continues_with_the_same_step_count_and_generation(runs):
    config, resumed = runs["config"], runs["resumed"]
    run_dir = Path(config.run_dir)
    assert resumed["resumed_from"] == str(run_dir / "checkpoint-00002.pt")
    saved = torch.load(run_dir / "checkpoint-00002.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoint-00003.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (3, 3 * STEPS_PER_EPOCH)
    assert last["generation"] == saved["generation"] == runs["after_stop"]["current"]
    epoch2 = [r for r in steps_of(run_dir, 0) if r["epoch"] == 2]
    assert [r["step"] for r in epoch2] == list(range(saved["step"] + 1, saved["step"] + 7))
    assert all(r["generation"] == saved["generation"] for r in epoch2)
    assert len(events(run_dir, "refresh")) == 1  # nothing due at epoch 2, nothing relaunched


def test_resumed_run_matches_the_uninterrupted_run(runs):
    """Weights, optimiser state and lr schedule all came back: step for step the same."""
    resumed = [r for r in steps_of(Path(runs["config"].run_dir), 0) if r["epoch"] == 2]
    straight = [r for r in steps_of(Path(runs["straight_config"].run_dir), 0) if r["epoch"] == 2]
    for key in ("step", "lr", "ids"):
        assert [r[key] for r in resumed] == [r[key] for r in straight]
    for key in ("loss", "checksum"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-5)
    assert runs["resumed"]["loss"] == pytest.approx(runs["straight"]["loss"], rel=1e-5)


# ---------------------------------------------------------------- clear errors, before any work


def test_resume_refuses_a_checkpoint_of_another_model(runs):
    config = runs["config"]
    with pytest.raises(CheckpointError, match="model.*mae-micro.*simmim-micro"):
        run_train(replace(config, model="simmim-micro", resume=True), progress=False)
    with pytest.raises(CheckpointError, match="image_size"):
        run_train(replace(config, image_size=48, resume=True), progress=False)
    with pytest.raises(TrainError, match="--resume"):
        run_train(config, progress=False)  # a fresh run into a run dir with checkpoints


def test_config_errors_are_clear(demo_data, tmp_path):
    with pytest.raises(TrainError, match="needs saliency maps: give --store"):
        config_for(demo_data, tmp_path, store=None)
    with pytest.raises(TrainError, match=r"must be < 1 \(got 0.6 \+ 0.5\)"):
        config_for(demo_data, tmp_path, mask_ratio=0.6, throw_ratio=0.5)
    with pytest.raises(TrainError, match="multiple of --patch-size"):
        config_for(demo_data, tmp_path, image_size=30)
    with pytest.raises(TrainError, match="unknown --model"):
        config_for(demo_data, tmp_path, model="mae-huge")
    with pytest.raises(DatasetError, match="does not exist; run `salient ingest`"):
        run_train(config_for(tmp_path / "missing", tmp_path), progress=False)
    with pytest.raises(TrainError, match="does not exist and --refresh-every is 0"):
        run_train(config_for(demo_data, tmp_path, refresh_every=0), progress=False)
    with pytest.raises(
        TrainError,
        match="--accum-iter 4 needs 4 batches per worker and epoch, "
        "but 96 images give each of 2 workers 3 of --batch-size 16; use --accum-iter 3",
    ):
        run_train(config_for(demo_data, tmp_path, batch_size=16, accum_iter=4), progress=False)
    # a recipe's batch on a small set: the flag that sets it, and a value that fits
    with pytest.raises(
        TrainError,
        match="--batch-size 128 on each of --workers 2 needs 256 "
        "images but .* holds 96; lower --batch-size to 48 or less",
    ):
        run_train(config_for(demo_data, tmp_path, batch_size=128), progress=False)
    with pytest.raises(
        TrainError,
        match=r"--effective-batch 4096 needs 128 batches of 16 per "
        r"worker and epoch, .*; use --effective-batch 96 or less \(a multiple of 32\)",
    ):
        run_train(
            config_for(demo_data, tmp_path, batch_size=16, effective_batch=4096), progress=False
        )
    with pytest.raises(TrainError, match="--gpa-loss-weight needs an MAE decoder"):
        config_for(demo_data, tmp_path, model="simmim-micro", gpa_loss_weight=1.0)
    with pytest.raises(TrainError, match="add --saliency-kind gpa"):
        config_for(demo_data, tmp_path, strategy="gpa", gpa_loss_weight=1.0)
    with pytest.raises(TrainError, match="--mask-unit must be a multiple of --patch-size 8"):
        config_for(demo_data, tmp_path, mask_unit=12)
    with pytest.raises(TrainError, match="--strategy-option: mask strategy 'amt' takes throw"):
        config_for(demo_data, tmp_path, strategy_options={"hint": 0.1})
    with pytest.raises(TrainError, match="--eval-every needs --val"):
        config_for(demo_data, tmp_path, eval_every=2)
    other = tmp_path / "two-classes"
    for name in ("a", "b"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(other / name / "0.png")
    ingest_folder(other, tmp_path / "val")
    with pytest.raises(EvalError, match=r"different class lists \(7 vs 2 classes"):
        run_train(config_for(demo_data, tmp_path, val=str(tmp_path / "val")), progress=False)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_gpa_target_refuses_a_store_of_another_kind(runs):
    """The store of the runs holds cls_attn maps: GPA's target is refused before any work."""
    config = replace(
        runs["straight_config"],
        run_dir=str(Path(runs["straight_config"].run_dir).parent / "gpa"),
        strategy="gpa",
        mask_ratio=None,
        throw_ratio=None,
        gpa_loss_weight=1.0,
        refresh_every=0,
    )
    with pytest.raises(TrainError, match="needs maps of kind gpa.*holds cls_attn"):
        run_train(config, progress=False)


# ---------------------------------------------------------------- schedule and loop, no Ray


def test_schedule_follows_amt():
    config = TrainConfig(data="d", store="s", epochs=400, warmup_epochs=40, refresh_every=40)
    assert [e for e in range(401) if refresh_due(config, e)] == list(range(40, 400, 40))
    assert uses_warmup_masking(config, 39, "gen-000001")
    assert uses_warmup_masking(config, 40, None)  # no generation yet: still random
    assert not uses_warmup_masking(config, 40, "gen-000001")
    random = replace(config, strategy="random", store=None)
    assert not refresh_due(random, 40) and not uses_warmup_masking(random, 0, None)


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # half-way down the cosine
    assert schedule(110) == schedule(500) == pytest.approx(0.1)  # stays at min past the end
    assert all(schedule(s) >= schedule(s + 1) for s in range(10, 120))
    for run in (schedule, WarmupCosine(1.0, 5, 10), WarmupCosine(2.0, 400, 0, 0.5)):
        steps = sum(run(s) for s in range(run.total_steps))  # the rates of the run, one by one
        assert run.total() == pytest.approx(steps, rel=0.02)


def test_loop_raises_on_a_loss_that_is_not_finite():
    from salient.pipeline.masking import plan_masks

    model = build_model("mae-micro", 32, 8)
    plan = plan_masks("random", torch.ones(2, 16), 0.75, generator=torch.Generator().manual_seed(0))
    images = torch.full((2, 3, 32, 32), float("nan"))
    batch = {
        "images": images,
        **plan._asdict(),
        "ids": torch.arange(2),
        "has_saliency": torch.zeros(2, dtype=torch.bool),
        "generation": None,
    }
    with pytest.raises(TrainError, match="loss is nan at step 1"):
        train_one_epoch(
            model,
            build_optimizer(model, 1e-3),
            WarmupCosine(1e-3, 1),
            [batch],
            epoch=0,
            step=0,
            device=torch.device("cpu"),
        )
