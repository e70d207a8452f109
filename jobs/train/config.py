"""``TrainConfig``: one ``salient train`` run's settings, checked when built.

Every check here needs no disk, Ray or GPU, so a bad flag fails before any work; the checks
that read the dataset, the store and the run directory live in ``salient.jobs.train.driver``.
Ray Train pickles the config to every worker, so it stays a module-level frozen dataclass.

The module imports no torch, timm or Ray at its top, so that a parser, ``--help`` and a bad
flag answer before they load (docs/ARCHITECTURE.md, "Start-up"): its choices and defaults come
from ``trainer.specs`` and ``pipeline.strategies``. The two things that need torch import it
where they run: the strategy options' dry-run plan (``masking.check_options``) and the
family's loader fields (``trainer.family``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from salient import urls
from salient.jobs.flags import declared_field
from salient.jobs.refresh.config import RefreshConfig
from salient.pipeline.loader_config import INTERPOLATIONS, LoaderConfig, MultiCrop, check_scale
from salient.pipeline.strategies import (
    NEEDS_SALIENCY,
    SCHEDULE_OPTIONS,
    STRATEGY_NAMES,
    MaskError,
    check_ratio_sum,
    resolve_ratios,
)
from salient.settings import DATASET, check_fields, flag_of, ranged
from salient.trainer.schedules import WarmupCosine
from salient.trainer.specs import (
    FAMILY_NAMES,
    KINDS,
    MAP_SOURCES,
    MODEL_FAMILIES,
    REDUCES,
    AutoMAESettings,
    IBOTSettings,
    TrainError,
    family_of,
)

__all__ = ["LR_SUM_FLOOR", "TrainConfig", "resolved"]

MAPS = ("own", "any")  # whose generations the strategy reads (--maps)
# Below this sum of a run's learning rates AdamW (about one rate per step and weight) moves no
# weight by more than 5 % of 0.02, the std of timm's ViT initialisation (trunc_normal_ .02).
LR_SUM_FLOOR = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Ratios are shares of the N patches (README, "Mask strategies").

    ``mask_ratio`` / ``throw_ratio`` ``None`` resolve to the strategy's paper values when the
    config is built (``masking.default_ratios``), so ``config.json`` shows the values used.
    Named recipes of the papers' runs: ``salient.jobs.train.recipes``.
    """

    data: str = field(metadata=DATASET)
    """Dataset directory (or URL) written by `salient ingest`."""
    store: str | None = None
    """Saliency store path or URL the strategy reads and the refreshes write (created by the
    first refresh)."""
    model: str = field(default="mae-tiny", metadata={"choices": lambda: MODEL_FAMILIES})
    """Model: MAE, SimMIM or iBOT with a ViT-Ti / S / B encoder (micro: tests only)."""
    family: str | None = field(default=None, metadata={"choices": lambda: FAMILY_NAMES})
    """Pretraining method (mae, simmim, ibot, automae); unset: the model's own (mae-* trains
    MAE; AutoMAE trains an mae-* model with its learned masks)."""
    strategy: str = field(default="amt", metadata={"choices": lambda: STRATEGY_NAMES})
    """Mask strategy after the warmup (README, "Mask strategies")."""
    mask_ratio: float | None = field(default=None, metadata=ranged(gt=0, lt=1))
    """Share of the patches (or mask units) masked; unset: the strategy's paper value (amt
    0.45 with MAE, 0.44 with SimMIM; random 0.75 / 0.6; gpa 0.75; attmask 0.3; block 0.4)."""
    throw_ratio: float | None = field(default=None, metadata=ranged(ge=0, lt=1))
    """Share thrown (never encoded, no loss; AMT); unset: the strategy's paper value (amt 0.40
    with MAE, 0.26 with SimMIM; 0 for the others)."""
    strategy_options: dict = field(default_factory=dict, metadata={"flag": "--strategy-option"})
    """Options of the strategy, e.g. throw=low for amt (AMT Table 4), hint=0.03 for
    attmask_hint, hard=[0,0.5] for gpa (README, "Mask strategies")."""
    warmup_mask_ratio: float = field(default=0.75, metadata=ranged(gt=0, lt=1))
    """Random mask ratio of the warmup epochs, before the first generation (AMT's code: 0.75)."""
    epochs: int = field(default=400, metadata=ranged(ge=1))
    """Training epochs (AMT with MAE: 400)."""
    warmup_epochs: int = field(default=40, metadata=ranged(ge=0))
    """Epochs of random masking before the first refresh (AMT: 40)."""
    refresh_every: int = field(default=40, metadata=ranged(ge=0))
    """Epochs between refreshes from the latest checkpoint (AMT: 40); 0 = never."""
    refresh_wait: bool = False
    """Pause training while a refresh runs (deterministic generations; slower)."""
    maps: str | None = field(default=None, metadata={"choices": lambda: MAPS})
    """Whose maps the strategy reads: own (only generations made from this run's checkpoints,
    the model's own attention as AMT means it; random masks until its first refresh
    publishes) or any (the store's current generation, whoever made it; one line names each
    other teacher's); unset: own when the run refreshes its maps, any otherwise."""
    workers: int = field(default=1, metadata=ranged(ge=1))
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
    max_failures: int = field(default=3, metadata=ranged(ge=0))
    """Restarts after a train worker (or its node) is lost; each restart continues from the
    latest checkpoint by itself. 0 = the first loss ends the run."""
    save_every: int = field(default=1, metadata=ranged(ge=1))
    """Epochs between checkpoints (the last epoch and each refresh's teacher are always saved)."""
    keep_checkpoints: int = field(default=3, metadata=ranged(ge=0))
    """Newest checkpoints kept in --run-dir, each with its encoder exported for timm
    (safetensors); 0 = keep all."""
    keep_generations: int = field(default=3, metadata=ranged(ge=0))
    """Published generations the store keeps after each refresh (older ones are collected an
    hour after they were replaced); 0 = never collect."""
    placement_timeout_s: float = field(default=60.0, metadata=ranged(gt=0))
    """Seconds to wait for Ray to place the train workers and the refresh actors before
    stopping with what is missing."""
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per batch on each worker."""
    lr: float | None = field(default=None, metadata=ranged(gt=0))
    """Peak learning rate; unset: MAE's rule, --blr x effective batch / 256."""
    min_lr: float = field(default=0.0, metadata=ranged(ge=0))
    """Learning rate at the end of the cosine decay."""
    lr_warmup_epochs: int | None = field(default=None, metadata=ranged(ge=0))
    """Epochs of linear learning-rate warmup; unset = --warmup-epochs (a --recipe sets its own,
    kept as its share of a shorter --epochs)."""
    blr: float = field(default=1.5e-4, metadata=ranged(gt=0))
    """Base learning rate per 256 images: lr = blr × batch × workers × accum_iter / 256 (MAE's
    linear scaling rule, blr 1.5e-4); --lr sets the rate directly instead."""
    betas: tuple[float, float] | None = None
    """AdamW's betas (MAE: 0.9, 0.95; SimMIM: 0.9, 0.999); unset: MAE's, or AdamW's defaults
    (0.9, 0.999) for iBOT (main_ibot.py builds AdamW without betas)."""
    accum_iter: int | None = field(default=None, metadata=ranged(ge=1))
    """Batches per optimiser step (gradient accumulation, MAE's accum_iter): the effective
    batch is batch × workers × accum_iter; unset: from --effective-batch, else 1."""
    effective_batch: int | None = field(default=None, metadata=ranged(ge=1))
    """Images per optimiser step over all workers (MAE, AMT, GPA: 4096); sets accum_iter to
    effective_batch / (batch × workers), so a recipe's batch holds on any number of workers."""
    weight_decay: float = field(default=0.05, metadata=ranged(ge=0))
    """AdamW weight decay, not applied to biases and norm weights (MAE: 0.05)."""
    clip_grad: float | None = field(default=None, metadata=ranged(ge=0))
    """Clip the gradient norm to this value; unset or 0: no clipping (MAE clips nothing;
    SimMIM clips at 5)."""
    image_size: int = field(default=224, metadata=ranged(ge=1))
    """Side of the training crops in pixels."""
    patch_size: int = field(default=16, metadata=ranged(ge=1))
    """ViT patch side in pixels."""
    norm_pix_loss: bool = False
    """MAE: regress per-patch normalised pixels (MAE's best setting)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the random resized crop (MAE: 0.2-1; SimMIM: 0.67-1)."""
    interpolation: str = field(default="bicubic", metadata={"choices": lambda: INTERPOLATIONS})
    """Resampling of image crops: bicubic (MAE's) or bilinear (SimMIM's)."""
    mask_unit: int | None = field(default=None, metadata=ranged(ge=1))
    """Side of a mask unit in pixels, a multiple of the patch size; ratios count units
    (SimMIM: 32 on a 16 px ViT); unset: one patch."""
    gpa_loss_weight: float = field(default=0.0, metadata=ranged(ge=0))
    """Weight of GPA's second loss: the MAE decoder also predicts each masked patch's GPA
    value, read from a gpa generation (GPA eq. 7-8: weight 1); 0: off."""
    # AutoMAE (--family automae, trainer/automae.py): its learned masks and where their maps
    # come from; README, "Decisions", "AutoMAE's maps from the store"
    mask_factor: float = declared_field(AutoMAESettings, "mask_factor")
    """AutoMAE: how far the generator's top positions raise MAE's masking noise
    (main_pretrain.py --mask_factor 0.5)."""
    loss_g_factor: float = declared_field(AutoMAESettings, "loss_g_factor")
    """AutoMAE: weight of the generator's adversarial loss beside the reconstruction
    (main_pretrain.py --loss_g_factor 0.2)."""
    map_source: str = field(default="store", metadata={"choices": lambda: MAP_SOURCES})
    """AutoMAE: the generator's per-head maps from --store (store: a heads generation made once
    by `salient refresh --kind heads`, cropped with each image) or from --map-teacher on every
    batch (online: the paper's way, engine_pretrain.py)."""
    map_teacher: str | None = None
    """AutoMAE with --map-source online: the frozen teacher, a checkpoint or timm:NAME with
    --map-teacher-weights (main_pretrain.py --pretrained_weight: a pretrained MAE-B)."""
    map_teacher_weights: str | None = None
    """Local weights file of a timm:NAME --map-teacher (nothing is downloaded)."""
    generator_heads: int | None = declared_field(AutoMAESettings, "heads")
    """AutoMAE: the generator's input channels, the teacher's heads (models_mae.py ScorerBlock:
    12, MAE-B's); unset: read from the maps when the run starts and kept in config.json."""
    # iBOT (--model ibot-*; AttMask). Defaults: AttMask's README ViT-S/16 commands, which
    # are iBOT's README command at 100 epochs (trainer/specs.py IBOTSettings cites each one
    # and declares its range).
    saliency_source: str | None = declared_field(IBOTSettings, "saliency_source", default=None)
    """iBOT: where attention masks come from: online (the EMA teacher's CLS attention over
    each global view, in the step: AttMask's main_attmask.py) or store (the store's maps,
    refreshed from the teacher's checkpoint every --refresh-every epochs); unset: online."""
    momentum_teacher: float = declared_field(IBOTSettings, "momentum_teacher")
    """iBOT: EMA momentum of the teacher, a cosine to 1 (AttMask README: momentum_teacher 0.996)."""
    teacher_temp: float = declared_field(IBOTSettings, "teacher_temp")
    """iBOT: [CLS] teacher temperature after its warm-up (AttMask README: teacher_temp 0.07)."""
    warmup_teacher_temp: float = declared_field(IBOTSettings, "warmup_teacher_temp")
    """iBOT: teacher temperature at epoch 0, linear to --teacher-temp (main_ibot.py: 0.04)."""
    teacher_patch_temp: float = declared_field(IBOTSettings, "teacher_patch_temp")
    """iBOT: teacher temperature of the patches after the warm-up (main_ibot.py: 0.07)."""
    warmup_teacher_patch_temp: float = declared_field(IBOTSettings, "warmup_teacher_patch_temp")
    """iBOT: patch temperature at epoch 0 (main_ibot.py warmup_teacher_patch_temp 0.04)."""
    warmup_teacher_temp_epochs: int = declared_field(IBOTSettings, "warmup_teacher_temp_epochs")
    """iBOT: epochs of the temperatures' warm-up (AttMask README: warmup_teacher_temp_epochs 30)."""
    norm_last_layer: bool = IBOTSettings.norm_last_layer
    """iBOT: freeze the head's last-layer norm at 1 (AttMask README: norm_last_layer False)."""
    out_dim: int | None = declared_field(IBOTSettings, "out_dim")
    """iBOT: head output dimension; unset: 8192 (AttMask README: out_dim 8192; micro: 64)."""
    drop_path: float = declared_field(IBOTSettings, "drop_path")
    """iBOT: stochastic depth of the student (main_ibot.py drop_path 0.1)."""
    lambda1: float = declared_field(IBOTSettings, "lambda1")
    """iBOT: weight of the [CLS] distillation loss (main_ibot.py lambda1 1.0)."""
    lambda2: float = declared_field(IBOTSettings, "lambda2")
    """iBOT: weight of the masked-patch loss (main_ibot.py lambda2 1.0)."""
    weight_decay_end: float = declared_field(IBOTSettings, "weight_decay_end")
    """iBOT: weight decay at the end, a cosine per step from --weight-decay (main_ibot.py
    weight_decay 0.04, weight_decay_end 0.4)."""
    freeze_last_layer: int = declared_field(IBOTSettings, "freeze_last_layer")
    """iBOT: epochs the head's last layer is frozen (main_ibot.py freeze_last_layer 1)."""
    local_crops: int = declared_field(MultiCrop, "local_crops")
    """iBOT: local crops per image beside 2 global ones (AttMask README: local_crops_number 10)."""
    local_size: int = declared_field(MultiCrop, "local_size")
    """iBOT: side of the local crops in pixels (DataAugmentationiBOT: 96 beside 224)."""
    local_scale: tuple[float, float] = MultiCrop.local_scale
    """iBOT: area range of the local crops (AttMask README: local_crops_scale 0.05 0.25); the
    global crops take --crop-scale (AttMask README: global_crops_scale 0.25 1)."""
    seed: int = 0
    """Seed of the model, crops and masks (a run is reproducible for a seed)."""
    loader_workers: int = field(default=2, metadata=ranged(ge=0))
    """DataLoader worker processes per train worker."""
    cpus_per_worker: float | None = field(default=None, metadata=ranged(gt=0))
    """Ray CPUs per train worker; unset = the most (up to 1) that fits beside the refresh on
    the nodes."""
    saliency_kind: str = field(default="cls_attn", metadata={"choices": lambda: KINDS})
    """Map kind the refreshes write (cls_attn: AMT, AttMask; gpa: GPA; heads: AutoMAE's
    per-head maps)."""
    saliency_reduce: str | None = field(default=None, metadata={"choices": lambda: REDUCES})
    """How refreshes reduce a map's heads: mean (AMT eq. 4) or minmax_mean (each head
    min-max normalised, then averaged: AMT's code); unset: the kind's default."""
    saliency_block: int = -1
    """Block whose attention refreshes read (negative counts from the end; -1: the last)."""
    saliency_head: int | None = None
    """One head for refresh maps instead of a reduction (gpa's default: the last head)."""
    refresh_workers: int | None = field(default=None, metadata=ranged(ge=1))
    """Teacher actors of each refresh; unset = one per train worker with --gpu (one on each
    training GPU), else 1."""
    refresh_cpus: float = field(default=0.5, metadata=ranged(gt=0))
    """Ray CPUs per refresh actor."""
    refresh_gpus: float | None = None
    """GPUs per refresh actor: a fraction shares a training GPU (each train worker leaves it
    free), a whole number takes dedicated GPUs; unset = 0.25 with --gpu, else 0."""
    refresh_batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per teacher forward in a refresh."""
    log_details: bool = field(default=False, metadata={"hidden": True})
    """Testing aid: each step's sample ids, a parameter checksum and the worker's process id in
    the per-rank JSONL."""
    stop_after_epochs: int | None = field(default=None, metadata=ranged(ge=1, hidden=True))
    """Testing aid: end the run right after this epoch's checkpoint, as a kill there would."""
    step_delay_s: float = field(default=0.0, metadata=ranged(ge=0, hidden=True))
    """Testing aid: each rank sleeps this long after logging a step, which widens the window a
    test has to kill a rank in the middle of an epoch (a fast step on the CPU can outrun it)."""
    val: str | None = field(default=None, metadata=DATASET)
    """Held-out dataset (or URL) with the training set's class list: rank 0 runs the k-NN
    probe on the current encoder (DINO's, k = 20, T = 0.07) and logs it in metrics.jsonl."""
    eval_every: int = field(default=0, metadata=ranged(ge=0))
    """With --val: the k-NN probe every K epochs, and after the last one (0: the last only)."""

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data:
            raise TrainError(f"train needs --data DIR (got {self.data!r})")
        check_fields(self, TrainError)  # types, ranges and choices, declared with the fields
        _resolve(self)
        _resolve_ibot(self)
        check_fields(self, TrainError)  # the ratios just resolved
        _check_counts(self)
        _check_model(self)
        _check_ratios(self)
        _check_strategy(self)
        _check_automae(self)
        _check_training(self)
        _check_resources(self)
        _check_ibot(self)

    @property
    def framework(self) -> str:
        """The pretraining family (``trainer.family.FAMILIES``): ``family``, else the model's."""
        return family_of(self.model, self.family)

    @property
    def unit(self) -> int:
        """Patches per side of a mask unit (1 without ``mask_unit``)."""
        return 1 if self.mask_unit is None else self.mask_unit // self.patch_size

    @property
    def needs_saliency(self) -> bool:
        """Whether the run reads maps from the store: a saliency strategy, unless iBOT plans
        its masks from its own teacher in the step (``saliency_source`` online)."""
        return self.strategy in NEEDS_SALIENCY and self.saliency_source != "online"

    @property
    def maps_from(self) -> str | None:
        """Where the masks' maps come from: ``"online"`` (iBOT's or AutoMAE's teacher, in the
        step), ``"store"``, or None (the strategy reads no map)."""
        if self.framework == "automae":  # its generator's per-head maps
            return self.map_source
        if self.strategy not in NEEDS_SALIENCY:
            return None
        return "store" if self.needs_saliency else "online"

    @property
    def random_warmup(self) -> bool:
        """Whether AMT's random warm-up of the masks applies (``warmup_mask_ratio`` until
        ``warmup_epochs`` are done and a generation exists): a run that reads the store,
        except iBOT, which masks on its own schedule from the first step (while no map
        exists the loader plans its views at random with iBOT's ratio and ``mask_prob``)."""
        return self.needs_saliency and self.framework != "ibot"

    @property
    def family_loader_fields(self) -> dict:
        """The ``LoaderConfig`` fields the family's batches need (``Family.loader_fields``:
        AutoMAE's per-head maps with the store source), or ``{}``."""
        from salient.trainer.family import FAMILIES  # lazy: torch (module docstring)

        family = FAMILIES[self.framework]
        return family.loader_fields(family.settings(self))

    @property
    def reads_store(self) -> bool:
        """Whether the loader binds the store's generations: a strategy that reads maps, or a
        family whose batches carry the store's per-head maps."""
        return self.needs_saliency or bool(self.family_loader_fields.get("head_maps"))

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

    def lr_schedule(self, steps_per_epoch: int) -> WarmupCosine:
        """The learning rate of every optimiser step: MAE's warmup and cosine, in steps."""
        return WarmupCosine(
            self.base_lr,
            self.epochs * steps_per_epoch,
            self.lr_warmup * steps_per_epoch,
            self.min_lr,
        )

    def schedule_warnings(self, steps_per_epoch: int | None = None) -> list[str]:
        """One line for each part of the schedule that cannot do its work: an lr warmup longer
        than the run (the peak rate is never used), a masking warmup that covers every epoch
        (the strategy is never used) and, given the optimiser steps of an epoch, rates too
        small to move the weights (:data:`LR_SUM_FLOOR`)."""
        notes = []
        total = None if steps_per_epoch is None else self.lr_schedule(steps_per_epoch).total()
        if total is not None and total < LR_SUM_FLOOR:
            notes.append(
                f"the learning rates of this run's {self.epochs * steps_per_epoch} steps sum to "
                f"{total:.2g}, so AdamW moves no weight by more than that (ViT weights start at "
                "~0.02): the encoder barely changes; raise --blr (or --lr) or --epochs"
            )
        if self.lr_warmup > self.epochs:
            notes.append(
                f"--lr-warmup-epochs {self.lr_warmup} is longer than --epochs {self.epochs}: the "
                f"learning rate reaches {self.epochs / self.lr_warmup:.0%} of its peak "
                f"{self.base_lr:.3g}; lower --lr-warmup-epochs"
            )
        if self.needs_saliency and self.warmup_epochs >= self.epochs:
            notes.append(
                f"--warmup-epochs {self.warmup_epochs} covers all --epochs {self.epochs}: every "
                f"epoch masks at random and --strategy {self.strategy} is never used; lower "
                "--warmup-epochs"
            )
        return notes

    def as_dict(self) -> dict:
        """Plain JSON values (what ``config.json`` and every checkpoint hold)."""
        return asdict(self)

    def loader_config(
        self, rank: int = 0, world: int = 1, device: str = "cpu", warmup: bool = False
    ) -> LoaderConfig:
        """The loader of ``rank`` of ``world``: the strategy's, or with ``warmup`` the warmup
        epochs' (random masking at ``warmup_mask_ratio``, no store, the same mask units), with
        the fields the family's batches need (``Family.loader_fields``: iBOT's views)."""
        main = LoaderConfig(
            data=self.data,
            store=self.store if self.reads_store else None,
            image_size=self.image_size,
            patch_size=self.patch_size,
            batch_size=self.batch_size,
            strategy=self.strategy,
            mask_ratio=self.mask_ratio,
            throw_ratio=self.throw_ratio,
            strategy_options=dict(self.strategy_options),
            crop_scale=tuple(self.crop_scale),
            interpolation=self.interpolation,
            mask_unit=self.mask_unit,
            gpa_target=self.gpa_loss_weight > 0,
            seed=self.seed,
            num_workers=self.loader_workers,
            rank=rank,
            world_size=world,
            device=device,
            epochs=self.epochs,
            **self.family_loader_fields,
        )
        if not warmup:
            return main
        return replace(
            main,
            store=None,
            strategy="random",
            mask_ratio=self.warmup_mask_ratio,
            throw_ratio=0.0,
            strategy_options={},
            gpa_target=False,
        )

    def refresh_config(self, teacher: str) -> RefreshConfig:
        """The refresh this run launches from the checkpoint ``teacher``: its map kind,
        reduction, block and head (``saliency_*``) and its actors (``refresh_*``). It waits
        for a refresh of the same maps still running from before a restart instead of
        failing beside it (``wait_for_other``)."""
        return RefreshConfig(
            data=self.data,
            store=self.store,
            teacher=teacher,
            kind=self.saliency_kind,
            reduce=self.saliency_reduce,
            block=self.saliency_block,
            head=self.saliency_head,
            image_size=self.image_size,
            batch_size=self.refresh_batch_size,
            workers=self.refresh_actors,
            cpus_per_worker=self.refresh_cpus,
            gpus_per_worker=self.refresh_gpu_share,
            placement_timeout_s=self.placement_timeout_s,
            wait_for_other=True,
        )


