"""iBOT at the job level: its flags, one rank's schedule without Ray (online and store maps),
2 Ray Train workers with a kill and a resume, and eval / export of the EMA teacher.

- The flags: each ``TrainConfig`` iBOT setting reaches the built model's ``IBOTSettings``
  and the loader's views; cross-field refusals are one line naming the flags.
- One rank in a gloo group (``test_train_worker``'s style; refreshes run in this process):
  online masks (no store read, no random warm-up, the epoch says ``maps: online``), then
  the store source, whose refreshes read each checkpoint's EMA teacher, checked against the
  checkpoint's own teacher weights, not the student's.
- Ray Train, 2 workers: one fit runs a straight 2-epoch run and the same run stopped after
  epoch 1 (``stop_after_epochs``, as a kill there would); ``salient train --config FILE
  --resume`` finishes the stopped one through the CLI and the driver. Every step of the
  resumed run must equal the straight run's (loss and parameter checksum, teacher included).
- Eval: ``salient eval --baseline`` of an iBOT checkpoint probes the teacher and rebuilds the
  run's init through the family; checked against a timm ViT seeded as iBOT initialises it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train_worker import InProcessRefresh
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from salient.jobs.cli import main
from salient.jobs.eval.config import EvalConfig
from salient.jobs.eval.driver import initial_checkpoint, run_eval
from salient.jobs.train.config import TrainConfig, resolved
from salient.jobs.train.recipes import recipe_config
from salient.jobs.train.worker import _Worker
from salient.pipeline.loader_config import MultiCrop
from salient.store import SaliencyStore
from salient.trainer.checkpoint import unwrap_model
from salient.trainer.family import FAMILIES
from salient.trainer.specs import TrainError
from salient.trainer.teacher_load import load_teacher

CPU = torch.device("cpu")


def scaled(data: Path, root: Path, name: str = "attmask-ibot-high", **overrides) -> TrainConfig:
    """A recipe scaled to the 96-image demo set: micro ViT at 32 px, 2 local crops of 16 px."""
    fields = dict(
        data=str(data),
        run_dir=str(root / "run"),
        model="ibot-micro",
        image_size=32,
        patch_size=8,
        local_crops=2,
        local_size=16,
        out_dim=64,
        batch_size=16,
        effective_batch=None,
        epochs=3,
        lr_warmup_epochs=1,
        warmup_teacher_temp_epochs=2,
        loader_workers=0,
        refresh_batch_size=32,
        log_details=True,
    )
    return recipe_config(name, **{**fields, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ---------------------------------------------------------------- flags


def test_flags_reach_the_model_and_the_loaders_views():
    config = TrainConfig(
        data="d",
        model="ibot-micro",
        strategy="attmask_hint",
        image_size=32,
        patch_size=8,
        momentum_teacher=0.99,
        teacher_temp=0.05,
        warmup_teacher_temp_epochs=3,
        norm_last_layer=True,
        out_dim=32,
        drop_path=0.2,
        lambda1=0.5,
        lambda2=2.0,
        weight_decay=0.03,
        weight_decay_end=0.3,
        freeze_last_layer=2,
        local_crops=4,
        local_size=16,
        local_scale=[0.1, 0.3],  # a config file gives lists
        strategy_options={"hint_pool": 0.2},
    )
    # unset: iBOT's ratio, AdamW's betas, the online source, half the views at 0.3 ± 0.2
    assert (config.mask_ratio, config.throw_ratio, config.betas) == (0.3, 0.0, (0.9, 0.999))
    assert config.saliency_source == "online" and config.maps_from == "online"
    assert config.strategy_options == {"mask_prob": 0.5, "ratio_var": 0.2, "hint_pool": 0.2}
    assert not config.needs_saliency and not config.random_warmup and not config.refreshes
    family = FAMILIES["ibot"]
    model = family.build(**family.settings(config))
    s = model.settings
    assert (s.momentum_teacher, s.teacher_temp, s.warmup_teacher_temp_epochs) == (0.99, 0.05, 3)
    assert (s.norm_last_layer, s.drop_path, s.lambda1, s.lambda2) == (True, 0.2, 0.5, 2.0)
    assert (s.weight_decay, s.weight_decay_end, s.freeze_last_layer) == (0.03, 0.3, 2)
    assert (s.strategy, s.mask_ratio, s.strategy_options) == (
        "attmask_hint",
        0.3,
        config.strategy_options,
    )
    assert model.decoder_kwargs["out_dim"] == 32 and model.centers.cls.shape[-1] == 32
    head_norm = model.student["head"].last_layer.parametrizations.weight.original0
    assert not head_norm.requires_grad  # norm_last_layer
    views = config.loader_config().views
    assert views == MultiCrop(
        local_crops=4, local_size=16, local_scale=(0.1, 0.3), masks_online=True
    )
    assert config.loader_config().store is None  # online maps read no store
    stored = replace(config, store="s.zarr", saliency_source="store")
    assert stored.needs_saliency and stored.maps_from == "store" and stored.refreshes
    assert not stored.loader_config().views.masks_online and stored.loader_config().store
    assert not stored.random_warmup  # iBOT masks on its own schedule from the first epoch
    mae = TrainConfig(data="d", model="mae-micro", strategy="random", image_size=32, patch_size=8)
    assert mae.saliency_source == "store" and mae.betas == (0.9, 0.95) and mae.maps_from is None
    assert mae.loader_config().views is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"throw_ratio": 0.2}, r"set --throw-ratio 0 and drop --mask-unit"),
        ({"mask_unit": 16}, r"set --throw-ratio 0 and drop --mask-unit"),
        ({"local_size": 12}, r"--local-size 12 is not a multiple of --patch-size 8"),
        ({"local_scale": (0.3, 0.1)}, r"--local-scale must satisfy"),
        (
            {"saliency_source": "store"},
            r"--strategy attmask_high needs saliency maps: give --store",
        ),
        ({"saliency_source": "disk"}, r"unknown --saliency-source 'disk'"),
        ({"strategy_options": {"hint": 0.1}}, r"mask strategy 'attmask_high' takes"),
        ({"strategy_options": {"mask_prob": 2.0}}, r"mask_prob"),
        (
            {"model": "mae-micro", "strategy": "random"},
            r"--momentum-teacher, --teacher-temp: iBOT settings, but this run trains mae",
        ),
    ],
)
def test_bad_ibot_settings_are_one_line_errors(overrides, match):
    base = dict(data="d", model="ibot-micro", strategy="attmask_high", image_size=32, patch_size=8)
    if overrides.get("model") == "mae-micro":  # iBOT flags given to an MAE run
        base.update(momentum_teacher=0.99, teacher_temp=0.05)
    with pytest.raises(TrainError, match=match) as caught:
        TrainConfig(**{**base, **overrides})
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_the_online_source_is_ibots_only():
    with pytest.raises(TrainError, match=r"--saliency-source online: iBOT settings.*mae"):
        TrainConfig(data="d", model="mae-micro", strategy="random", saliency_source="online")


# ---------------------------------------------------------------- one rank, no Ray


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_one_rank(config: TrainConfig) -> tuple[list[dict], InProcessRefresh, _Worker]:
    Path(config.run_dir).mkdir(parents=True)
    Path(config.run_dir, "metrics.jsonl").touch()
    launcher, reports = InProcessRefresh(config), []
    args = {"config": config, "launch_refresh": launcher, "progress": False, "run_id": "t"}
    worker = _Worker(args, 0, 1, CPU, reports.append)
    try:
        worker.run()
    finally:
        worker.close()
    return reports, launcher, worker


def test_one_rank_online_masks_from_the_first_step_read_no_store(demo_data, tmp_path, one_rank):
    config = scaled(demo_data, tmp_path, store=str(tmp_path / "never.zarr"), epochs=2)
    reports, launcher, worker = run_one_rank(config)
    assert [r["strategy"] for r in reports] == ["attmask_high"] * 2  # no random warm-up
    assert [r["maps"] for r in reports] == ["online"] * 2
    assert all(r["saliency_share"] is None and r["generation"] is None for r in reports)
    assert launcher.teachers == [] and not Path(config.store).exists()
    steps = read_jsonl(Path(config.run_dir, "metrics", "rank-0.jsonl"))
    assert len(steps) == 2 * 6 and all(math.isfinite(s["loss_cls"]) for s in steps)
    assert all(0 < s["masked"] < 0.5 for s in steps)  # half the views, ratio within 0.1-0.5
    epochs = [r for r in read_jsonl(Path(config.run_dir, "metrics.jsonl")) if r["kind"] == "epoch"]
    assert [e["maps"] for e in epochs] == ["online", "online"]
    ckpt = torch.load(Path(config.run_dir, "checkpoint-00002.pt"), weights_only=True)
    teacher = unwrap_model(worker.model).teacher.module["backbone"].state_dict()
    assert all(torch.equal(ckpt["encoder"][k], teacher[k]) for k in teacher)
    assert Path(config.run_dir, "encoder-00002", "model.safetensors").is_file()


def test_one_rank_store_maps_are_refreshed_from_the_ema_teacher(demo_data, tmp_path, one_rank):
    config = scaled(demo_data, tmp_path, store=str(tmp_path / "maps.zarr"), saliency_source="store")
    reports, launcher, _ = run_one_rank(config)
    assert launcher.teachers == ["checkpoint-00001.pt", "checkpoint-00002.pt"]
    assert [r["generation"] for r in reports] == [None, "gen-000001", "gen-000002"]
    # before the first generation: the recipe's own masks, from the loader at random (no
    # warm-up loader at 0.75), every sample a fallback; then every sample has a map
    assert [r["strategy"] for r in reports] == ["attmask_high"] * 3
    assert [r["mask_ratio"] for r in reports] == [0.3] * 3
    assert [r["saliency_share"] for r in reports] == [0.0, 1.0, 1.0]
    assert reports[0]["fallback"] == 96 and reports[1]["fallback"] == 0
    assert [r["maps"] for r in reports] == ["store"] * 3
    store = SaliencyStore.open(config.store)
    for generation, name in zip(store.generations(), launcher.teachers):
        path = Path(config.run_dir, name)
        assert generation["teacher"]["path"] == str(path)
        saved = torch.load(path, weights_only=True)["model"]
        refreshed = load_teacher(str(path), image_size=32).model.state_dict()
        teacher = {k: saved[f"teacher.module.backbone.{k}"] for k in refreshed}
        student = {k: saved[f"student.backbone.{k}"] for k in refreshed}
        assert all(torch.equal(refreshed[k], teacher[k]) for k in refreshed)
        assert not all(torch.equal(refreshed[k], student[k]) for k in refreshed)


# ---------------------------------------------------------------- Ray Train: 2 workers


def _run_all(args: dict) -> None:
    """Each Ray Train worker: the straight run, then the stopped one (shipped by value)."""
    from salient.jobs.train.worker import train_loop_per_worker

    for run in args["runs"]:
        train_loop_per_worker(run)


@pytest.fixture(scope="module")
def ray_runs(ray_session, demo_data, tmp_path_factory) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = tmp_path_factory.mktemp("ibot-ray")
    config = scaled(demo_data, root, workers=2, batch_size=8, epochs=2, run_dir=str(root / "a"))
    straight = resolved(config)
    stopped = resolved(replace(config, run_dir=str(root / "b"), stop_after_epochs=1))
    for run in (straight, stopped):
        Path(run.run_dir).mkdir()
    runs = [
        {"config": c, "launch_refresh": None, "progress": False, "run_id": c.run_dir[-1]}
        for c in (straight, stopped)
    ]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        _run_all,
        train_loop_config={"runs": runs},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ibot", storage_path=str(root / "ray")),
    ).fit()
    after_stop = sorted(p.name for p in Path(stopped.run_dir).glob("checkpoint-*.pt"))
    # the stopped run resumes through the CLI, its settings read back from a config file
    settings = root / "stopped.json"
    plain = {**stopped.as_dict(), "stop_after_epochs": None}
    settings.write_text(json.dumps(plain))
    code = main(["train", "--config", str(settings), "--resume"])
    return {"straight": straight, "stopped": stopped, "after_stop": after_stop, "code": code}


def _steps(run: TrainConfig, rank: int) -> list[dict]:
    return read_jsonl(Path(run.run_dir, "metrics", f"rank-{rank}.jsonl"))


def test_two_workers_keep_one_model_and_teacher(ray_runs):
    straight = ray_runs["straight"]
    rank0, rank1 = _steps(straight, 0), _steps(straight, 1)
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == list(range(1, 13))
    # the checksum covers every parameter, the EMA teacher's too
    assert [s["checksum"] for s in rank0] == [s["checksum"] for s in rank1]
    first = [{i for s in steps if s["epoch"] == 0 for i in s["ids"]} for steps in (rank0, rank1)]
    assert len(first[0]) == len(first[1]) == 48 and not first[0] & first[1]
    ckpt = torch.load(Path(straight.run_dir, "checkpoint-00002.pt"), weights_only=True)
    assert all(
        torch.equal(value, ckpt["model"][f"teacher.module.backbone.{key}"])
        for key, value in ckpt["encoder"].items()
    )
    assert tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.999)  # AdamW's


def test_a_run_killed_after_epoch_one_resumes_with_identical_steps(ray_runs):
    straight, stopped = ray_runs["straight"], ray_runs["stopped"]
    assert ray_runs["after_stop"] == ["checkpoint-00001.pt"] and ray_runs["code"] == 0
    for rank in (0, 1):
        ref, resumed = _steps(straight, rank), _steps(stopped, rank)
        assert [s["step"] for s in resumed] == list(range(1, 13))
        for a, b in zip(ref, resumed):
            assert (a["ids"], a["loss"], a["checksum"]) == (b["ids"], b["loss"], b["checksum"])
    records = read_jsonl(Path(stopped.run_dir, "metrics.jsonl"))
    starts = [r for r in records if r["kind"] == "start"]
    assert [Path(s["from"]).name if s["from"] else None for s in starts] == [
        None,
        "checkpoint-00001.pt",
    ]
    assert [r["maps"] for r in records if r["kind"] == "epoch"] == ["online", "online"]


# ---------------------------------------------------------------- eval and export


def test_eval_probes_the_teacher_and_its_baseline_is_the_runs_init(
    ray_runs, demo_data, demo_val, tmp_path
):
    checkpoint = Path(ray_runs["straight"].run_dir, "checkpoint-00002.pt")
    ckpt = torch.load(checkpoint, weights_only=True)
    init = torch.load(initial_checkpoint(str(checkpoint), tmp_path), weights_only=True)
    torch.manual_seed(0)  # the run's seed, as iBOT's student is initialised
    fresh = VisionTransformer(**ckpt["encoder_kwargs"], drop_path_rate=0.1)
    trunc_normal_(fresh.cls_token, std=0.02)
    assert all(torch.equal(init["encoder"][k], v) for k, v in fresh.state_dict().items())
    assert not all(torch.equal(init["encoder"][k], ckpt["encoder"][k]) for k in init["encoder"])
    # eval loads the teacher's backbone: the exported encoder holds the same weights
    from safetensors.torch import load_file

    exported = load_file(checkpoint.parent / "encoder-00002" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ckpt["encoder"].items())
    config = EvalConfig(
        checkpoint=str(checkpoint),
        data=str(demo_data),
        val=str(demo_val),
        out=str(tmp_path / "eval"),
        baseline=True,
        knn=True,
        workers=1,
        cpus_per_worker=0.5,
        batch_size=32,
        k=5,
    )
    summary = run_eval(config)
    assert 0 <= summary["knn"]["cls"]["top1"] <= 100
    assert 0 <= summary["baseline"]["knn"]["cls"]["top1"] <= 100
