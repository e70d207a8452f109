"""``salient bench WHAT``: benchmarks that print one JSON object.

Each benchmark lives in ``jobs/bench/<what>.py`` as ``bench_<what>(quick, device) -> dict``;
this module only dispatches and stamps the result with the device, versions and date, so a
figure in BENCHMARKS.md always says where and when it was measured.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields

from salient.errors import SalientError
from salient.jobs.bench.automae import bench_automae
from salient.jobs.bench.config import BENCH_NAMES, BenchConfig
from salient.jobs.bench.gpu import bench_gpu
from salient.jobs.bench.ibot import bench_ibot
from salient.jobs.bench.loader import bench_loader
from salient.jobs.bench.masking import bench_masking
from salient.jobs.bench.quality import bench_quality
from salient.jobs.bench.refresh import bench_refresh
from salient.jobs.bench.stamp import device_info, stamp_now
from salient.jobs.bench.store import bench_store
from salient.jobs.bench.train import bench_train

__all__ = ["BENCHES", "run_bench", "run_bench_job"]

# name -> the benchmark's function, ``bench_<name>(quick, ...) -> dict``; the names are also
# declared, torch-free, in config.BENCH_NAMES (the flags parse before this module loads)
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
if tuple(BENCHES) != BENCH_NAMES:
    raise ImportError(f"BENCHES {tuple(BENCHES)} must match config.BENCH_NAMES {BENCH_NAMES}")

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
        # quality is the demo preset's comparison; the compare job takes any dataset
        yours = "; on your data: salient compare --data D --val V" if what == "quality" else ""
        raise SalientError(f"salient bench {what} takes no {flags}; drop it{yours}")
    kwargs = {"quick": quick, **options}
    if "device" in params:
        kwargs["device"] = info["device"]
    result = fn(**kwargs)
    stamp = stamp_now()
    return {"bench": what, "quick": quick, **info, "date": stamp, **options, **result}
