"""``TrainConfig``: one ``salient train`` run's settings, checked when built.

Every check here needs no disk, Ray or GPU, so a bad flag fails before any work; the checks
that read the dataset, the store and the run directory live in ``salient.jobs.train``.
Ray Train pickles the config to every worker, so it stays a module-level frozen dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from salient.trainer.loop import TrainError

__all__ = ["TrainConfig", "resolved"]


_BASE_LR = 1.5e-4  # MAE: lr = blr × global batch / 256, blr = 1.5e-4


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Ratios are shares of the N patches (DESIGN.md, "Mask strategies").

    ``batch_size`` is per worker; ``lr`` ``None`` means MAE's rule (1.5e-4 × global batch /
    256). ``lr_warmup_epochs`` ``None`` means ``warmup_epochs``. ``cpus_per_worker`` ``None``
    sizes train workers to leave room for a refresh. ``log_details`` adds each step's sample
    ids and a parameter checksum to the per-rank JSONL; ``stop_after_epochs`` ends the run
    right after that epoch's checkpoint, as a kill there would (both testing aids).
    """

    data: str
    store: str | None = None
    model: str = "mae-tiny"
    strategy: str = "amt"
    mask_ratio: float = 0.45
    throw_ratio: float = 0.40
    strategy_options: dict = field(default_factory=dict)
    warmup_mask_ratio: float = 0.75
    epochs: int = 400
    warmup_epochs: int = 40
    refresh_every: int = 40
    refresh_wait: bool = False
    workers: int = 1
    gpu: bool = False
    address: str | None = None
    run_dir: str = "runs/train"
    resume: bool = False
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 0.0
    lr_warmup_epochs: int | None = None
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    image_size: int = 224
    patch_size: int = 16
    norm_pix_loss: bool = False
    seed: int = 0
    loader_workers: int = 2
    cpus_per_worker: float | None = None
    saliency_kind: str = "cls_attn"
    refresh_workers: int = 1
    refresh_cpus: float = 0.5
    refresh_gpus: float = 0.0
    refresh_batch_size: int = 64
    log_details: bool = False
    stop_after_epochs: int | None = None
    val: str | None = None
    """Held-out dataset with the training set's class list: rank 0 runs the k-NN probe on the
    current encoder (DINO's, k = 20, T = 0.07) and logs it in metrics.jsonl."""
    eval_every: int = 0
    """With --val: the k-NN probe every K epochs, and after the last one (0: the last only)."""

    def __post_init__(self):
        _check_types(self)
        _check_counts(self)
        _check_ratios(self)
        _check_model(self)
        _check_strategy(self)
        _check_resources(self)

    @property
    def needs_saliency(self) -> bool:
        from salient.pipeline.masking import NEEDS_SALIENCY

        return self.strategy in NEEDS_SALIENCY

    @property
    def refreshes(self) -> bool:
        """Whether this run launches refreshes (a saliency strategy and ``refresh_every > 0``)."""
        return self.needs_saliency and self.refresh_every > 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else _BASE_LR * self.global_batch / 256

    @property
    def lr_warmup(self) -> int:
        return self.warmup_epochs if self.lr_warmup_epochs is None else self.lr_warmup_epochs

    def as_dict(self) -> dict:
        """Plain JSON values (what ``config.json`` and every checkpoint hold)."""
        return asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_types(c: TrainConfig) -> None:
    if not isinstance(c.data, str) or not c.data:
        raise TrainError(f"train needs --data DIR (got {c.data!r})")
    for f in fields(c):
        value = getattr(c, f.name)
        if (
            f.type in ("int", "int | None")
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int))
        ):
            raise TrainError(f"{_flag(f.name)} must be an integer (got {value!r})")


