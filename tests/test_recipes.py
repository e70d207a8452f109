"""Recipes: each resolves to its paper's numbers, and each trains one tiny epoch.

The paper table below is written from the sources, not from ``jobs/train/recipes.py``. The tiny runs
shrink every recipe (micro model, 64 px images of 8 px patches, 8 images per worker, one
epoch, no refresh, two batches accumulated per step; iBOT: 2 local crops of 16 px, a 64-d
head; AutoMAE: a store of 3-head maps) and run all of them through the real worker
loop (``salient.jobs.train.worker.train_loop_per_worker``: loaders, DDP over gloo on 2 Ray Train workers,
checkpoints, JSONL logs) inside ONE ``TorchTrainer.fit`` (each fit costs ~20 s here): the
test's runner is shipped to the workers by value (``register_pickle_by_value``), and the
driver's own checks (``train._check_inputs``) run for each config first.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from salient.jobs.train.driver import TrainError
from salient.jobs.train.recipes import RECIPES, recipe_config, recipe_names, resolve_recipe
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore

# AttMask's README "Full ImageNet-1k pre-training", ViT-S/16 100 epochs, and the defaults of
# its main_attmask.py where the command is silent
IBOT_100 = {
    "model": ("ibot-small", "AttMask README: --arch vit_small, patch 16"),
    "epochs": (100, "AttMask README: --epochs 100"),
    "effective_batch": (240, "AttMask README: --nproc_per_node=4 --batch_size_per_gpu 60"),
    "batch_size": (60, "AttMask README: --batch_size_per_gpu 60"),
    "blr": (5e-4, "main_attmask.py --lr 0.0005, scaled by batch / 256"),
    "min_lr": (1e-6, "main_attmask.py --min_lr 1e-6"),
    "lr_warmup_epochs": (10, "main_attmask.py --warmup_epochs 10"),
    "warmup_epochs": (0, "main_attmask.py --pred_start_epoch 0"),
    "weight_decay": (0.04, "main_attmask.py --weight_decay 0.04"),
    "weight_decay_end": (0.4, "main_attmask.py --weight_decay_end 0.4"),
    "betas": ((0.9, 0.999), "main_attmask.py: torch.optim.AdamW defaults"),
    "clip_grad": (3.0, "main_attmask.py --clip_grad 3.0"),
    "freeze_last_layer": (1, "main_attmask.py --freeze_last_layer 1"),
    "drop_path": (0.1, "main_attmask.py --drop_path 0.1"),
    "norm_last_layer": (False, "AttMask README: --norm_last_layer False"),
    "momentum_teacher": (0.996, "AttMask README: --momentum_teacher 0.996"),
    "teacher_temp": (0.07, "AttMask README: --teacher_temp 0.07"),
    "warmup_teacher_temp": (0.04, "main_attmask.py --warmup_teacher_temp 0.04"),
    "warmup_teacher_temp_epochs": (30, "AttMask README: --warmup_teacher_temp_epochs 30"),
    "teacher_patch_temp": (0.07, "main_attmask.py --teacher_patch_temp 0.07"),
    "warmup_teacher_patch_temp": (0.04, "main_attmask.py --warmup_teacher_patch_temp 0.04"),
    "lambda1": (1.0, "main_attmask.py --lambda1 1.0"),
    "lambda2": (1.0, "main_attmask.py --lambda2 1.0"),
    "out_dim": (8192, "AttMask README: --out_dim 8192"),
    "crop_scale": ((0.25, 1.0), "AttMask README: --global_crops_scale 0.25 1"),
    "local_crops": (10, "AttMask README: --local_crops_number 10"),
    "local_size": (96, "main_attmask.py: RandomResizedCrop(96, ...)"),
    "local_scale": ((0.05, 0.25), "AttMask README: --local_crops_scale 0.05 0.25"),
    "image_size": (224, "main_attmask.py: RandomResizedCrop(224, ...)"),
    "mask_ratio": (0.3, "AttMask README: --pred_ratio 0.3"),
    "throw_ratio": (0.0, "iBOT encodes every token"),
}

# recipe -> {field: (value, source)}: the papers' numbers
PAPERS = {
    "mae": {
        "model": ("mae-base", "MAE: ViT-B/16, 512-d 8-block decoder"),
        "strategy": ("random", "MAE Sec. 3: random sampling"),
        "mask_ratio": (0.75, "MAE Sec. 4, Fig. 5; PRETRAIN.md --mask_ratio 0.75"),
        "epochs": (800, "MAE PRETRAIN.md --epochs 800"),
        "lr_warmup_epochs": (40, "MAE PRETRAIN.md --warmup_epochs 40"),
        "blr": (1.5e-4, "MAE PRETRAIN.md --blr 1.5e-4"),
        "effective_batch": (4096, "MAE PRETRAIN.md: 64 x 8 nodes x 8 GPUs"),
        "weight_decay": (0.05, "MAE PRETRAIN.md --weight_decay 0.05"),
        "betas": ((0.9, 0.95), "MAE main_pretrain.py AdamW betas"),
        "norm_pix_loss": (True, "MAE PRETRAIN.md --norm_pix_loss"),
        "crop_scale": ((0.2, 1.0), "MAE main_pretrain.py RandomResizedCrop scale"),
        "interpolation": ("bicubic", "MAE main_pretrain.py interpolation=3"),
        "clip_grad": (None, "MAE engine_pretrain.py: no clipping"),
    },
    "amt-mae": {
        "model": ("mae-base", "AMT Sec. 4.1: ViT-B/16, MAE's 8-block decoder"),
        "strategy": ("amt", "AMT Alg. 1"),
        "mask_ratio": (0.45, "AMT Sec. 4.1: r = 0.45 with MAE"),
        "throw_ratio": (0.40, "AMT Sec. 4.1: t = 0.4 with MAE"),
        "epochs": (400, "AMT Sec. 4.1: MAE for 400 epochs"),
        "refresh_every": (40, "AMT Sec. 3.2: updated every 40 epochs"),
        "warmup_epochs": (40, "AMT code: random masking until epoch 40"),
        "warmup_mask_ratio": (0.75, "AMT code: random_masking(mask_ratio=0.75)"),
        "saliency_reduce": ("minmax_mean", "AMT code update_mask: per-head min-max, mean"),
        "effective_batch": (4096, "AMT README: 4 GPUs x 128 x accum 8"),
        "blr": (1.5e-4, "AMT README --blr 1.5e-4"),
        "interpolation": ("bicubic", "AMT code maskRandomResizedCrop interpolation=3"),
    },
    "simmim": {
        "model": ("simmim-base", "SimMIM ViT-B config"),
        "strategy": ("random", "SimMIM: random masking"),
        "mask_ratio": (0.6, "SimMIM config MASK_RATIO 0.6; AMT Table 1"),
        "mask_unit": (32, "SimMIM config MASK_PATCH_SIZE 32"),
        "epochs": (800, "SimMIM ViT-B config EPOCHS 800"),
        "lr_warmup_epochs": (10, "SimMIM config WARMUP_EPOCHS 10"),
        "blr": (5e-5, "SimMIM BASE_LR 1e-4 per 512 images"),
        "effective_batch": (2048, "SimMIM README: 16 GPUs x 128"),
        "betas": ((0.9, 0.999), "SimMIM config.py OPTIMIZER.BETAS"),
        "clip_grad": (5.0, "SimMIM config.py CLIP_GRAD 5.0"),
        "crop_scale": ((0.67, 1.0), "SimMIM data_simmim.py RandomResizedCrop scale"),
    },
    "amt-simmim": {
        "model": ("simmim-base", "AMT Sec. 4.1: ViT-B/16, linear head"),
        "strategy": ("amt", "AMT Alg. 1"),
        "mask_ratio": (0.44, "AMT Sec. 4.1: r = 0.44 with SimMIM"),
        "throw_ratio": (0.26, "AMT Sec. 4.1: t = 0.26 with SimMIM"),
        "mask_unit": (32, "AMT SimMIM config MASK_PATCH_SIZE 32"),
        "epochs": (200, "AMT Sec. 4.1: SimMIM for 200 epochs"),
        "refresh_every": (40, "AMT Sec. 4.1: interval 40 epochs"),
        "warmup_epochs": (40, "AMT SimMIM config AMT_START_EPOCH 40"),
        "warmup_mask_ratio": (0.44, "AMT SimMIM maskgenerate: random at MASK_RATIO"),
        "saliency_reduce": ("minmax_mean", "AMT SimMIM utils.update_mask"),
        "lr_warmup_epochs": (10, "AMT SimMIM config WARMUP_EPOCHS 10"),
    },
    "attmask-mae": {
        "strategy": ("attmask_high", "AttMask Table 1: AttMask-High"),
        "mask_ratio": (0.3, "AttMask code: pred_ratio 0.3"),
        "strategy_options": (
            {"mask_prob": 0.5, "ratio_var": 0.2},
            "AttMask code: masking_prob 0.5, pred_ratio_var 0.2 (U(0.1, 0.5) per batch)",
        ),
        "saliency_reduce": ("mean", "AttMask code: CLS attention .mean(1) over heads"),
        "warmup_epochs": (0, "AttMask code: pred_start_epoch 0"),
    },
    "ibot": {
        **IBOT_100,
        "strategy": ("block", "iBOT main_ibot.py --pred_shape block (its default)"),
        "strategy_options": (
            {"mask_prob": 0.5, "ratio_var": 0.2},
            "iBOT README ViT-S: --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 (half the images)",
        ),
    },
    "attmask-ibot-high": {
        **IBOT_100,
        "strategy": ("attmask_high", "AttMask README: --pred_shape attmask_high"),
        "strategy_options": (
            {"mask_prob": 0.5, "ratio_var": 0.2},
            "AttMask README: --masking_prob 0.5 --pred_ratio_var 0.2",
        ),
        "saliency_source": ("online", "AttMask main_attmask.py: the teacher's attention"),
        "saliency_reduce": ("mean", "AttMask main_attmask.py: [:, :, 0, 1:].mean(1)"),
    },
    "attmask-ibot-hint": {
        **IBOT_100,
        "strategy": ("attmask_hint", "AttMask README: --pred_shape attmask_hint"),
        "strategy_options": (
            {"mask_prob": 0.5, "ratio_var": 0.2, "hint_pool": 0.1},
            "AttMask README: --masking_prob 0.5 --pred_ratio_var 0.2 --show_max 0.1",
        ),
        "saliency_source": ("online", "AttMask main_attmask.py: the teacher's attention"),
    },
    "gpa-mae": {
        "strategy": ("gpa", "GPA Sec. 3.2"),
        "mask_ratio": (0.75, "GPA Sec. 4.1: alpha = 0.75"),
        "strategy_options": (
            {"hard": (0.0, 0.5), "soft": (0.5, 0.0)},
            "GPA Sec. 4.1 defaults, Tables 3-4",
        ),
        "gpa_loss_weight": (1.0, "GPA eq. 8: L_RGB + L_GPA"),
        "epochs": (200, "GPA Sec. 4: 200 epochs"),
        "blr": (1.5e-4, "GPA Sec. 4: learning rate 1.5e-4"),
        "effective_batch": (4096, "GPA Sec. 4: batch size 4096"),
        "lr_warmup_epochs": (20, "GPA README --warmup_epochs 20"),
        "saliency_kind": ("gpa", "GPA eq. 4-5"),
        "refresh_every": (0, "GPA: a frozen pretrained MAE teacher"),
    },
    "automae": {
        "family": ("automae", "AutoMAE: a learned mask generator on an MAE"),
        "model": ("mae-base", "AutoMAE run_pretrain.sh --model mae_vit_base_patch16"),
        "mask_ratio": (0.75, "AutoMAE run_pretrain.sh --mask_ratio 0.75"),
        "throw_ratio": (0.0, "AutoMAE models_mae.py: keeps or masks, throws nothing"),
        "epochs": (800, "AutoMAE run_pretrain.sh --epochs 800"),
        "lr_warmup_epochs": (40, "AutoMAE run_pretrain.sh --warmup_epochs 40"),
        "blr": (1.5e-4, "AutoMAE run_pretrain.sh --blr 1.5e-4"),
        "effective_batch": (4096, "AutoMAE run_pretrain.sh: 64 x 8 GPUs x --accum_iter 8"),
        "weight_decay": (0.05, "AutoMAE run_pretrain.sh --weight_decay 0.05"),
        "betas": ((0.9, 0.95), "AutoMAE main_pretrain.py AdamW betas"),
        "norm_pix_loss": (True, "AutoMAE run_pretrain.sh --norm_pix_loss"),
        "crop_scale": ((0.2, 1.0), "AutoMAE main_pretrain.py RandomResizedCrop scale"),
        "interpolation": ("bicubic", "AutoMAE main_pretrain.py InterpolationMode.BICUBIC"),
        "mask_factor": (0.5, "AutoMAE main_pretrain.py --mask_factor 0.5"),
        "loss_g_factor": (0.2, "AutoMAE main_pretrain.py --loss_g_factor 0.2"),
        "saliency_kind": ("heads", "AutoMAE engine_pretrain.py: every head's CLS row"),
        "refresh_every": (0, "AutoMAE: a frozen pretrained MAE teacher (MAE-800)"),
        "seed": (0, "AutoMAE main_pretrain.py --seed 0"),
    },
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_recipe_values_are_the_papers(name):
    recipe = resolve_recipe(name)
    for field, (value, source) in PAPERS[name].items():
        assert recipe[field] == value, (
            f"{name}.{field}: {recipe[field]!r}, paper {value!r} ({source})"
        )
    config = recipe_config(name, data="d", store="s", workers=4)
    assert (config.mask_ratio, config.throw_ratio) == (recipe["mask_ratio"], recipe["throw_ratio"])
    assert config.global_batch == recipe["effective_batch"]  # any worker count that divides it


def test_recipes_resolve_on_the_papers_hardware():
    amt = recipe_config("amt-mae", data="d", store="s", workers=4)  # AMT: 4 GPUs
    assert (amt.batch_size, amt.accum_steps, amt.global_batch) == (128, 8, 4096)  # its README
    assert amt.base_lr == pytest.approx(1.5e-4 * 4096 / 256)  # MAE's rule on the full batch
    gpa = recipe_config("gpa-mae", data="d", store="s", workers=2)  # GPA: 2 x RTX 3090
    assert gpa.accum_steps == 16  # its README: --batch_size 128 --accum_iter 16
    simmim = recipe_config("amt-simmim", data="d", store="s", workers=16)
    assert simmim.unit == 2 and simmim.accum_steps == 1 and simmim.base_lr == pytest.approx(4e-4)
    attmask = recipe_config("attmask-ibot-hint", data="d", workers=4)  # AttMask: 4 GPUs
    assert (attmask.batch_size, attmask.accum_steps, attmask.global_batch) == (60, 1, 240)
    assert attmask.base_lr == pytest.approx(5e-4 * 240 / 256)  # main_attmask.py's rule
    with pytest.raises(TrainError, match="--effective-batch 4096 is not a multiple"):
        recipe_config("mae", data="d", workers=3)
    with pytest.raises(TrainError, match="--accum-iter 2 gives 256 images per step"):
        recipe_config("amt-mae", data="d", store="s", accum_iter=2)
    with pytest.raises(TrainError, match="unknown --recipe 'amt'; choose one of mae, amt-mae"):
        resolve_recipe("amt")
    assert recipe_names() == tuple(RECIPES) and set(RECIPES) == set(PAPERS)


def test_flags_override_a_recipe_and_the_config_shows_resolved_values():
    config = recipe_config("amt-mae", data="d", store="s", epochs=10, throw_ratio=0.3)
    assert (config.epochs, config.throw_ratio, config.mask_ratio) == (10, 0.3, 0.45)
    plain = json.loads(json.dumps(config.as_dict()))  # what config.json holds
    # the effective batch is kept, not the accumulation it gives on this many workers, so the
    # same config.json run on 4 workers still steps on 4096 images
    assert plain["mask_ratio"] == 0.45 and plain["effective_batch"] == 4096
    assert plain["accum_iter"] is None and config.accum_steps == 32
    gpa = json.loads(
        json.dumps(replace(config, strategy="gpa", mask_ratio=None, throw_ratio=None).as_dict())
    )
    assert gpa["mask_ratio"] == 0.75  # a strategy's paper ratio, resolved and recorded


# ---------------------------------------------------------------- one tiny epoch of each


STORE_GRID, SOURCE = 12, 96  # the demo set's 96 px scenes
TEACHER_HEADS = 3  # the heads store's (mae-micro has 2): AutoMAE's generator takes the maps'


def blob_maps(n: int) -> np.ndarray:
    """A smooth blob per image, in [0, 1]: enough structure for every strategy."""
    yy, xx = np.mgrid[0:STORE_GRID, 0:STORE_GRID] / STORE_GRID
    centres = np.random.default_rng(0).uniform(0.2, 0.8, (n, 2))
    d2 = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
    return np.exp(-d2 / 0.05).astype(np.float32)


def make_store(path: Path, data: Path, kind: str) -> str:
    dataset = open_dataset(data)
    store = SaliencyStore.create(str(path), dataset, grid=STORE_GRID)
    teacher = {"path": "blobs", "sha256": "0" * 64, "name": "blobs", "epoch": 0, "kind": kind}
    teacher.update(image_size=SOURCE, patch_size=8, block=-1, head=None, reduce="minmax_mean")
    heads = TEACHER_HEADS if kind == "heads" else None
    writer = store.begin_generation(teacher, kind, image_size=SOURCE, patch_size=8, heads=heads)
    maps = blob_maps(dataset.num_samples)
    for shard in dataset.shards:
        rows = slice(shard.first_id, shard.stop_id)
        head_maps = None
        if heads:  # softmax-like rows, one blob per head at its own sharpness
            blobs = maps[rows, None] ** np.arange(1, heads + 1)[None, :, None, None]
            head_maps = (blobs / blobs.sum((2, 3), keepdims=True)).astype(np.float16)
        valid = np.ones(shard.count, "u1")
        writer.write_shard(shard.index, maps[rows].astype(np.float16), valid, head_maps)
    writer.publish()
    return writer.name


def store_kind(recipe: dict) -> str:
    """The kind of maps a recipe's tiny run reads."""
    if recipe.get("family") == "automae":
        return "heads"
    return "gpa" if recipe.get("gpa_loss_weight") else "cls_attn"


