"""``TrainConfig``: one ``salient train`` run's settings, checked when built.

Every check here needs no disk, Ray or GPU, so a bad flag fails before any work; the checks
that read the dataset, the store and the run directory live in ``salient.jobs.train.driver``.
Ray Train pickles the config to every worker, so it stays a module-level frozen dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from salient import urls
from salient.jobs.refresh.driver import KINDS
from salient.pipeline.crops import INTERPOLATIONS
from salient.pipeline.masking import (
    NEEDS_SALIENCY,
    STRATEGIES,
    MaskError,
    check_options,
    default_ratios,
)
from salient.trainer.loop import TrainError
from salient.trainer.models import MODELS
from salient.trainer.teacher import REDUCES

__all__ = ["TrainConfig", "resolved"]


def _strategies() -> list[str]:

    return list(STRATEGIES)


def _models() -> list[str]:

    return list(MODELS)


def _map_kinds() -> list[str]:
    return ["cls_attn", "gpa"]


def _reduces() -> tuple[str, ...]:

    return REDUCES


def _interpolations() -> tuple[str, ...]:

    return tuple(INTERPOLATIONS)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Ratios are shares of the N patches (README, "Mask strategies").

    ``mask_ratio`` / ``throw_ratio`` ``None`` resolve to the strategy's paper values when the
    config is built (``masking.default_ratios``), so ``config.json`` shows the values used.
    Named recipes of the papers' runs: ``salient.jobs.train.recipes``.
    """

    data: str
    """Dataset directory (or URL) written by `salient ingest`."""
    store: str | None = None
    """Saliency store path or URL the strategy reads and the refreshes write (created by the
    first refresh)."""
    model: str = field(default="mae-tiny", metadata={"choices": _models})
    """Model: MAE or SimMIM with a ViT-Ti / S / B encoder (micro: tests only)."""
    strategy: str = field(default="amt", metadata={"choices": _strategies})
    """Mask strategy after the warmup (README, "Mask strategies")."""
    mask_ratio: float | None = None
    """Share of the patches (or mask units) masked; unset: the strategy's paper value (amt
    0.45 with MAE, 0.44 with SimMIM; random 0.75 / 0.6; gpa 0.75; attmask 0.3; block 0.4)."""
    throw_ratio: float | None = None
    """Share thrown (never encoded, no loss; AMT); unset: the strategy's paper value (amt 0.40
    with MAE, 0.26 with SimMIM; 0 for the others)."""
    strategy_options: dict = field(default_factory=dict, metadata={"flag": "--strategy-option"})
    """Options of the strategy, e.g. throw=low for amt (AMT Table 4), hint=0.03 for
    attmask_hint, hard=[0,0.5] for gpa (README, "Mask strategies")."""
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
    """Images per batch on each worker."""
    lr: float | None = None
    """Peak learning rate; unset: MAE's rule, --blr x effective batch / 256."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_epochs: int | None = None
    """Epochs of linear learning-rate warmup; unset = --warmup-epochs."""
    blr: float = 1.5e-4
    """Base learning rate per 256 images: lr = blr × batch × workers × accum_iter / 256 (MAE's
    linear scaling rule, blr 1.5e-4); --lr sets the rate directly instead."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas (MAE: 0.9, 0.95; SimMIM: 0.9, 0.999)."""
    accum_iter: int | None = None
    """Batches per optimiser step (gradient accumulation, MAE's accum_iter): the effective
    batch is batch × workers × accum_iter; unset: from --effective-batch, else 1."""
    effective_batch: int | None = None
    """Images per optimiser step over all workers (MAE, AMT, GPA: 4096); sets accum_iter to
    effective_batch / (batch × workers), so a recipe's batch holds on any number of workers."""
    weight_decay: float = 0.05
    """AdamW weight decay, not applied to biases and norm weights (MAE: 0.05)."""
    clip_grad: float | None = None
    """Clip the gradient norm to this value; unset or 0: no clipping (MAE clips nothing;
    SimMIM clips at 5)."""
    image_size: int = 224
    """Side of the training crops in pixels."""
    patch_size: int = 16
    """ViT patch side in pixels."""
    norm_pix_loss: bool = False
    """MAE: regress per-patch normalised pixels (MAE's best setting)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the random resized crop (MAE: 0.2-1; SimMIM: 0.67-1)."""
    interpolation: str = field(default="bicubic", metadata={"choices": _interpolations})
    """Resampling of image crops: bicubic (MAE's) or bilinear (SimMIM's)."""
    mask_unit: int | None = None
    """Side of a mask unit in pixels, a multiple of the patch size; ratios count units
    (SimMIM: 32 on a 16 px ViT); unset: one patch."""
    gpa_loss_weight: float = 0.0
    """Weight of GPA's second loss: the MAE decoder also predicts each masked patch's GPA
    value, read from a gpa generation (GPA eq. 7-8: weight 1); 0: off."""
    seed: int = 0
    """Seed of the model, crops and masks (a run is reproducible for a seed)."""
    loader_workers: int = 2
    """DataLoader worker processes per train worker."""
    cpus_per_worker: float | None = None
    """Ray CPUs per train worker; unset = the most (up to 1) that fits beside the refresh on
    the nodes."""
    saliency_kind: str = field(default="cls_attn", metadata={"choices": _map_kinds})
    """Map kind the refreshes write (cls_attn: AMT, AttMask; gpa: GPA)."""
    saliency_reduce: str | None = field(default=None, metadata={"choices": _reduces})
    """How refreshes reduce a map's heads: mean (AMT eq. 4) or minmax_mean (each head
    min-max normalised, then averaged: AMT's code); unset: the kind's default."""
    saliency_block: int = -1
    """Block whose attention refreshes read (negative counts from the end; -1: the last)."""
    saliency_head: int | None = None
    """One head for refresh maps instead of a reduction (gpa's default: the last head)."""
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
    val: str | None = None
    """Held-out dataset (or URL) with the training set's class list: rank 0 runs the k-NN
    probe on the current encoder (DINO's, k = 20, T = 0.07) and logs it in metrics.jsonl."""
    eval_every: int = 0
    """With --val: the k-NN probe every K epochs, and after the last one (0: the last only)."""

    def __post_init__(self):
        _check_types(self)
        _check_counts(self)
        _check_model(self)
        _resolve(self)
        _check_ratios(self)
        _check_strategy(self)
        _check_training(self)
        _check_resources(self)

    @property
    def framework(self) -> str:
        """``"mae"`` or ``"simmim"``: the model's kind."""

        return MODELS[self.model].kind

    @property
    def unit(self) -> int:
        """Patches per side of a mask unit (1 without ``mask_unit``)."""
        return 1 if self.mask_unit is None else self.mask_unit // self.patch_size

    @property
    def needs_saliency(self) -> bool:

        return self.strategy in NEEDS_SALIENCY

    @property
    def refreshes(self) -> bool:
        """Whether this run launches refreshes (a saliency strategy and ``refresh_every > 0``)."""
        return self.needs_saliency and self.refresh_every > 0

    @property
    def accum_steps(self) -> int:
        """Batches per optimiser step: ``accum_iter``, else from ``effective_batch``, else 1."""
        return _accumulation(self)

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
        """Images per optimiser step over all workers (MAE's effective batch size)."""
        return self.batch_size * self.workers * self.accum_steps

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.global_batch / 256

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


