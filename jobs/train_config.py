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


def _strategies() -> list[str]:
    from salient.pipeline.masking import STRATEGIES

    return list(STRATEGIES)


def _models() -> list[str]:
    from salient.trainer.models import MODELS

    return list(MODELS)


def _map_kinds() -> list[str]:
    return ["cls_attn", "gpa"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Ratios are shares of the N patches (README, "Mask strategies")."""

    data: str
    """Dataset directory (or URL) written by `salient ingest`."""
    store: str | None = None
    """Saliency store path or URL the strategy reads and the refreshes write (created by the
    first refresh)."""
    model: str = field(default="mae-tiny", metadata={"choices": _models})
    """Model: MAE or SimMIM with a ViT-Ti / S / B encoder (micro: tests only)."""
    strategy: str = field(default="amt", metadata={"choices": _strategies})
    """Mask strategy after the warmup (README, "Mask strategies")."""
    mask_ratio: float = 0.45
    """Share of the N patches masked (AMT with MAE: 0.45)."""
    throw_ratio: float = 0.40
    """Share of the N patches thrown: neither encoded nor reconstructed (AMT with MAE: 0.40)."""
    strategy_options: dict = field(default_factory=dict, metadata={"flag": "--strategy-option"})
    """Options of the strategy, e.g. throw=low for amt (AMT Table 4), hint=0.03 for
    attmask_hint, hard=[0,0.5] for gpa."""
    warmup_mask_ratio: float = 0.75
    """Random mask ratio of the warmup epochs, before the first generation (AMT's code: 0.75)."""
    epochs: int = 400
    """Training epochs (AMT with MAE: 400)."""
    warmup_epochs: int = 40
    """Epochs of random masking before the first refresh (AMT: 40)."""
    refresh_every: int = 40
    """Epochs between refreshes from the latest checkpoint (AMT: 40); 0 = never."""
    refresh_wait: bool = False
    """Pause training while a refresh runs (deterministic generations; slower)."""
    workers: int = 1
    """Data-parallel (DDP) train workers."""
    gpu: bool = False
    """One GPU per train worker, bf16 autocast, nccl."""
    address: str | None = None
    """Ray cluster address (e.g. 10.0.0.5:6379 or auto); default: RAY_ADDRESS, else an embedded
    local Ray."""
    run_dir: str = "runs/train"
    """Directory of checkpoints, metrics and config.json (shared by every node on a cluster)."""
    resume: bool = False
    """Continue the run in --run-dir from its latest checkpoint."""
    max_failures: int = 3
    """Restarts after a train worker (or its node) is lost; each restart continues from the
    latest checkpoint by itself. 0 = the first loss ends the run."""
    save_every: int = 1
    """Epochs between checkpoints (the last epoch and each refresh's teacher are always saved)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in --run-dir, each with its encoder exported for timm
    (safetensors); 0 = keep all."""
    keep_generations: int = 3
    """Published generations the store keeps after each refresh (older ones are collected an
    hour after they were replaced); 0 = never collect."""
    placement_timeout_s: float = 60.0
    """Seconds to wait for Ray to place the train workers and the refresh actors before
    stopping with what is missing."""
    batch_size: int = 64
    """Images per step on each worker."""
    lr: float | None = None
    """Peak learning rate; unset = MAE's rule, 1.5e-4 x global batch / 256."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_epochs: int | None = None
    """Epochs of linear learning-rate warmup; unset = --warmup-epochs."""
    weight_decay: float = 0.05
    """AdamW weight decay, not applied to biases and norm weights (MAE: 0.05)."""
    clip_grad: float = 5.0
    """Clip the global gradient norm at this value; 0 = no clipping."""
    image_size: int = 224
    """Side of the training crops in pixels."""
    patch_size: int = 16
    """ViT patch side in pixels."""
    norm_pix_loss: bool = False
    """MAE: regress per-patch normalised pixels (MAE's best setting)."""
    seed: int = 0
    """Seed of the model, crops and masks (a run is reproducible for a seed)."""
    loader_workers: int = 2
    """DataLoader worker processes per train worker."""
    cpus_per_worker: float | None = None
    """Ray CPUs per train worker; unset = the most (up to 1) that fits beside the refresh on
    the nodes."""
    saliency_kind: str = field(default="cls_attn", metadata={"choices": _map_kinds})
    """Map kind the refreshes write (cls_attn: AMT, AttMask; gpa: GPA)."""
    refresh_workers: int | None = None
    """Teacher actors of each refresh; unset = one per train worker with --gpu (one on each
    training GPU), else 1."""
    refresh_cpus: float = 0.5
    """Ray CPUs per refresh actor."""
    refresh_gpus: float | None = None
    """GPUs per refresh actor: a fraction shares a training GPU (each train worker leaves it
    free), a whole number takes dedicated GPUs; unset = 0.25 with --gpu, else 0."""
    refresh_batch_size: int = 64
    """Images per teacher forward in a refresh."""
    log_details: bool = field(default=False, metadata={"hidden": True})
    """Testing aid: each step's sample ids, a parameter checksum and the worker's process id in
    the per-rank JSONL."""
    stop_after_epochs: int | None = field(default=None, metadata={"hidden": True})
    """Testing aid: end the run right after this epoch's checkpoint, as a kill there would."""

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
    def refresh_actors(self) -> int:
        """Teacher actors of each refresh (``refresh_workers``, or its default)."""
        if self.refresh_workers is not None:
            return self.refresh_workers
        return self.workers if self.gpu else 1

    @property
    def refresh_gpu_share(self) -> float:
        """GPUs per refresh actor (``refresh_gpus``, or 0.25 of a training GPU with --gpu):
        README, Decisions, "GPU refresh beside GPU training"."""
        if self.refresh_gpus is not None:
            return float(self.refresh_gpus)
        return 0.25 if self.gpu else 0.0

    @property
    def worker_gpus(self) -> float:
        """GPUs per train worker: one, less the share a refresh actor takes beside it."""
        if not self.gpu:
            return 0.0
        share = self.refresh_gpu_share if self.refreshes else 0.0
        return 1.0 - share if 0 < share < 1 else 1.0

    def checkpoint_due(self, epochs_done: int) -> bool:
        """Whether the epoch ending with ``epochs_done`` writes a checkpoint (every
        ``save_every``, the last one; a refresh's teacher is saved besides)."""
        return epochs_done % self.save_every == 0 or epochs_done in (
            self.epochs,
            self.stop_after_epochs,
        )

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
        "refresh_batch_size",
        "save_every",
    ):
        if getattr(c, name) < 1:
            raise TrainError(f"{_flag(name)} must be >= 1 (got {getattr(c, name)})")
    if c.refresh_workers is not None and c.refresh_workers < 1:
        raise TrainError(f"--refresh-workers must be >= 1 (got {c.refresh_workers})")
    for name in (
        "warmup_epochs",
        "refresh_every",
        "loader_workers",
        "max_failures",
        "keep_checkpoints",
        "keep_generations",
    ):
        if getattr(c, name) < 0:
            raise TrainError(f"{_flag(name)} must be >= 0 (got {getattr(c, name)})")
    if c.lr_warmup_epochs is not None and c.lr_warmup_epochs < 0:
        raise TrainError(f"--lr-warmup-epochs must be >= 0 (got {c.lr_warmup_epochs})")
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
    if not c.refresh_cpus > 0:
        raise TrainError(f"--refresh-cpus must be > 0 (got {c.refresh_cpus})")
    gpus = c.refresh_gpus
    if gpus is not None and not (0 <= gpus < 1 or (gpus >= 1 and float(gpus).is_integer())):
        raise TrainError(
            f"--refresh-gpus must be a share in [0, 1) of a training GPU or a whole number of "
            f"dedicated GPUs (got {gpus})"
        )
    if not c.placement_timeout_s > 0:
        raise TrainError(f"--placement-timeout-s must be > 0 (got {c.placement_timeout_s})")


def resolved(config: TrainConfig) -> TrainConfig:
    """Absolute local paths: Ray workers may run in another directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    return replace(
        config,
        data=absolute(config.data),
        store=absolute(config.store),
        run_dir=absolute(config.run_dir),
    )