# AdamW's betas of a family left unset: MAE's main_pretrain.py AdamW(betas=(0.9, 0.95));
# iBOT's main_ibot.py torch.optim.AdamW(params_groups): torch's defaults (0.9, 0.999)
_BETAS = {"mae": (0.9, 0.95), "ibot": (0.9, 0.999)}


def _resolve(c: TrainConfig) -> None:
    """Fill unset ratios with the strategy's paper values; tuples for pairs given as lists
    (a JSON config gives lists). The config is frozen: ``object.__setattr__``."""

    mask, throw = resolve_ratios(c.strategy, c.mask_ratio, c.throw_ratio, c.framework)
    object.__setattr__(c, "mask_ratio", mask)
    object.__setattr__(c, "throw_ratio", throw)
    if c.betas is None:
        object.__setattr__(c, "betas", _BETAS.get(c.framework, _BETAS["mae"]))
    for name in ("crop_scale", "betas"):
        value = getattr(c, name)
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise TrainError(f"{flag_of(TrainConfig, name)} takes two numbers (got {value!r})")
        object.__setattr__(c, name, tuple(value))
    _accumulation(c)  # checked now; kept unresolved, so a config file with other --workers
    # still holds its effective batch (the ``accum_steps`` property resolves it)
    if c.maps is None:  # a run that refreshes reads its own maps (jobs/train/maps.py)
        object.__setattr__(c, "maps", "own" if c.refreshes else "any")