def _resolve(c: TrainConfig) -> None:
    """Fill unset ratios with the strategy's paper values; tuples for pairs given as lists
    (a JSON config gives lists). The config is frozen: ``object.__setattr__``."""

    if c.strategy not in STRATEGIES:
        raise TrainError(
            f"unknown --strategy {c.strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        )
    mask, throw = default_ratios(c.strategy, c.framework)
    if c.mask_ratio is None:
        object.__setattr__(c, "mask_ratio", mask)
    if c.throw_ratio is None:
        object.__setattr__(c, "throw_ratio", throw)
    for name in ("crop_scale", "betas"):
        value = getattr(c, name)
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise TrainError(f"{_flag(name)} takes two numbers (got {value!r})")
        object.__setattr__(c, name, tuple(value))
    _accumulation(c)  # checked now; kept unresolved, so a config file with other --workers
    # still holds its effective batch (the ``accum_steps`` property resolves it)


def _accumulation(c: TrainConfig) -> int:
    """``accum_iter``, given or from ``effective_batch`` (MAE: effective batch = batch ×
    workers × accum_iter)."""
    per_pass = c.batch_size * c.workers
    if c.accum_iter is not None and c.accum_iter < 1:
        raise TrainError(f"--accum-iter must be >= 1 (got {c.accum_iter})")
    if c.effective_batch is None:
        return 1 if c.accum_iter is None else c.accum_iter
    if c.effective_batch < 1 or c.effective_batch % per_pass:
        raise TrainError(
            f"--effective-batch {c.effective_batch} is not a multiple of --batch-size × "
            f"--workers ({c.batch_size} × {c.workers} = {per_pass}); choose a batch size and "
            "worker count whose product divides it"
        )
    accum = c.effective_batch // per_pass
    if c.accum_iter is not None and c.accum_iter != accum:
        raise TrainError(
            f"--accum-iter {c.accum_iter} gives {per_pass * c.accum_iter} images per step but "
            f"--effective-batch is {c.effective_batch}; drop one of them"
        )
    return accum


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
        "eval_every",
    ):
        if getattr(c, name) < 0:
            raise TrainError(f"{_flag(name)} must be >= 0 (got {getattr(c, name)})")
    if c.lr_warmup_epochs is not None and c.lr_warmup_epochs < 0:
        raise TrainError(f"--lr-warmup-epochs must be >= 0 (got {c.lr_warmup_epochs})")
    if c.eval_every and not c.val:
        raise TrainError("--eval-every needs --val DIR, the held-out set the probe measures")
    if c.stop_after_epochs is not None and not 1 <= c.stop_after_epochs <= c.epochs:
        raise TrainError(f"stop_after_epochs must be in 1..{c.epochs} (got {c.stop_after_epochs})")