def tiny(name: str, data: Path, root: Path, stores: dict):
    recipe = resolve_recipe(name)
    reads_store = recipe["strategy"] not in ("random", "block")
    needs_store = reads_store and recipe.get("saliency_source") != "online"
    needs_store = needs_store or recipe.get("family") == "automae"  # its per-head maps
    ibot = {"local_crops": 2, "local_size": 16, "out_dim": 64} if "local_crops" in recipe else {}
    return recipe_config(
        name,
        data=str(data),
        store=str(stores[store_kind(recipe)]) if needs_store else None,
        run_dir=str(root / name),
        model=recipe["model"].replace("-base", "-micro").replace("-small", "-micro"),
        image_size=64,
        patch_size=8,
        mask_unit=16 if recipe["mask_unit"] else None,  # 2 x 2 patches, as SimMIM's 32 / 16
        batch_size=8,
        workers=2,
        effective_batch=None,
        accum_iter=2,  # 6 batches per rank: 3 optimiser steps
        epochs=1,
        warmup_epochs=0,  # the recipe's masking from the first step (the store is ready)
        lr_warmup_epochs=0,
        refresh_every=0,
        loader_workers=0,
        log_details=True,
        **ibot,  # iBOT: 2 local crops of 16 px beside the 64 px global ones, a 64-d head
    )