def _accumulation(c: TrainConfig) -> int:
    """``accum_iter``, given or from ``effective_batch`` (MAE: effective batch = batch ×
    workers × accum_iter)."""
    per_pass = c.batch_size * c.workers
    if c.effective_batch is None:
        return 1 if c.accum_iter is None else c.accum_iter
    if c.effective_batch < per_pass:
        fits = c.effective_batch // c.workers
        raise TrainError(
            f"--effective-batch {c.effective_batch} is smaller than one pass of --batch-size × "
            f"--workers ({c.batch_size} × {c.workers} = {per_pass}); "
            + (f"set --batch-size {fits}" if fits else "raise --effective-batch")
        )
    if c.effective_batch % per_pass:
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
    if c.eval_every and not c.val:
        raise TrainError("--eval-every needs --val DIR, the held-out set the probe measures")
    if c.stop_after_epochs is not None and c.stop_after_epochs > c.epochs:
        raise TrainError(
            f"--stop-after-epochs must be in 1..{c.epochs} (got {c.stop_after_epochs})"
        )


def _check_ratios(c: TrainConfig) -> None:
    flags = (flag_of(TrainConfig, "mask_ratio"), flag_of(TrainConfig, "throw_ratio"))
    check_ratio_sum(c.mask_ratio, c.throw_ratio, TrainError, flags)


