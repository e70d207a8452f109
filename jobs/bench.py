"""``salient bench WHAT``: benchmarks that print one JSON object.

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
    "quality": "bench_quality",
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


def run_bench(what: str, quick: bool = False, device: str = "auto", **options) -> dict:
    """Run benchmark ``what`` and return its figures plus the device, versions and date.

    ``options`` (None values are left out) go to benchmarks that take them (``quality``:
    ``epochs``, ``n``, ``image_size``, ``label_teacher``, ``keep``); others refuse them.
    """
    from salient.errors import SalientError

    module = importlib.import_module(f"salient.jobs.{BENCHES[what]}")
    fn = getattr(module, f"bench_{what}")
    info = device_info(device)
    accepted = inspect.signature(fn).parameters
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    unknown = sorted(set(options) - set(accepted) - {"quick", "device"})
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise SalientError(f"salient bench {what} takes no {flags}; drop it")
    kwargs = {"quick": quick, **options}
    if "device" in accepted:
        kwargs["device"] = info["device"]
    result = fn(**kwargs)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return {"bench": what, "quick": quick, **info, "date": stamp, **options, **result}
