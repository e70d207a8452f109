"""The papers' pretraining runs by name: ``salient train --recipe NAME``.

A recipe is a dict of :class:`~salient.jobs.train.config.TrainConfig` field values; every value
says where it comes from (paper table / section, or the authors' code where the paper is
silent). Flags given beside ``--recipe`` override its values. Sizes follow the papers
(ViT-B/16 at 224 px, ImageNet-1K batch sizes): the effective batch is fixed with
``effective_batch``, so ``accum_iter`` follows from the workers a cluster has (4 workers of
128 images accumulate 8 batches per step, as AMT's 4-GPU runs did). What a recipe cannot say,
because salient has no setting for it, is listed in README ("Recipes").

A recipe follows what the user sets beside it (:func:`fitted`): run shorter than the paper
(``--epochs 4``) and its schedule in epochs (masking warmup, lr warmup, refresh interval) keeps
its share of the run; give a smaller ``--effective-batch`` than one pass of the recipe's
``batch_size`` and the batch per worker follows it.

- ``mae`` — MAE (He et al. 2022), ViT-B/16, random 75 %.
- ``amt-mae`` — AMT with MAE (AMT Sec. 4.1): r 0.45, t 0.40, maps refreshed every 40 epochs
  from the model itself, AMT's per-head min-max reduction, 400 epochs.
- ``simmim`` — SimMIM ViT-B/16 (its ViT-B config): random 60 % of 32 px units, 800 epochs.
- ``amt-simmim`` — AMT with SimMIM (AMT Sec. 4.1 and its SimMIM config): r 0.44, t 0.26 of
  32 px units, 200 epochs.
- ``attmask-mae`` — AttMask-High's masks (AttMask's code) on MAE, a pairing no paper ran:
  each image attention-masked with probability 0.5 (else at random), the ratio drawn per
  batch from U(0.1, 0.5), maps refreshed every epoch from the model's own checkpoint.
- ``ibot`` — iBOT ViT-S/16 for 100 epochs with its own block masks: AttMask's README command
  (the baseline of its Table 1 / 2) with ``--pred_shape block``.
- ``attmask-ibot-high`` / ``attmask-ibot-hint`` — AttMask as published: iBOT ViT-S/16, 100
  epochs, masks from the EMA teacher's [CLS] attention in every step (AttMask's README
  "Full ImageNet-1k pre-training" commands); ``--saliency-source store`` takes them from the
  store instead, refreshed from the teacher every ``--refresh-every`` epochs.
- ``gpa-mae`` — GPA (Sec. 4, Table 1 "as teacher" + "as feature"): soft-to-hard masking of
  75 % from a frozen pretrained MAE's GPA maps, and GPA's reconstruction target (weight 1).
- ``automae`` — AutoMAE (its code, ``hyperea/automae``: run_pretrain.sh, main_pretrain.py):
  MAE-B 800 epochs, 75 % masked by a learned generator on a frozen pretrained MAE's per-head
  maps, held to box-like pseudo-masks by a discriminator.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from salient.jobs.train.config import TrainConfig
from salient.trainer.specs import TrainError

__all__ = ["RECIPES", "SCHEDULE", "fitted", "recipe_config", "recipe_names", "resolve_recipe"]

# A recipe's schedule in epochs: shares of its run (README, Decisions, "Recipes that scale").
SCHEDULE = ("warmup_epochs", "lr_warmup_epochs", "refresh_every", "warmup_teacher_temp_epochs")

# MAE's optimisation, shared by the MAE-based recipes (MAE's PRETRAIN.md command and
# main_pretrain.py; AMT Sec. 4.1: "The settings of pretraining follow the original works
# strictly"; GPA: "Our implementation is based on MAE").
_MAE = {
    "model": "mae-base",  # ViT-B/16 encoder, 512-d 8-block decoder (MAE; AMT Sec. 4.1)
    "image_size": 224,  # MAE: --input_size 224
    "patch_size": 16,  # ViT-B/16
    "batch_size": 64,  # MAE PRETRAIN.md: --batch_size 64 per GPU ...
    "effective_batch": 4096,  # ... × 8 nodes × 8 GPUs = 4096 ("effective batch size")
    "blr": 1.5e-4,  # PRETRAIN.md: --blr 1.5e-4; lr = blr × effective batch / 256
    "min_lr": 0.0,  # main_pretrain.py: --min_lr 0
    "weight_decay": 0.05,  # PRETRAIN.md: --weight_decay 0.05
    "betas": (0.9, 0.95),  # main_pretrain.py: AdamW(betas=(0.9, 0.95))
    "clip_grad": None,  # engine_pretrain.py: loss_scaler(..., clip_grad=None): no clipping
    "crop_scale": (0.2, 1.0),  # main_pretrain.py: RandomResizedCrop(scale=(0.2, 1.0), ...)
    "interpolation": "bicubic",  # ... interpolation=3 (bicubic)
    "mask_unit": None,  # MAE masks single 16 px patches
}

# SimMIM's optimisation for ViT-B (its configs/vit_base__800ep/simmim_pretrain__vit_base__
# img224__800ep.yaml and config.py defaults; AMT's SimMIM config keeps them).
_SIMMIM = {
    "model": "simmim-base",  # ViT-B/16 encoder, linear head (SimMIM; AMT Sec. 4.1)
    "image_size": 224,  # DATA.IMG_SIZE 224
    "patch_size": 16,  # ViT-B/16
    "mask_unit": 32,  # DATA.MASK_PATCH_SIZE 32: 2 × 2 patches per mask unit
    "batch_size": 128,  # README: --batch-size 128 per GPU ...
    "effective_batch": 2048,  # ... on 16 GPUs (one DGX-2) = 2048
    "blr": 5e-5,  # TRAIN.BASE_LR 1e-4 per 512 images (main_simmim.py scales by batch / 512)
    "weight_decay": 0.05,  # TRAIN.WEIGHT_DECAY 0.05
    "betas": (0.9, 0.999),  # TRAIN.OPTIMIZER.BETAS (0.9, 0.999)
    "clip_grad": 5.0,  # TRAIN.CLIP_GRAD 5.0
    "lr_warmup_epochs": 10,  # TRAIN.WARMUP_EPOCHS 10
    "crop_scale": (0.67, 1.0),  # data_simmim.py: RandomResizedCrop(scale=(0.67, 1.0), ...)
    "interpolation": "bilinear",  # ... torchvision's default interpolation
    "norm_pix_loss": False,  # SimMIM regresses raw pixels with L1
}

# iBOT ViT-S/16 for 100 epochs as AttMask ran it: its README's "Full ImageNet-1k
# pre-training" commands (the values main_attmask.py's argparse defaults to where they are
# silent), which are iBOT's README ViT-S command at 100 epochs on 4 GPUs × 60.
_IBOT = {
    "model": "ibot-small",  # --arch vit_small, --patch_size 16 (default): ViT-S/16
    "image_size": 224,  # DataAugmentationiBOT: RandomResizedCrop(224, ...) global crops
    "patch_size": 16,
    "batch_size": 60,  # --batch_size_per_gpu 60 ...
    "effective_batch": 240,  # ... × --nproc_per_node=4
    "blr": 5e-4,  # --lr 0.0005 per 256 images (main_attmask.py: lr × batch / 256)
    "min_lr": 1e-6,  # --min_lr 1e-6 (cosine floor)
    "lr_warmup_epochs": 10,  # --warmup_epochs 10 (the lr's)
    "warmup_epochs": 0,  # no random warm-up of the masks: --pred_start_epoch 0
    "epochs": 100,  # --epochs 100
    "weight_decay": 0.04,  # --weight_decay 0.04 ...
    "weight_decay_end": 0.4,  # ... to --weight_decay_end 0.4, a cosine per step
    "betas": (0.9, 0.999),  # --optimizer adamw: torch.optim.AdamW(params_groups), its defaults
    "clip_grad": 3.0,  # --clip_grad 3.0, per parameter (utils.clip_gradients)
    "freeze_last_layer": 1,  # --freeze_last_layer 1
    "drop_path": 0.1,  # --drop_path 0.1 (student)
    "norm_last_layer": False,  # --norm_last_layer False
    "momentum_teacher": 0.996,  # --momentum_teacher 0.996, cosine to 1
    "teacher_temp": 0.07,  # --teacher_temp 0.07 ...
    "warmup_teacher_temp": 0.04,  # ... from --warmup_teacher_temp 0.04 ...
    "warmup_teacher_temp_epochs": 30,  # ... over --warmup_teacher_temp_epochs 30
    "teacher_patch_temp": 0.07,  # --teacher_patch_temp 0.07 ...
    "warmup_teacher_patch_temp": 0.04,  # ... from --warmup_teacher_patch_temp 0.04
    "lambda1": 1.0,  # --lambda1 1.0: [CLS] loss
    "lambda2": 1.0,  # --lambda2 1.0: masked-patch loss
    "out_dim": 8192,  # --out_dim 8192 --shared_head True
    "crop_scale": (0.25, 1.0),  # --global_crops_scale 0.25 1 (2 global crops: default)
    "interpolation": "bicubic",  # RandomResizedCrop(..., interpolation=Image.BICUBIC)
    "local_crops": 10,  # --local_crops_number 10 ...
    "local_size": 96,  # ... RandomResizedCrop(96, ...) ...
    "local_scale": (0.05, 0.25),  # ... --local_crops_scale 0.05 0.25
    "mask_ratio": 0.3,  # --pred_ratio 0.3 ...
    "throw_ratio": 0.0,  # (iBOT encodes every token)
    "mask_unit": None,  # one 16 px patch per token
    "saliency_source": "online",  # the EMA teacher's attention in the step (main_attmask.py)
    # With --saliency-source store (salient's, no paper's): maps refreshed from the teacher's
    # checkpoint every epoch, the closest a store comes to AttMask's every step ...
    "refresh_every": 1,
    "saliency_kind": "cls_attn",  # ... of the same map: teacher_attention[:, :, 0, 1:] ...
    "saliency_block": -1,  # ... of the last block ...
    "saliency_reduce": "mean",  # ... .mean(1) over the heads
}
# ... ± --pred_ratio_var 0.2: one ratio per batch from U(0.1, 0.5); each image masked with
# --masking_prob 0.5, the others left unmasked (iBOT: --pred_ratio 0 0.3 --pred_ratio_var 0 0.2)
_IBOT_MASKS = {"mask_prob": 0.5, "ratio_var": 0.2}

RECIPES: dict[str, dict] = {
    "mae": {
        **_MAE,
        "strategy": "random",
        "mask_ratio": 0.75,  # MAE Sec. 4 / Fig. 5; PRETRAIN.md --mask_ratio 0.75
        "throw_ratio": 0.0,
        "norm_pix_loss": True,  # PRETRAIN.md: --norm_pix_loss "for better representation"
        "epochs": 800,  # PRETRAIN.md: --epochs 800
        "warmup_epochs": 40,  # PRETRAIN.md: --warmup_epochs 40 (the lr warmup) ...
        "lr_warmup_epochs": 40,  # ... (random masking has no masking warmup)
        "refresh_every": 0,  # no saliency maps
    },
    "amt-mae": {
        **_MAE,
        "batch_size": 128,  # AMT README: 4 GPUs, --batch_size 128 --accum_iter 8 ...
        "effective_batch": 4096,  # ... = 4096, MAE's batch
        "strategy": "amt",
        "mask_ratio": 0.45,  # AMT Sec. 4.1: r = 0.45 with MAE (Tables 1, 4)
        "throw_ratio": 0.40,  # AMT Sec. 4.1: t = 0.4 with MAE; thrown: the middle of the draw
        # order (amt's default option throw=middle; AMT Sec. 3.2, Table 4)
        "norm_pix_loss": False,  # AMT README's command passes no --norm_pix_loss (default off)
        "epochs": 400,  # AMT Sec. 4.1: "400 epochs" with MAE
        "warmup_epochs": 40,  # AMT's code: random masking until epoch 40 ...
        "warmup_mask_ratio": 0.75,  # ... at random_masking(mask_ratio=0.75)
        "lr_warmup_epochs": 40,  # AMT's main_pretrain.py: --warmup_epochs 40
        "refresh_every": 40,  # AMT Sec. 3.2: a_w "updated at a regular interval (40 epochs)"
        "saliency_kind": "cls_attn",  # AMT eq. 3-4: CLS attention
        "saliency_block": -1,  # AMT Alg. 1: "Attention map of last layer"
        "saliency_reduce": "minmax_mean",  # AMT's update_mask: each head min-max, then mean
    },
    "simmim": {
        **_SIMMIM,
        "strategy": "random",
        "mask_ratio": 0.6,  # DATA.MASK_RATIO 0.6 (AMT Table 1: "SimMIM+Random M 60")
        "throw_ratio": 0.0,
        "epochs": 800,  # TRAIN.EPOCHS 800 (its ViT-B run)
        "warmup_epochs": 10,  # no masking warmup; the lr warmup (TRAIN.WARMUP_EPOCHS 10)
        "min_lr": 2e-5,  # cosine floor: MIN_LR 5e-6 per 512 × 2048 / 512 (its ViT-B run
        # decays ×0.1 at epoch 700 instead: salient's schedule is cosine; README, "Recipes")
        "refresh_every": 0,  # no saliency maps
    },
    "amt-simmim": {
        **_SIMMIM,
        "strategy": "amt",
        "mask_ratio": 0.44,  # AMT Sec. 4.1: r = 0.44 with SimMIM; config MASK_RATIO 0.44
        "throw_ratio": 0.26,  # AMT Sec. 4.1: t = 0.26 with SimMIM; config THROW_RATIO 0.26
        # (thrown: the middle of the draw order, amt's default; AMT Sec. 3.2)
        "epochs": 200,  # AMT Sec. 4.1 / 4.2: SimMIM for 200 epochs; config TRAIN.EPOCHS 200
        "warmup_epochs": 40,  # AMT's SimMIM config: AMT_START_EPOCH 40 ...
        "warmup_mask_ratio": 0.44,  # ... random units at its MASK_RATIO until then
        "min_lr": 2e-5,  # config.py MIN_LR 5e-6 per 512 × 2048 / 512 (cosine, as AMT's)
        "refresh_every": 40,  # AMT Sec. 4.1: interval 40 epochs ("20 % of SimMIM")
        "saliency_kind": "cls_attn",  # AMT eq. 3-4
        "saliency_block": -1,  # AMT Alg. 1: last layer
        "saliency_reduce": "minmax_mean",  # AMT's SimMIM utils.update_mask: per head, then mean
    },
    "attmask-mae": {  # a pairing no paper ran: AttMask's results are iBOT's (attmask-ibot-*)
        **_MAE,
        "strategy": "attmask_high",  # AttMask Table 1: AttMask-High, its best (with Hint)
        "mask_ratio": 0.3,  # AttMask's code: pred_ratio 0.3 ...
        "throw_ratio": 0.0,
        # ... ± pred_ratio_var 0.2: U(0.1, 0.5) per batch ("10-50" in its Table 1), each image
        # masked by attention with masking_prob 0.5 (main_attmask.py); the others at random
        "strategy_options": {"mask_prob": 0.5, "ratio_var": 0.2},
        "norm_pix_loss": True,  # MAE's target (PRETRAIN.md)
        "epochs": 800,  # MAE's schedule (PRETRAIN.md); AttMask trains iBOT for 100-300
        "warmup_epochs": 0,  # AttMask: pred_start_epoch 0, attention masks from the start
        "warmup_mask_ratio": 0.3,  # before the first map exists: random at AttMask's ratio
        "lr_warmup_epochs": 40,  # MAE: --warmup_epochs 40
        "refresh_every": 1,  # AttMask reads its EMA teacher every step; a map store every epoch
        "saliency_kind": "cls_attn",  # AttMask: teacher_attention[:, :, 0, 1:] (CLS row) ...
        "saliency_block": -1,  # ... of the last block ...
        "saliency_reduce": "mean",  # ... .mean(1) over the heads
    },
    "gpa-mae": {
        **_MAE,
        "batch_size": 128,  # GPA README: --batch_size 128 on 2 GPUs, --accum_iter 16 ...
        "effective_batch": 4096,  # ... = 4096 (GPA Sec. 4: "a batch size of 4096")
        "strategy": "gpa",
        "mask_ratio": 0.75,  # GPA Sec. 4.1: overall masking ratio alpha = 0.75
        "throw_ratio": 0.0,
        # GPA Sec. 4.1 defaults (eq. 6; Tables 3-4): soft 0.5 -> 0, hard 0 -> 0.5
        "strategy_options": {"hard": (0.0, 0.5), "soft": (0.5, 0.0)},
        "gpa_loss_weight": 1.0,  # GPA eq. 8: Loss = L_RGB + L_GPA (Table 1: teacher + feature)
        "norm_pix_loss": True,  # GPA README: --norm_pix_loss
        "epochs": 200,  # GPA Sec. 4: "pre-training on the ImageNet-1K dataset for 200 epochs"
        "warmup_epochs": 0,  # a frozen pretrained teacher: GPA masks from the first epoch
        "lr_warmup_epochs": 20,  # GPA README: --warmup_epochs 20
        "blr": 1.5e-4,  # GPA Sec. 4: "initial learning rate of 1.5e-4"; README --blr 1.5e-4
        "weight_decay": 0.05,  # GPA README: --weight_decay 0.05
        # The teacher is a frozen MAE ViT-B/16 (GPA Fig. 2, README --teacher_path): run
        # `salient refresh --kind gpa --teacher timm:vit_base_patch16_224 --weights MAE.pth`
        # once before training; no refresh from the model being trained.
        "refresh_every": 0,
        "saliency_kind": "gpa",  # GPA eq. 4-5
        "saliency_head": None,  # the kind's default: the last head of the last block (b11h11,
        # GPA Table 5: 82.70 with no shots)
    },
    "ibot": {
        **_IBOT,
        # iBOT's own masks: main_ibot.py --pred_shape block (default), the baseline AttMask
        # compares against (its "Random Block-Wise" and 100-epoch iBOT rows). The
        # blocks' aspect (0.3, 1/0.3) (pred_aspect_ratio) and smallest block (min(H, W) // 3)²
        # patches, 16 on 224 px / 16 (loader.py ImageFolderMask) are block's defaults here.
        "strategy": "block",
        "strategy_options": dict(_IBOT_MASKS),
    },
    "attmask-ibot-high": {
        **_IBOT,
        "strategy": "attmask_high",  # README: --pred_shape attmask_high (AttMask-High)
        "strategy_options": dict(_IBOT_MASKS),
    },
    "attmask-ibot-hint": {
        **_IBOT,
        "strategy": "attmask_hint",  # README: --pred_shape attmask_hint ...
        # ... --show_max 0.1: int(0.1·r′·N) of the masked top revealed from the top 10 %, r′
        # a second get_pred_ratio() draw (main_attmask.py)
        "strategy_options": {**_IBOT_MASKS, "hint_pool": 0.1},
    },
    "automae": {
        **_MAE,  # run_pretrain.sh: --model mae_vit_base_patch16, --blr 1.5e-4, --weight_decay
        # 0.05, batch 64 x 8 GPUs x --accum_iter 8 = 4096; main_pretrain.py: AdamW (0.9, 0.95),
        # RandomResizedCrop(224, scale=(0.2, 1.0), BICUBIC), no clipping
        "family": "automae",
        "strategy": "random",  # the generator masks (models_mae.py random_masking); the
        # loader's plan goes unused
        "mask_ratio": 0.75,  # run_pretrain.sh: --mask_ratio 0.75
        "throw_ratio": 0.0,
        "norm_pix_loss": True,  # run_pretrain.sh: --norm_pix_loss
        "epochs": 800,  # run_pretrain.sh: --epochs 800
        "warmup_epochs": 0,  # a frozen pretrained teacher: learned masks from the first step
        "lr_warmup_epochs": 40,  # run_pretrain.sh: --warmup_epochs 40
        "mask_factor": 0.5,  # main_pretrain.py: --mask_factor 0.5 (run_pretrain.sh's "bmask0.5x")
        "loss_g_factor": 0.2,  # main_pretrain.py: --loss_g_factor 0.2 (paper Sec. 3.3)
        "seed": 0,  # main_pretrain.py: --seed 0 (+ rank for the draws: worker.draw_seed)
        # The teacher is a frozen MAE-B pretrained for 800 epochs (main_pretrain.py
        # --pretrained_weight ./mae-base-checkpoint-799.pth; paper Sec. 4 "MAE-800"), a local
        # file: `salient refresh --kind heads --teacher timm:vit_base_patch16_224 --weights
        # MAE.pth` once before training stores its maps (map_source store, salient's way); the
        # paper's way recomputes them on every batch: --map-source online --map-teacher
        # timm:vit_base_patch16_224 --map-teacher-weights MAE.pth.
        "map_source": "store",
        "refresh_every": 0,  # no refresh from the model being trained
        "saliency_kind": "heads",  # engine_pretrain.py: get_last_selfattention(...)[:, :, 0, 1:]
        "saliency_block": -1,  # ... of the last block, every head
    },
}


def recipe_names() -> tuple[str, ...]:
    """The recipe names (the choices of ``--recipe``)."""
    return tuple(RECIPES)


def resolve_recipe(name: str) -> dict:
    """A copy of recipe ``name``'s TrainConfig field values. Raises TrainError if unknown."""
    if name not in RECIPES:
        raise TrainError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def fitted(recipe: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """The values ``recipe`` contributes under the settings ``given`` beside it (flags and
    ``--config``), which win anyway.

    - A run shorter than the recipe's keeps each schedule setting it does not give
      (:data:`SCHEDULE`) as its share of the run, rounded, at least 1 where the recipe's is:
      ``amt-mae`` (400 epochs, warmups 40, refresh every 40) with ``--epochs 4`` warms up for
      1 epoch and refreshes every epoch. A longer run keeps the recipe's epochs, as MAE's
      1600-epoch run keeps its 40 warmup epochs (MAE PRETRAIN.md).
    - An ``effective_batch`` smaller than one pass of the recipe's ``batch_size`` over the
      workers, without a ``batch_size``, sets the batch per worker to ``effective_batch /
      workers`` (one pass per step), instead of a batch larger than the step.
    """
    values = copy.deepcopy(dict(recipe))
    epochs, planned = given.get("epochs", values["epochs"]), values["epochs"]
    if isinstance(epochs, int) and 0 < epochs < planned:
        for name in SCHEDULE:
            if name not in given and values.get(name):
                values[name] = max(1, round(values[name] * epochs / planned))
    effective = given.get("effective_batch")
    workers = given.get("workers", _WORKERS)
    if isinstance(effective, int) and "batch_size" not in given and isinstance(workers, int):
        per_worker, rest = divmod(effective, max(workers, 1))
        if not rest and 0 < per_worker < values["batch_size"]:
            values["batch_size"] = per_worker
    return values


_WORKERS = TrainConfig.__dataclass_fields__["workers"].default


def recipe_config(name: str, **fields):
    """The ``TrainConfig`` of recipe ``name`` with ``fields`` (``data``, ``store``, overrides)
    on top, as ``salient train --recipe NAME`` builds it (:func:`fitted`)."""

    return TrainConfig(**{**fitted(resolve_recipe(name), fields), **fields})