def _check_counts(c: TrainConfig) -> None:
    for name in (
        "epochs",
        "workers",
        "batch_size",
        "image_size",
        "patch_size",
        "refresh_workers",
        "refresh_batch_size",
    ):
        if getattr(c, name) < 1:
            raise TrainError(f"{_flag(name)} must be >= 1 (got {getattr(c, name)})")
    for name in ("warmup_epochs", "refresh_every", "loader_workers", "eval_every"):
        if getattr(c, name) < 0:
            raise TrainError(f"{_flag(name)} must be >= 0 (got {getattr(c, name)})")
    if c.lr_warmup_epochs is not None and c.lr_warmup_epochs < 0:
        raise TrainError(f"--lr-warmup-epochs must be >= 0 (got {c.lr_warmup_epochs})")
    if c.eval_every and not c.val:
        raise TrainError("--eval-every needs --val DIR, the held-out set the probe measures")
    if c.stop_after_epochs is not None and not 1 <= c.stop_after_epochs <= c.epochs:
        raise TrainError(f"stop_after_epochs must be in 1..{c.epochs} (got {c.stop_after_epochs})")


def _check_ratios(c: TrainConfig) -> None:
    for name in ("mask_ratio", "warmup_mask_ratio"):
        if not 0 < getattr(c, name) < 1:
            raise TrainError(f"{_flag(name)} must be in (0, 1) (got {getattr(c, name)})")
    if not 0 <= c.throw_ratio < 1:
        raise TrainError(f"--throw-ratio must be in [0, 1) (got {c.throw_ratio})")
    if c.mask_ratio + c.throw_ratio >= 1:
        raise TrainError(
            f"--mask-ratio + --throw-ratio must be < 1 (got {c.mask_ratio} + "
            f"{c.throw_ratio}); lower one so some patches stay visible"
        )
    if c.lr is not None and not c.lr > 0:
        raise TrainError(f"--lr must be > 0 (got {c.lr}); leave it unset for MAE's rule")
    if c.min_lr < 0 or c.weight_decay < 0 or c.clip_grad < 0:
        raise TrainError(
            "--min-lr, --weight-decay and --clip-grad must be >= 0 (got "
            f"{c.min_lr}, {c.weight_decay}, {c.clip_grad}); --clip-grad 0 turns it off"
        )


def _check_model(c: TrainConfig) -> None:
    from salient.trainer.models import MODELS

    if c.model not in MODELS:
        raise TrainError(f"unknown --model {c.model!r}; choose one of {', '.join(sorted(MODELS))}")
    if c.image_size % c.patch_size:
        raise TrainError(
            f"--image-size {c.image_size} is not a multiple of --patch-size "
            f"{c.patch_size}; use e.g. {max(1, c.image_size // c.patch_size) * c.patch_size}"
        )
    if c.norm_pix_loss and MODELS[c.model].kind != "mae":
        raise TrainError("--norm-pix-loss is an MAE option; SimMIM regresses raw pixels (L1)")


def _check_strategy(c: TrainConfig) -> None:
    from salient.jobs.refresh import KINDS
    from salient.pipeline.masking import STRATEGIES

    if c.strategy not in STRATEGIES:
        raise TrainError(
            f"unknown --strategy {c.strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        )
    if c.needs_saliency and not c.store:
        raise TrainError(
            f"--strategy {c.strategy} needs saliency maps: give --store URL (a "
            "refresh creates it), or use --strategy random"
        )
    if c.saliency_kind not in KINDS or c.saliency_kind == "heads":
        raise TrainError(f"--saliency-kind must be cls_attn or gpa (got {c.saliency_kind!r})")


def _check_resources(c: TrainConfig) -> None:
    if c.cpus_per_worker is not None and not c.cpus_per_worker > 0:
        raise TrainError(f"--cpus-per-worker must be > 0 (got {c.cpus_per_worker})")
    if not c.refresh_cpus > 0 or not 0 <= c.refresh_gpus < 1:
        raise TrainError(
            f"--refresh-cpus must be > 0 and --refresh-gpus in [0, 1) (got "
            f"{c.refresh_cpus}, {c.refresh_gpus}): a refresh shares the GPUs"
        )


def resolved(config: TrainConfig) -> TrainConfig:
    """Absolute local paths: Ray workers may run in another directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    return replace(
        config,
        data=absolute(config.data),
        store=absolute(config.store),
        run_dir=absolute(config.run_dir),
        val=absolute(config.val),
    )
