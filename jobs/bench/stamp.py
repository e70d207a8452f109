"""Where and when a figure was measured: the device, versions and date every benchmark carries."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

__all__ = ["device_info", "stamp_now"]


def device_info(device: str = "auto") -> dict:
    """The resolved device and a description of the machine it is on."""
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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def stamp_now() -> str:
    """The time now, ISO 8601 UTC to the second: the date every figure carries."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