def _check_model(c: TrainConfig) -> None:
    if c.image_size % c.patch_size:
        raise TrainError(
            f"--image-size {c.image_size} is not a multiple of --patch-size "
            f"{c.patch_size}; use e.g. {max(1, c.image_size // c.patch_size) * c.patch_size}"
        )
    if c.norm_pix_loss and c.framework not in ("mae", "automae"):
        raise TrainError("--norm-pix-loss is an MAE option; SimMIM regresses raw pixels (L1)")


def _check_strategy(c: TrainConfig) -> None:
    if c.needs_saliency and not c.store:
        raise TrainError(
            f"--strategy {c.strategy} needs saliency maps: give --store URL (a "
            "refresh creates it), or use --strategy random"
        )
    _check_options(c)


def _check_options(c: TrainConfig) -> None:
    """One plan of the strategy with its options on the run's (unit) grid."""
    if not isinstance(c.strategy_options, dict):
        raise TrainError(
            "--strategy-option takes KEY=VALUE pairs (in a config file, a mapping of the "
            f"strategy's options); got a {type(c.strategy_options).__name__}"
        )
    if not c.strategy_options:  # nothing to try: the ratios are checked without torch
        return
    units = (c.image_size // c.patch_size // c.unit) ** 2
    flags = c.framework == "ibot"  # iBOT's masks: plan_mask_flags, nothing thrown
    from salient.pipeline.masking import check_options  # lazy: torch (module docstring)

    try:
        check_options(c.strategy, c.strategy_options, units, c.mask_ratio, c.throw_ratio, 1, flags)
    except MaskError as exc:
        raise TrainError(f"--strategy-option: {exc}") from None


def _check_automae(c: TrainConfig) -> None:
    """AutoMAE's settings together (README, "Decisions"); its own fields only with it."""
    if c.framework == "automae":
        problems = _automae_problems(c)
        if problems:
            raise TrainError(problems[0])
        return
    if c.saliency_kind == "heads":
        raise TrainError(
            "--saliency-kind heads stores per-head maps, which only AutoMAE reads "
            "(--family automae); mask strategies read cls_attn or gpa"
        )
    given = [f for f in ("map_teacher", "generator_heads") if getattr(c, f) is not None]
    given += ["map_source"] if c.map_source != "store" else []
    if given:
        raise TrainError(
            f"{', '.join(flag_of(TrainConfig, f) for f in given)} set an AutoMAE run; "
            "add --family automae (with an mae-* --model) or drop them"
        )


def _automae_problems(c: TrainConfig) -> list[str]:
    """One line per setting AutoMAE cannot take."""
    n = (c.image_size // c.patch_size) ** 2
    keep = int(n * (1 - c.mask_ratio))  # models_mae.py random_masking: len_keep
    checks = [
        (MODEL_FAMILIES[c.model] != "mae", "--family automae trains an MAE (its decoder "
         "reconstructs the masked patches); use an mae-* --model"),
        (c.strategy != "random", f"--family automae masks with its learned generator, not "
         f"--strategy {c.strategy}; use --strategy random (the loader's plan goes unused)"),
        (c.throw_ratio or c.mask_unit or c.gpa_loss_weight, "AutoMAE masks single patches and "
         "throws none (models_mae.py random_masking); drop --throw-ratio, --mask-unit and "
         "--gpa-loss-weight"),
        (not 0 < keep < n, f"--mask-ratio {c.mask_ratio} keeps {keep} of {n} patches; "
         "AutoMAE needs some kept and some masked (its code: 0.75)"),
        (c.map_source == "store" and not c.store, "--map-source store reads AutoMAE's per-head "
         "maps from --store URL (made by `salient refresh --kind heads`); give it, or use "
         "--map-source online --map-teacher …"),
        (c.map_source == "online" and not c.map_teacher, "--map-source online needs "
         "--map-teacher (a checkpoint, or timm:NAME with --map-teacher-weights): the frozen "
         "teacher run on every batch"),
        (c.map_source == "store" and c.map_teacher, "--map-teacher is the online source's "
         "teacher; add --map-source online, or drop it (the store's maps come from "
         "`salient refresh --kind heads --teacher …`)"),
        (c.map_teacher_weights and not c.map_teacher, "--map-teacher-weights needs "
         "--map-teacher timm:NAME"),
    ]  # fmt: skip
    return [message for bad, message in checks if bad]


def _check_training(c: TrainConfig) -> None:
    check_scale(c.crop_scale, TrainError, flag_of(TrainConfig, "crop_scale"), "MAE: 0.2 1")
    if not all(0 <= b < 1 for b in c.betas):
        raise TrainError(f"--betas must lie in [0, 1) (got {c.betas})")
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
    gpus = c.refresh_gpus
    if gpus is not None and not (0 <= gpus < 1 or (gpus >= 1 and float(gpus).is_integer())):
        raise TrainError(
            f"--refresh-gpus must be a share in [0, 1) of a training GPU or a whole number of "
            f"dedicated GPUs (got {gpus})"
        )


# ---------------------------------------------------------------- iBOT's settings

# TrainConfig fields that only iBOT reads (saliency_source is checked on its own)
_IBOT_FIELDS = (
    "momentum_teacher",
    "teacher_temp",
    "warmup_teacher_temp",
    "teacher_patch_temp",
    "warmup_teacher_patch_temp",
    "warmup_teacher_temp_epochs",
    "norm_last_layer",
    "out_dim",
    "drop_path",
    "lambda1",
    "lambda2",
    "weight_decay_end",
    "freeze_last_layer",
    "local_crops",
    "local_size",
    "local_scale",
)


def _resolve_ibot(c: TrainConfig) -> None:
    """iBOT's unset settings: the online source, and the schedule options of its masks
    (``IBOTSettings``: half the views masked, the ratio ± 0.2 per batch) where not given;
    every other family reads the store. Resolved, so ``config.json`` shows them."""
    ibot = c.framework == "ibot"
    if c.saliency_source is None:
        object.__setattr__(c, "saliency_source", "online" if ibot else "store")
    value = c.local_scale
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise TrainError(f"--local-scale takes two numbers (got {value!r})")
    object.__setattr__(c, "local_scale", tuple(value))
    if ibot and isinstance(c.strategy_options, dict):
        defaults = {k: IBOTSettings().strategy_options[k] for k in SCHEDULE_OPTIONS}
        object.__setattr__(c, "strategy_options", {**defaults, **c.strategy_options})


def _check_ibot(c: TrainConfig) -> None:
    """iBOT's settings fit the run: only iBOT reads them, and iBOT's views mask tokens only."""
    if c.framework != "ibot":
        changed = [
            flag_of(TrainConfig, name)
            for name in _IBOT_FIELDS
            if getattr(c, name) != TrainConfig.__dataclass_fields__[name].default
        ]
        if changed or c.saliency_source == "online":
            flags = ", ".join(changed) or "--saliency-source online"
            raise TrainError(
                f"{flags}: iBOT settings, but this run trains {c.framework}; use --model "
                "ibot-* or drop them"
            )
        return
    if c.throw_ratio or c.mask_unit is not None or c.gpa_loss_weight:
        raise TrainError(
            f"iBOT masks single tokens and throws none: set --throw-ratio 0 and drop "
            f"--mask-unit and --gpa-loss-weight (got {c.throw_ratio}, {c.mask_unit}, "
            f"{c.gpa_loss_weight})"
        )
    check_scale(c.local_scale, TrainError, flag_of(TrainConfig, "local_scale"), "iBOT: 0.05 0.25")
    if c.local_size % c.patch_size:
        raise TrainError(
            f"--local-size {c.local_size} is not a multiple of --patch-size {c.patch_size}; "
            "iBOT: 96 with 16 px patches"
        )


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
        map_teacher=_local_file(config.map_teacher),
        map_teacher_weights=_local_file(config.map_teacher_weights),
    )


def _local_file(path: str | None) -> str | None:
    """A local file's absolute path (AutoMAE's online teacher, read by every worker);
    ``timm:NAME`` and None as given."""
    if path is None or path.startswith("timm:"):
        return path
    return str(Path(path).expanduser().resolve())
