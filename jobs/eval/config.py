"""``EvalConfig``: one ``salient eval`` run's settings, checked when built.

Its module imports no torch, timm or Ray, so that a parser, ``--help`` and a bad flag answer
before they load (docs/ARCHITECTURE.md, "Start-up"); the driver (``jobs.eval.driver``) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient import urls
from salient.errors import SalientError
from salient.settings import DATASET, check_fields, ranged

__all__ = ["EVAL_CROP_RATIO", "EvalConfig", "EvalError"]

EVAL_CROP_RATIO = 0.875  # MAE main_linprobe.py (from DeiT): Resize(256) + CenterCrop(224)
_PROBE_DEVICES = ("auto", "cpu", "cuda")


class EvalError(SalientError):
    """An eval that cannot start: datasets of other classes, an encoder that is not a ViT, …"""


@dataclass(frozen=True)
class EvalConfig:
    """One ``salient eval`` run; checks itself when built (raises EvalError)."""

    checkpoint: str
    """A salient checkpoint file, or timm:NAME with --weights FILE (loaded as refresh loads
    teachers; nothing is downloaded)."""
    data: str = field(metadata=DATASET)
    """Training dataset (written by ingest): the k-NN memory and the linear probe's train set."""
    val: str = field(metadata=DATASET)
    """Held-out dataset with the same class list (`salient ingest --demo --split val`, or a
    folder ingested with --classes-from DATA)."""
    out: str = "eval"
    """Local directory for eval.json and the feature cache (features/), reused by later runs."""
    weights: str | None = None
    """Local weights file for timm:NAME (.safetensors or .pth)."""
    allow_random: bool = False
    """Accept timm:NAME without --weights (random weights, seeded)."""
    baseline: bool = False
    """Also probe the same architecture at its random initialisation (a salient checkpoint: the
    init of its own run, from its config and seed): the baseline a trained encoder must beat."""
    knn: bool = False
    """Run the weighted k-NN probe (neither --knn nor --linear: both)."""
    linear: bool = False
    """Run the linear probe (neither --knn nor --linear: both)."""
    k: int = field(default=20, metadata=ranged(ge=1))
    """Neighbours that vote in the k-NN probe (DINO eval_knn: 20)."""
    temperature: float = field(default=0.07, metadata=ranged(gt=0))
    """k-NN vote weight exp(cosine / T) (DINO eval_knn: 0.07)."""
    linear_epochs: int = field(default=90, metadata=ranged(ge=1))
    """Epochs of the linear probe (MAE linear probing: 90, 10 of them warmup)."""
    linear_lr: float | None = field(default=None, metadata=ranged(gt=0))
    """Peak learning rate of the linear probe (default: MAE's rule, 0.1 × batch / 256)."""
    linear_batch: int = field(default=256, metadata=ranged(ge=1))
    """Batch size of the linear probe."""
    seed: int = 0
    """Seed of the linear probe's init and batch order."""
    image_size: int | None = field(default=None, metadata=ranged(ge=1))
    """Side S of the evaluation view (default: the checkpoint's training size; timm: 224)."""
    crop_ratio: float = field(default=EVAL_CROP_RATIO, metadata=ranged(gt=0, le=1))
    """Centre-crop ratio of the view: resize the shorter side to S / ratio, crop S × S (MAE
    linear probing: Resize(256) + CenterCrop(224), 0.875; 1 keeps the whole shorter side)."""
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per forward in a worker."""
    workers: int = field(default=1, metadata=ranged(ge=1))
    """Feature actors (one shard per task)."""
    gpus_per_worker: float = field(default=0.0, metadata=ranged(ge=0))
    """GPUs per actor (> 0: nvjpeg decode and bf16 autocast)."""
    cpus_per_worker: float = field(default=0.5, metadata=ranged(gt=0))
    """Ray CPU reservation of one actor (fractions are fine)."""
    address: str | None = None
    """Ray cluster address (default: an embedded local Ray, or RAY_ADDRESS)."""
    max_retries: int = field(default=3, metadata=ranged(ge=0))
    """Retries of a shard whose worker died."""
    placement_timeout_s: float = field(default=60.0, metadata=ranged(gt=0))
    """Seconds to wait for Ray to place the feature actors before stopping with what is
    missing."""
    probe_device: str = field(default="auto", metadata={"choices": lambda: _PROBE_DEVICES})
    """Where the probes run on the driver: auto (cuda when the driver has one), cpu, cuda."""

    def __post_init__(self):
        for name in ("checkpoint", "data", "val", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise EvalError(f"eval needs --{name} (got {getattr(self, name)!r})")
        if urls.is_remote(self.out):
            raise EvalError(
                f"--out {self.out} must be a local folder (eval.json and the feature cache); "
                "--data and --val may be URLs"
            )
        check_fields(self, EvalError)  # types, ranges and choices, declared with the fields

    @property
    def probes(self) -> tuple[str, ...]:
        """The probes to run: those asked for, or both when neither is."""
        asked = tuple(p for p in ("knn", "linear") if getattr(self, p))
        return asked or ("knn", "linear")
