"""``salient bench``'s flags: :class:`BenchConfig` and the benchmarks' names, without the
benchmarks themselves (which load torch, timm and Ray), so a mistyped flag answers at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.jobs.compare.config import CompareConfig
from salient.jobs.flags import declared_field
from salient.settings import check_fields

__all__ = ["BENCH_NAMES", "BenchConfig"]

# each one a module jobs/bench/<name>.py with bench_<name>; driver.BENCHES maps them
BENCH_NAMES = (
    "store",
    "masking",
    "loader",
    "refresh",
    "train",
    "ibot",
    "gpu",
    "quality",
    "automae",
)


@dataclass(frozen=True)
class BenchConfig:
    """``salient bench WHAT``: which benchmark, where, and how big."""

    what: str = field(default=None, metadata={"positional": True, "choices": lambda: BENCH_NAMES})
    """The benchmark to run."""
    quick: bool = False
    """Small sizes: a smoke run that proves the benchmark works, not a figure."""
    device: str = "auto"
    """auto (CUDA when there is one), cpu, or cuda."""
    out: str | None = None
    """Also append the JSON line to this file; gpu: the directory its figure lines go to."""
    data: str | None = None
    """loader, refresh, ibot: benchmark this dataset (path or URL) instead of a generated demo
    set."""
    epochs: int | None = declared_field(CompareConfig, "epochs", default=None)
    """quality: training epochs of each arm (default: 8 on the CPU, 40 on CUDA; --quick 2)."""
    n: int | None = declared_field(CompareConfig, "n", default=None)
    """quality: demo training scenes (default: 2000 on the CPU, 20000 on CUDA); the held-out
    split is a quarter of it."""
    image_size: int | None = declared_field(CompareConfig, "image_size", default=None)
    """quality: training crop side in pixels (default: 64 on the CPU, 224 on CUDA)."""
    seeds: int | None = declared_field(CompareConfig, "seeds", default=None)
    """quality: runs of each arm (default 1); the tables give mean ± sd over them."""
    arms: tuple[str, ...] | None = None
    """quality: the arms, comma-separated, as ``salient compare --arms`` takes them (default:
    random,amt-label,amt-self), e.g. random,ibot,attmask-ibot-high,automae."""
    keep: str | None = None
    """quality: keep the comparison (runs, stores, features, compare.json, index.html) in this
    directory (default: removed)."""
    teacher: str | None = None
    """automae: the frozen teacher, a checkpoint or timm:NAME (random weights); default: a ViT
    trained here on the demo labels."""

    def __post_init__(self):
        if self.what not in BENCH_NAMES:
            raise SalientError(
                f"bench needs WHAT, one of {', '.join(sorted(BENCH_NAMES))} (got {self.what!r})"
            )
        check_fields(self, SalientError)  # types and ranges, declared with the fields
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise SalientError(f"--device must be auto, cpu or cuda[:N] (got {self.device!r})")
