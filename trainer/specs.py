"""The trainer's names and defaults, importable without torch: what a run's settings may name.

A config (``salient train``'s, ``salient refresh``'s, the library's) reads its choices and
defaults here, so that building a parser, ``--help`` and a bad flag answer before torch, timm
or Ray load (docs/ARCHITECTURE.md, "Start-up"). The parts these names select live in the
modules that import torch, and read their names here:

- model sizes and names (``trainer.models`` builds MAE / SimMIM, ``trainer.ibot`` iBOT);
- the family of each model name, and the family names (``trainer.family.FAMILIES`` binds each
  to its parts);
- the saliency kinds and head reductions (``trainer.teacher`` computes them);
- iBOT's run settings and AutoMAE's own settings, each with its source and its range (a
  job's flags take their metadata from these fields: ``salient.settings``);
- the errors a bad setting raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.settings import check_fields, ranged

__all__ = [
    "ENCODER_SIZES",
    "FAMILY_NAMES",
    "IBOT_MODELS",
    "IBOT_SOURCES",
    "KINDS",
    "LOSS_G_FACTOR",
    "MAP_KINDS",
    "MAP_SOURCES",
    "MASK_FACTOR",
    "MODELS",
    "MODEL_FAMILIES",
    "REDUCES",
    "AutoMAESettings",
    "IBOTSettings",
    "ModelError",
    "ModelSpec",
    "TrainError",
    "family_of",
]


class ModelError(SalientError):
    """A model that cannot be built as asked (unknown name, sizes that do not fit)."""


class TrainError(SalientError):
    """A training run that cannot start or cannot go on (bad settings, a diverged loss)."""


# ---- model sizes and names ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One named size: the encoder's width / depth / heads, and the MAE decoder's."""

    kind: str  # "mae" | "simmim"
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int = 0
    decoder_depth: int = 0
    decoder_heads: int = 0


# Encoders: ViT-Ti / S / B (DeiT and ViT sizes). MAE decoders: 512-d, 8 blocks, 16 heads for
# ViT-B (MAE's default); our choice for the smaller encoders is 256-d, 4 blocks, 8 heads, so
# the decoder stays a minority of the compute as in MAE-B. "micro" is for tests only.
_SIZES = {
    "micro": (32, 2, 2, 32, 1, 2),
    "tiny": (192, 12, 3, 256, 4, 8),
    "small": (384, 12, 6, 256, 4, 8),
    "base": (768, 12, 12, 512, 8, 16),
}
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {  # size -> (embed_dim, depth, num_heads)
    size: dims[:3] for size, dims in _SIZES.items()
}
MODELS: dict[str, ModelSpec] = {
    **{f"mae-{size}": ModelSpec("mae", *dims) for size, dims in _SIZES.items()},
    **{f"simmim-{size}": ModelSpec("simmim", *dims[:3]) for size, dims in _SIZES.items()},
}

IBOT_MODELS = tuple(f"ibot-{size}" for size in ENCODER_SIZES)
# online: the EMA teacher's attention in the step (AttMask's); store: the store's maps
IBOT_SOURCES = ("online", "store")

# Every model name a run can ask for, and the family it belongs to by default (AutoMAE trains
# the mae-* models, so it is chosen by the family, not the name).
MODEL_FAMILIES: dict[str, str] = {
    **{name: spec.kind for name, spec in MODELS.items()},
    **dict.fromkeys(IBOT_MODELS, "ibot"),
}

# The pretraining methods a run can train (``--family``); ``trainer.family.FAMILIES`` holds
# each one's model, loss and batch fields.
FAMILY_NAMES = ("mae", "simmim", "ibot", "automae")


def family_of(model: str, family: str | None = None) -> str:
    """The family a run trains: ``family`` when given, else the model's own."""
    return family or MODEL_FAMILIES[model]


# ---- saliency kinds ------------------------------------------------------------------------------

# The one registry of saliency kinds and head reductions (refresh, train and inspect read it).
KINDS = ("cls_attn", "gpa", "heads")
MAP_KINDS = ("cls_attn", "gpa")  # one map per image: what a mask strategy reads
REDUCES = ("mean", "minmax_mean")


# ---- iBOT and AutoMAE settings ------------------------------------------------------------------

# AutoMAE (hyperea/automae): where the generator's per-head maps come from, and its factors
MAP_SOURCES = ("store", "online")
MASK_FACTOR = 0.5  # main_pretrain.py: --mask_factor 0.5 (run_pretrain.sh keeps it: "bmask0.5x")
LOSS_G_FACTOR = 0.2  # main_pretrain.py: --loss_g_factor 0.2 (paper Sec. 3.3: "by grid search")


