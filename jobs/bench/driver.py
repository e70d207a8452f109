"""``salient bench WHAT``: benchmarks that print one JSON object.

Each benchmark lives in ``jobs/bench/<what>.py`` as ``bench_<what>(quick, device) -> dict``;
this module only dispatches and stamps the result with the device, versions and date, so a
figure in BENCHMARKS.md always says where and when it was measured.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field, fields

from salient.errors import SalientError
from salient.jobs.bench.automae import bench_automae
from salient.jobs.bench.gpu import bench_gpu
from salient.jobs.bench.ibot import bench_ibot
from salient.jobs.bench.loader import bench_loader
from salient.jobs.bench.masking import bench_masking
from salient.jobs.bench.quality import bench_quality
from salient.jobs.bench.refresh import bench_refresh
from salient.jobs.bench.stamp import device_info, stamp_now
from salient.jobs.bench.store import bench_store
from salient.jobs.bench.train import bench_train

__all__ = ["BENCHES", "BenchConfig", "run_bench", "run_bench_job"]

# name -> the benchmark's function, ``bench_<name>(quick, ...) -> dict``
BENCHES = {
    "store": bench_store,
    "masking": bench_masking,
    "loader": bench_loader,
    "refresh": bench_refresh,
    "train": bench_train,
    "ibot": bench_ibot,
    "gpu": bench_gpu,
    "quality": bench_quality,
    "automae": bench_automae,
}


@dataclass(frozen=True)
class BenchConfig:
    """``salient bench WHAT``: which benchmark, where, and how big."""

    what: str = field(default=None, metadata={"positional": True, "choices": lambda: BENCHES})
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
    epochs: int | None = None
    """quality: training epochs of each arm (default: 8 on the CPU, 40 on CUDA; --quick 2)."""
    n: int | None = None
    """quality: demo training scenes (default: 2000 on the CPU, 20000 on CUDA); the held-out
    split is a quarter of it."""
    image_size: int | None = None
    """quality: training crop side in pixels (default: 64 on the CPU, 224 on CUDA)."""
    seeds: int | None = None
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
        if self.what not in BENCHES:
            raise SalientError(
                f"bench needs WHAT, one of {', '.join(sorted(BENCHES))} (got {self.what!r})"
            )
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise SalientError(f"--device must be auto, cpu or cuda[:N] (got {self.device!r})")


_COMMON = ("what", "quick", "device", "out")  # BenchConfig fields that are not options


def run_bench_job(config: BenchConfig) -> dict:
    """The ``salient bench`` job: run the benchmark; append its JSON line to ``out`` if given
    (a benchmark that writes its own files, such as gpu, takes ``out`` as its directory)."""
    # every option field given (a benchmark refuses options it does not take)
    given = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _COMMON}
    options = {k: v for k, v in given.items() if v not in (None, False)}
    writes_own = "out" in inspect.signature(BENCHES[config.what]).parameters
    if writes_own:
        options["out"] = config.out
    result = run_bench(config.what, quick=config.quick, device=config.device, **options)
    if config.out and not writes_own:
        with open(config.out, "a") as stream:
            stream.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    return result


def run_bench(what: str, quick: bool = False, device: str = "auto", **options) -> dict:
    """Run benchmark ``what`` and return its figures plus the device, versions and date.

    ``options`` go to the benchmark function; one it does not take is a SalientError."""
    fn = BENCHES[what]
    info = device_info(device)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
        raise SalientError(f"salient bench {what} takes no {flags}; drop it")
    kwargs = {"quick": quick, **options}
    if "device" in params:
        kwargs["device"] = info["device"]
    result = fn(**kwargs)
    stamp = stamp_now()
    return {"bench": what, "quick": quick, **info, "date": stamp, **options, **result}