def _check_ratios(c: TrainConfig) -> None:
    for name in ("mask_ratio", "throw_ratio", "warmup_mask_ratio"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TrainError(f"{_flag(name)} must be a number (got {value!r})")
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
    if c.min_lr < 0 or c.weight_decay < 0 or (c.clip_grad or 0) < 0:
        raise TrainError(
            "--min-lr, --weight-decay and --clip-grad must be >= 0 (got "
            f"{c.min_lr}, {c.weight_decay}, {c.clip_grad}); --clip-grad 0 turns it off"
        )


def _check_model(c: TrainConfig) -> None:

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

    if c.needs_saliency and not c.store:
        raise TrainError(
            f"--strategy {c.strategy} needs saliency maps: give --store URL (a "
            "refresh creates it), or use --strategy random"
        )
    if c.saliency_kind not in KINDS or c.saliency_kind == "heads":
        raise TrainError(f"--saliency-kind must be cls_attn or gpa (got {c.saliency_kind!r})")
    if c.saliency_reduce is not None and c.saliency_reduce not in _reduces():
        raise TrainError(
            f"--saliency-reduce must be one of {', '.join(_reduces())} (got {c.saliency_reduce!r})"
        )
    _check_options(c)


def _check_options(c: TrainConfig) -> None:
    """One plan of the strategy with its options on the run's (unit) grid."""

    if not isinstance(c.strategy_options, dict):
        raise TrainError(
            "strategy_options must be a dict of the strategy's options (from the command "
            f"line: --strategy-option KEY=VALUE); got {type(c.strategy_options).__name__}"
        )
    units = (c.image_size // c.patch_size // c.unit) ** 2
    try:
        check_options(c.strategy, c.strategy_options, units, c.mask_ratio, c.throw_ratio)
    except MaskError as exc:
        raise TrainError(f"--strategy-option: {exc}") from None


def _check_training(c: TrainConfig) -> None:

    lo, hi = c.crop_scale
    if not 0 < lo <= hi <= 1:
        raise TrainError(f"--crop-scale must satisfy 0 < min <= max <= 1 (got {c.crop_scale})")
    if not all(0 <= b < 1 for b in c.betas) or not c.blr > 0:
        raise TrainError(f"--betas must lie in [0, 1) and --blr be > 0 (got {c.betas}, {c.blr})")
    if c.interpolation not in INTERPOLATIONS:
        raise TrainError(
            f"--interpolation must be one of {', '.join(INTERPOLATIONS)} (got {c.interpolation!r})"
        )
    grid = c.image_size // c.patch_size
    if c.mask_unit is not None and (
        c.mask_unit < c.patch_size or c.mask_unit % c.patch_size or grid % c.unit
    ):
        raise TrainError(
            f"--mask-unit must be a multiple of --patch-size {c.patch_size} that divides "
            f"--image-size {c.image_size} (got {c.mask_unit}); SimMIM: 32 with 16 px patches"
        )
    _check_gpa_target(c)


def _check_gpa_target(c: TrainConfig) -> None:
    if not c.gpa_loss_weight:
        return
    if not c.gpa_loss_weight > 0:
        raise TrainError(f"--gpa-loss-weight must be >= 0 (got {c.gpa_loss_weight})")
    if c.framework != "mae":
        raise TrainError("--gpa-loss-weight needs an MAE decoder (GPA Sec. 3.3); use mae-*")
    if not c.needs_saliency:
        raise TrainError(
            "--gpa-loss-weight reads GPA maps from the store; use a saliency strategy "
            "(GPA's own: --strategy gpa)"
        )
    if c.refreshes and c.saliency_kind != "gpa":
        raise TrainError(
            "--gpa-loss-weight regresses GPA values: the refreshes must write them; "
            "add --saliency-kind gpa"
        )


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
    """Absolute local paths and checked URLs (``salient.urls``): Ray workers may run in another
    directory. ``data`` and ``store`` may live on object storage; ``run_dir`` (checkpoints) is
    a local or shared path."""
    if urls.is_remote(config.run_dir):
        raise TrainError(
            f"--run-dir {config.run_dir} must be a local or shared path (checkpoints are "
            "written there); put --data and --store on object storage"
        )
    return replace(
        config,
        data=urls.normalise(config.data),
        store=None if config.store is None else urls.normalise(config.store),
        run_dir=str(Path(config.run_dir).expanduser().resolve()),
        val=None if config.val is None else urls.normalise(config.val),
    )