def _run_all(args: dict) -> None:
    """Each Ray Train worker: every tiny recipe run, one after the other (shipped by value)."""
    from salient.jobs.train.worker import train_loop_per_worker

    for run in args["runs"]:
        train_loop_per_worker(run)


@pytest.fixture(scope="module")
def tiny_runs(ray_session, demo_data, tmp_path_factory) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from salient.jobs.train.config import resolved
    from salient.jobs.train.driver import _check_inputs, _with_map_heads

    root = tmp_path_factory.mktemp("recipes")
    stores = {kind: root / f"{kind}.zarr" for kind in ("cls_attn", "gpa", "heads")}
    generations = {kind: make_store(path, demo_data, kind) for kind, path in stores.items()}
    configs = {name: resolved(tiny(name, demo_data, root, stores)) for name in RECIPES}
    for name, config in configs.items():
        assert _check_inputs(config)[0] is None  # the driver's checks pass: a fresh run
        configs[name] = _with_map_heads(config)  # AutoMAE's heads, read as run_train does
    runs = [{"config": c, "resume_from": None, "launch_refresh": None} for c in configs.values()]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        _run_all,
        train_loop_config={"runs": runs},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="recipes", storage_path=str(root / "ray")),
    ).fit()
    return {"configs": configs, "generations": generations}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_trains_one_tiny_epoch(tiny_runs, name):
    config = tiny_runs["configs"][name]
    run_dir = Path(config.run_dir)
    [epoch] = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epoch["epochs_done"] == 1 and epoch["step"] == 3  # 6 batches, 2 per step
    assert epoch["strategy"] == config.strategy and math.isfinite(epoch["loss"])
    assert (epoch["mask_ratio"], epoch["throw_ratio"]) == (config.mask_ratio, config.throw_ratio)
    assert epoch["maps"] == config.maps_from  # AttMask on iBOT: "online", its teacher's in the step
    if config.reads_store:  # the recipe's own masking (AutoMAE's maps), from the store's maps
        kind = store_kind(resolve_recipe(name))
        assert epoch["generation"] == tiny_runs["generations"][kind]
        assert epoch["saliency_share"] == 1.0
    for rank in (0, 1):
        steps = read_jsonl(run_dir / "metrics" / f"rank-{rank}.jsonl")
        assert [s["images"] for s in steps] == [16, 16, 16]  # two batches of 8 per step
    ckpt = torch.load(run_dir / "checkpoint-00001.pt", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == config.betas  # SimMIM's 0.999, MAE's 0.95
    assert ckpt["scheduler"]["base_lr"] == pytest.approx(config.blr * 2 * 8 * 2 / 256)
    assert ckpt["decoder_kwargs"].get("gpa_head", False) == (config.gpa_loss_weight > 0)
    assert (config.unit == 2) == (name in ("simmim", "amt-simmim"))
    if config.framework == "automae":  # its generator on the store's 3 heads, D's optimiser
        assert ckpt["decoder_kwargs"]["generator_heads"] == TEACHER_HEADS
        assert ckpt["hooks"]["optimizer_d"]["state"]
        for key in ("loss_rec", "loss_g", "loss_d_real", "loss_d_fake"):
            assert math.isfinite(epoch[key])
    assert (ckpt["decoder_kwargs"].get("kind") == "ibot") == name.startswith(
        ("ibot", "attmask-ibot")
    )


# ---------------------------------------------------------------- recipes that scale


def test_a_shorter_run_keeps_the_recipes_schedule_as_shares_of_it():
    amt = recipe_config("amt-mae", data="d", store="s", epochs=4)  # AMT: 400, 40, 40, 40
    assert (amt.warmup_epochs, amt.lr_warmup_epochs, amt.refresh_every) == (1, 1, 1)
    half = recipe_config("amt-mae", data="d", store="s", epochs=200)
    assert (half.warmup_epochs, half.lr_warmup_epochs, half.refresh_every) == (20, 20, 20)
    mae = recipe_config("mae", data="d", epochs=100, workers=4)  # MAE: 800 epochs, lr warmup 40
    assert mae.lr_warmup_epochs == 5 and mae.refresh_every == 0  # 0 stays 0
    # what the user gives is kept; a longer run keeps the paper's epochs (MAE's 1600-epoch run)
    given = recipe_config("amt-mae", data="d", store="s", epochs=4, lr_warmup_epochs=2)
    assert (given.lr_warmup_epochs, given.warmup_epochs) == (2, 1)
    longer = recipe_config("amt-mae", data="d", store="s", epochs=800)
    assert (longer.warmup_epochs, longer.lr_warmup_epochs, longer.refresh_every) == (40, 40, 40)
    assert not amt.schedule_warnings()


def test_a_smaller_effective_batch_sets_the_batch_per_worker():
    small = recipe_config("amt-mae", data="d", store="s", effective_batch=8)  # recipe: 128
    assert (small.batch_size, small.accum_steps, small.global_batch) == (8, 1, 8)
    two = recipe_config("amt-mae", data="d", store="s", effective_batch=64, workers=2)
    assert (two.batch_size, two.accum_steps) == (32, 1)
    with pytest.raises(
        TrainError, match=r"smaller than one pass .*\(16 × 1 = 16\); set --batch-size 8"
    ):
        recipe_config("amt-mae", data="d", store="s", effective_batch=8, batch_size=16)


def test_the_cli_scales_a_recipe_under_flags_and_config_files(tmp_path, capsys):
    from salient.jobs.cli import main

    base = ["train", "--recipe", "amt-mae", "--data", "d", "--store", "s", "--print-config"]
    assert main([*base, "--epochs", "4", "--effective-batch", "8"]) == 0
    body = json.loads(capsys.readouterr().out)
    fields = ("epochs", "warmup_epochs", "lr_warmup_epochs", "refresh_every", "batch_size")
    assert [body[f] for f in fields] == [4, 1, 1, 1, 8]
    (tmp_path / "c.yaml").write_text("epochs: 40\nrefresh_every: 2\n")  # a file counts as given
    assert main([*base, "--config", str(tmp_path / "c.yaml")]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [body[f] for f in fields] == [40, 4, 4, 2, 128]


def test_schedule_warnings_name_the_flag():
    from salient.jobs.train.config import TrainConfig

    config = TrainConfig(data="d", store="s", epochs=4)  # the defaults: AMT's 40-epoch warmups
    lr, masking = config.schedule_warnings()
    assert lr.startswith("--lr-warmup-epochs 40 is longer than --epochs 4") and "10%" in lr
    assert "--strategy amt is never used; lower --warmup-epochs" in masking
    assert (
        TrainConfig(data="d", strategy="random", epochs=4, warmup_epochs=4).schedule_warnings()
        == []
    )


def test_the_scaled_down_recipe_trains_its_encoder(demo_data, demo_val, tmp_path, capsys):
    """`salient train --recipe amt-mae --epochs 4 --warmup-epochs 1 --effective-batch 8` on a
    small set: AMT takes over after one epoch of random masking, refreshed every epoch, the lr
    warms up for one epoch; MAE's lr rule on 8 images a step cannot move the weights, which
    the run says, naming --blr; with the --blr it asks for, the encoder's k-NN is not the
    init's."""
    import torch.distributed as dist
    from test_train_worker import InProcessRefresh

    from salient.jobs.cli import main
    from salient.jobs.eval.online import OnlineProbe
    from salient.jobs.train.config import TrainConfig
    from salient.jobs.train.worker import _Worker
    from salient.trainer.family import FAMILIES

    argv = ["train", "--recipe", "amt-mae", "--epochs", "4", "--warmup-epochs", "1"]
    argv += [
        "--effective-batch",
        "8",
        "--data",
        str(demo_data),
        "--store",
        str(tmp_path / "s.zarr"),
    ]
    argv += ["--model", "mae-micro", "--image-size", "32", "--patch-size", "8"]
    argv += ["--loader-workers", "0", "--run-dir", str(tmp_path / "run"), "--val", str(demo_val)]
    assert main([*argv, "--print-config"]) == 0
    config = TrainConfig(**json.loads(capsys.readouterr().out))
    assert (config.lr_warmup_epochs, config.refresh_every, config.global_batch) == (1, 1, 8)
    steps = 96 // 8  # per epoch
    [note] = config.schedule_warnings(steps)  # 48 steps at most at 1.5e-4 × 8 / 256
    peak = 1.5e-4 * 8 / 256  # warms up over 12 steps, then a half-cosine to 0 over 36
    assert f"sum to {peak * 13 / 2 + peak / 2 * 36:.2g}," in note and "raise --blr" in note
    assert main([*argv, "--blr", "0.05", "--print-config"]) == 0
    config = TrainConfig(**json.loads(capsys.readouterr().out))
    assert config.schedule_warnings(steps) == []
    Path(config.run_dir).mkdir()
    Path(config.run_dir, "metrics.jsonl").touch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        args = {"config": config, "launch_refresh": InProcessRefresh(config)}
        reports = []
        worker = _Worker(args, 0, 1, torch.device("cpu"), reports.append)
        try:
            worker.run()
        finally:
            worker.close()
    finally:
        dist.destroy_process_group()
    assert [r["strategy"] for r in reports] == ["random", "amt", "amt", "amt"]
    lrs = [s["lr"] for s in read_jsonl(Path(config.run_dir) / "metrics" / "rank-0.jsonl")]
    assert max(lrs) == pytest.approx(0.05 * 8 / 256) == lrs[steps - 1]  # peak after epoch 1
    [trained] = [
        r for r in read_jsonl(Path(config.run_dir) / "metrics.jsonl") if r["kind"] == "eval"
    ]
    family = FAMILIES[config.framework]
    torch.manual_seed(config.seed)  # the run's init, as the worker builds it
    init = family.build(**family.settings(config)).encoder
    baseline = OnlineProbe.for_config(config).run(init, torch.device("cpu"), 0)
    assert trained["knn"] != baseline["knn"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(Path(config.run_dir) / "tb"))
    tb.Reload()
    [probe] = tb.Scalars("eval/knn/cls/top1")  # the probe's record, in TensorBoard too
    assert (probe.step, probe.value) == (4 * steps, pytest.approx(trained["knn"]["cls"]["top1"]))
