"""``salient bench WHAT``: throughput benchmarks that print one JSON object.

Each benchmark lives in ``jobs/bench_<what>.py`` as ``bench_<what>(quick, device) -> dict``;
this module only dispatches and stamps the result with the device, versions and date, so a
figure in BENCHMARKS.md always says where and when it was measured.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import platform

__all__ = ["BENCHES", "device_info", "run_bench"]

# name -> module under salient.jobs holding `bench_<name>`
BENCHES = {
    "store": "bench_store",
    "masking": "bench_masking",
    "loader": "bench_loader",
    "refresh": "bench_refresh",
    "train": "bench_train",
}


def device_info(device: str = "auto") -> dict:
    """The resolved device and a description of the machine it is on."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "device": device,
        "host_cpus": _cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_bench(
    what: str, quick: bool = False, device: str = "auto", data: str | None = None
) -> dict:
    """Run benchmark ``what`` and return its figures plus the device, versions and date.

    ``data``: an existing dataset (path or URL) for the benchmarks that take one (loader,
    refresh); the others refuse it.
    """
    from salient.errors import SalientError

    module = importlib.import_module(f"salient.jobs.{BENCHES[what]}")
    fn = getattr(module, f"bench_{what}")
    info = device_info(device)
    kwargs = {"quick": quick}
    parameters = inspect.signature(fn).parameters
    if "device" in parameters:
        kwargs["device"] = info["device"]
    if data is not None:
        if "data" not in parameters:
            raise SalientError(f"bench {what} takes no dataset; drop --data")
        kwargs["data"] = data
    result = fn(**kwargs)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return {"bench": what, "quick": quick, **info, "date": stamp, **result}
