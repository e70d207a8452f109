"""``CompareConfig``: one ``salient compare`` run's settings, checked when built.

The defaults are the demo preset on a CPU machine (MAE-Tiny at 64 px with 8 px patches, 8
epochs, 2 train workers): the size ``salient bench quality`` runs. ``DEMO_PRESETS`` holds the
other sizes of the bench: ``cuda`` (ViT-B at 224 px on 20,000 scenes) and ``quick`` (micro
models on 96 scenes, a smoke run). Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient import urls
from salient.errors import SalientError
from salient.jobs.compare.arms import ArmError, parse_arm
from salient.pipeline.demo import DEMO_VARIANTS
from salient.settings import DATASET, check_fields, ranged
from salient.trainer.specs import ENCODER_SIZES

__all__ = ["DEMO_PRESETS", "CompareConfig", "CompareError"]


class CompareError(SalientError):
    """A comparison that cannot run: bad settings, datasets without labels, unknown arms."""


# Sizes of ``salient bench quality`` beside the defaults (the CPU demo preset).
DEMO_PRESETS: dict[str, dict] = {
    "cpu": {},
    "cuda": {
        "size": "base",
        "n": 20000,
        "scene_size": 256,
        "image_size": 224,
        "patch_size": 16,
        "epochs": 40,
        "lr_warmup_epochs": 8,
        "warmup_epochs": 8,
        "refresh_every": 8,
        "batch_size": 128,
        "workers": 1,
        "loader_workers": 4,
        "gpu": True,
        "probe_every": 8,
    },
    "quick": {
        "size": "micro",
        "n": 96,
        "scene_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "epochs": 2,
        "lr_warmup_epochs": 1,
        "warmup_epochs": 1,
        "refresh_every": 1,
        "batch_size": 8,
        "probe_every": 1,
        "mask_samples": 64,
        "teacher_epochs": 2,
    },
}


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: the arms, the data they share, and the settings every arm trains with."""

    data: str | None = field(default=None, metadata=DATASET)
    """Training dataset (path or URL) that salient reads: ingested, or adopted shards. The
    arms train on it; it is the k-NN memory and the linear probe's training set. Omit with
    --demo."""
    val: str | None = field(default=None, metadata=DATASET)
    """Held-out dataset with the training set's class list (a demo val split, or a folder
    ingested with --classes-from DATA): what every probe measures."""
    out: str = "compare"
    """Local directory of the comparison: runs, stores, features, compare.json, index.html.
    The same command again continues: finished runs are kept."""
    demo: bool = False
    """Compose the demo set into OUT/data (train, and a held-out val split of a quarter of
    --n) and compare on it."""
    variant: str = field(default="colour-random", metadata={"choices": lambda: DEMO_VARIANTS})
    """Demo: colour-random (objects recoloured per scene, so colour does not name the class)
    or plain (each object keeps its photo's colours)."""
    n: int = field(default=2000, metadata=ranged(ge=16))
    """Demo: training scenes."""
    scene_size: int = field(default=192, metadata=ranged(ge=32))
    """Demo: scene side in pixels."""
    arms: tuple[str, ...] = ("random", "amt-label", "amt-self")
    """Comma-separated arms: recipe or strategy names, optionally with -self (maps from the
    arm's own checkpoints) or -label (the label-aware teacher's fixed maps), e.g.
    random,amt-self,amt-label,attmask-high-label,gpa-mae. The first is the reference the
    others are compared with."""
    seeds: int = field(default=1, metadata=ranged(ge=1))
    """Runs of each arm, with seeds --seed, --seed + 1, …; tables give mean ± sd over them."""
    seed: int = 0
    """The first seed (also the label teacher's)."""
    size: str = field(default="tiny", metadata={"choices": lambda: ENCODER_SIZES})
    """Encoder size of every arm (each arm's model family at this size) and of the label
    teacher: tiny (ViT-Ti), small, base; micro for tests."""
    image_size: int = field(default=64, metadata=ranged(ge=8))
    """Training crop side in pixels (also the teacher's and the probes' view)."""
    patch_size: int = field(default=8, metadata=ranged(ge=1))
    """ViT patch side in pixels."""
    epochs: int = field(default=8, metadata=ranged(ge=1))
    """Training epochs of every arm."""
    lr_warmup_epochs: int = field(default=2, metadata=ranged(ge=0))
    """Epochs of linear learning-rate warmup (then cosine to 0), the same for every arm; at
    most --epochs - 1."""
    warmup_epochs: int = field(default=2, metadata=ranged(ge=0))
    """Self-teacher arms: at most this many epochs of random masking before the first
    refresh (and at most --epochs - 1)."""
    refresh_every: int = field(default=2, metadata=ranged(ge=1))
    """Self-teacher arms: at most this many epochs between refreshes (waited for)."""
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per batch on each train worker (no gradient accumulation)."""
    workers: int = field(default=2, metadata=ranged(ge=1))
    """Train workers (DDP); also the refresh and feature actors."""
    blr: float = field(default=1.5e-4, metadata=ranged(gt=0))
    """Base learning rate of every arm: peak lr = blr × batch × workers / 256 (MAE's rule)."""
    momentum_teacher: float | None = field(default=None, metadata=ranged(ge=0, lt=1))
    """iBOT arms: the EMA teacher's momentum at the start, a cosine to 1 (default: the recipe's
    0.996, an EMA horizon of ~250 steps, longer than a short run; 0.99 is AttMask's 20 %
    ImageNet command)."""
    gpu: bool = False
    """One GPU per train worker and per actor."""
    loader_workers: int = field(default=1, metadata=ranged(ge=0))
    """DataLoader worker processes per train worker."""
    probe_every: int = field(default=2, metadata=ranged(ge=0))
    """k-NN probe of every K-th epoch's checkpoint for the curves (and the last; 0: the
    last only)."""
    final_maps: bool = True
    """Box lift of each run's final encoder (its CLS attention over the held-out split)."""
    mask_samples: int = field(default=512, metadata=ranged(ge=1))
    """Training images the masks-in-the-box share is measured on, through each run's loader."""
    teacher_epochs: int = field(default=8, metadata=ranged(ge=1))
    """Label teacher: epochs of supervised training on the dataset's labels."""
    teacher_lr: float = field(default=1e-3, metadata=ranged(gt=0))
    """Label teacher: AdamW's peak learning rate."""
    init_only: bool = False
    """Probe the arms' random initialisation only (each seed); train nothing."""
    address: str | None = None
    """Ray cluster address (default: an embedded local Ray, or RAY_ADDRESS)."""

    def __post_init__(self):
        check_fields(self, CompareError)  # types, ranges and choices, declared with the fields
        object.__setattr__(self, "arms", tuple(self.arms))
        self._check_data()
        self._check_arms()
        if self.image_size % self.patch_size:
            raise CompareError(
                f"--image-size {self.image_size} is not a multiple of --patch-size "
                f"{self.patch_size}; change one"
            )

    def _check_data(self) -> None:
        if self.demo and (self.data or self.val):
            raise CompareError("give either --data and --val or --demo, not both")
        if not self.demo and not (self.data and self.val):
            raise CompareError(
                "compare needs --data DATASET and --val HELD_OUT (same classes), or --demo"
            )
        if urls.is_remote(self.out):
            raise CompareError(f"--out {self.out} must be a local folder; --data may be a URL")

    def _check_arms(self) -> None:
        if not self.arms:
            raise CompareError("--arms names no arm; give e.g. random,amt-self,amt-label")
        if len(set(self.arms)) != len(self.arms):
            raise CompareError(f"--arms names an arm twice: {','.join(self.arms)}")
        for name in self.arms:
            try:
                parse_arm(name)
            except ArmError as exc:
                raise CompareError(str(exc)) from None

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def shared(self, data: str, seed: int) -> dict:
        """The settings every arm's run shares (``arms.arm_config`` reads them)."""
        return {
            "data": data,
            "seed": seed,
            "size": self.size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "epochs": self.epochs,
            "lr_warmup_epochs": min(self.lr_warmup_epochs, self.epochs - 1),
            "warmup_epochs": min(self.warmup_epochs, self.epochs - 1),
            "refresh_every": self.refresh_every,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "blr": self.blr,
            "momentum_teacher": self.momentum_teacher,
            "gpu": self.gpu,
            "loader_workers": self.loader_workers,
            "refresh_batch_size": 128,
            "address": self.address,
        }