@dataclass(frozen=True)
class AutoMAESettings:
    """AutoMAE's own numbers beside its MAE's, each range declared with its field
    (``trainer.automae.build_automae`` checks its keywords with them; ``TrainConfig``'s
    ``--mask-factor``, ``--loss-g-factor`` and ``--generator-heads`` take their metadata)."""

    mask_factor: float = field(default=MASK_FACTOR, metadata=ranged(ge=0))
    loss_g_factor: float = field(default=LOSS_G_FACTOR, metadata=ranged(ge=0))
    # the generator's input channels, the teacher's heads (None: the encoder's)
    heads: int | None = field(default=None, metadata=ranged(ge=1))

    def __post_init__(self) -> None:
        check_fields(self, ModelError, lambda f: f"AutoMAE {f.name}")  # declared with the fields


@dataclass(frozen=True)
class IBOTSettings:
    """Everything of an iBOT run but its sizes, with the values of the published ViT-S/16 runs
    (AttMask's README commands, which are iBOT's README command at 100 epochs).

    Each range is declared here, with its field; ``TrainConfig``'s iBOT flags take their
    metadata from these fields, so a flag and the library check the same range."""

    norm_last_layer: bool = False  # README ViT-S: --norm_last_layer False (code default True)
    # None: the size's (8192: --out_dim 8192)
    out_dim: int | None = field(default=None, metadata=ranged(ge=1))
    # main_ibot.py --drop_path 0.1 (student only)
    drop_path: float = field(default=0.1, metadata=ranged(ge=0, lt=1))
    # main_ibot.py --lambda1, --lambda2: weights of the [CLS] loss and of the patch loss
    lambda1: float = field(default=1.0, metadata=ranged(ge=0))
    lambda2: float = field(default=1.0, metadata=ranged(ge=0))
    # iBOTLoss(student_temp=0.1); main_ibot.py --warmup_teacher_temp 0.04; README ViT-S:
    # --teacher_temp 0.07 (code default 0.04); --warmup_teacher_patch_temp 0.04,
    # --teacher_patch_temp 0.07, --warmup_teacher_temp_epochs 30
    student_temp: float = field(default=0.1, metadata=ranged(gt=0))
    warmup_teacher_temp: float = field(default=0.04, metadata=ranged(gt=0))
    teacher_temp: float = field(default=0.07, metadata=ranged(gt=0))
    warmup_teacher_patch_temp: float = field(default=0.04, metadata=ranged(gt=0))
    teacher_patch_temp: float = field(default=0.07, metadata=ranged(gt=0))
    warmup_teacher_temp_epochs: int = field(default=30, metadata=ranged(ge=1))
    # iBOTLoss(center_momentum=0.9, center_momentum2=0.9); --momentum_teacher 0.996, cosine to 1
    center_momentum: float = field(default=0.9, metadata=ranged(ge=0, le=1))
    momentum_teacher: float = field(default=0.996, metadata=ranged(ge=0, le=1))
    weight_decay: float = 0.04  # --weight_decay 0.04, cosine to --weight_decay_end 0.4
    weight_decay_end: float = field(default=0.4, metadata=ranged(ge=0))
    # --freeze_last_layer 1 (epochs)
    freeze_last_layer: int = field(default=1, metadata=ranged(ge=0))
    strategy: str = "block"  # main_ibot.py --pred_shape block; AttMask: attmask_high / _hint
    mask_ratio: float = 0.3  # --pred_ratio 0.3 ...
    # ... ± 0.2 (--pred_ratio_var 0.2), one ratio per batch, and half the images masked
    # (AttMask --masking_prob 0.5; iBOT's --pred_ratio 0 0.3 draws ratio 0 for half of them)
    strategy_options: dict = field(default_factory=lambda: {"mask_prob": 0.5, "ratio_var": 0.2})
    # Where the attention masks' maps come from (the model plans them itself when a batch
    # brings none): "online", the teacher's attention in the step (AttMask's), or "store",
    # the loader's masks from the store's maps. With the views below, the loader's fields
    # (``ibot_step.ibot_loader_fields``); the model reads none of them.
    saliency_source: str = field(default="online", metadata={"choices": lambda: IBOT_SOURCES})
    local_crops: int | None = None  # None: ``loader_config.MultiCrop``'s (README: 10)
    local_size: int | None = None  # None: MultiCrop's (96)
    local_scale: tuple[float, float] | None = None  # None: MultiCrop's (0.05, 0.25)

    def __post_init__(self) -> None:
        check_fields(self, ModelError, lambda f: f"iBOT {f.name}")  # declared with the fields

    def mask_options(self) -> dict:
        """The keywords of ``plan_mask_flags`` (``mask_prob``, ``ratio_var``, the strategy's)."""
        return dict(self.strategy_options)
