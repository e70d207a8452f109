"""``salient demo``'s flags: :class:`DemoConfig`, without the stages (which load torch, timm
and Ray), so a mistyped flag answers at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from salient import urls
from salient.errors import SalientError
from salient.settings import check_fields, ranged

__all__ = ["DemoConfig"]


@dataclass(frozen=True)
class DemoConfig:
    """The demo run: sizes chosen to finish in a few minutes on 2 CPU cores."""

    out: str = "demo_run"
    """Working directory: data/, saliency.zarr, run/ and report/ go there."""
    n: int = field(default=2000, metadata=ranged(ge=16))
    """Demo scenes to ingest (the training split)."""
    seed: int = field(default=0, metadata=ranged(ge=0))
    """Seed of the scenes, the model, the crops and the masks."""
    image_size: int = field(default=192, metadata=ranged(ge=1))
    """Side of the stored scenes in pixels (the trainer crops them to --train-size)."""
    shard_size: int = field(default=500, metadata=ranged(ge=1))
    """Scenes per shard."""
    model: str = "mae-tiny"
    """Model trained (and, through its checkpoints, the teacher)."""
    train_size: int = field(default=64, metadata=ranged(ge=1))
    """Side of the training crops; 64 px keeps MAE-Tiny near 20 img/s per 2 cores."""
    patch_size: int = field(default=8, metadata=ranged(ge=1))
    """ViT patch side: 8 px patches give an 8 x 8 grid at 64 px."""
    epochs: int = field(default=5, metadata=ranged(ge=1))
    """Training epochs."""
    warmup_epochs: int = field(default=2, metadata=ranged(ge=0))
    """Epochs of random masking before the first refresh."""
    refresh_every: int = field(default=1, metadata=ranged(ge=0))
    """Epochs between refreshes (AMT: 40 of 400; the demo refreshes after every epoch)."""
    workers: int = field(default=2, metadata=ranged(ge=1))
    """Ray Train workers (DDP over gloo)."""
    batch_size: int = field(default=64, metadata=ranged(ge=1))
    """Images per step on each worker."""
    report_images: int = field(default=12, metadata=ranged(ge=1))
    """Panels in the inspection report."""
    val_n: int = field(default=500, metadata=ranged(ge=16))
    """Held-out scenes (the val split: the same classes, never a training scene) that the
    final checkpoint's k-NN probe is measured on."""
    fresh: bool = False
    """Start over: remove OUT first."""
    json: bool = False
    """Print the full summary as JSON (it is always written to OUT/summary.json)."""
    data: str | None = None
    """Where the demo dataset lives (a path or s3:// / gs:// URL); default OUT/data."""
    store: str | None = None
    """Where the saliency store lives (a path or s3:// / gs:// URL); default OUT/saliency.zarr."""

    def __post_init__(self):
        check_fields(self, SalientError)  # types and ranges, declared with the fields
        if urls.is_remote(self.out):
            raise SalientError(
                f"--out {self.out} must be a local folder (the run's checkpoints and the report); "
                "put the dataset and the store on object storage with --data and --store"
            )
        if self.epochs <= self.warmup_epochs:
            raise SalientError(
                f"the demo needs --epochs > --warmup-epochs ({self.epochs} <= "
                f"{self.warmup_epochs}) so that AMT epochs follow the warmup"
            )
