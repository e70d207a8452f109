"""``salient bench quality``: does attention-guided masking help? ``salient compare`` on the
demo preset, in one command.

The comparison (``salient.jobs.compare``) with ``--demo`` and its default arms — MAE with
random 75 % masks, AMT 45/40 on the fixed maps of a label-aware teacher, AMT 45/40 on maps
refreshed from the model itself — at the preset of the device (``DEMO_PRESETS``): on the
CPU, MAE-Tiny at 64 px with 8 px patches on 2,000 colour-randomised demo scenes (500 held out),
8 epochs; on CUDA, MAE-Base at 224 px on 20,000 scenes, 40 epochs; ``quick``, micro models on
96 scenes for a smoke run. ``epochs``, ``n``, ``image_size`` and ``seeds`` override the
preset, and ``arms`` (as ``salient compare --arms``: ``--arms a,b`` on the command line) the
default arms: the
iBOT and AutoMAE arms are ``random,ibot,attmask-ibot-high,attmask-ibot-high-self,automae``.
Returns the comparison's summary (``compare.json`` without the per-run records).
"""

from __future__ import annotations

import shutil
import tempfile

from salient.jobs.compare import CompareConfig, run_compare
from salient.jobs.compare.config import DEMO_PRESETS
from salient.jobs.runtime.interrupt import Interrupted

__all__ = ["bench_quality"]


def bench_quality(
    quick: bool = False,
    device: str = "cpu",
    epochs: int | None = None,
    n: int | None = None,
    image_size: int | None = None,
    seeds: int | None = None,
    arms: tuple[str, ...] | None = None,
    keep: str | None = None,
) -> dict:
    """Run the demo comparison; ``keep``: a directory to keep it in (by default a temporary
    one, removed after)."""
    preset = DEMO_PRESETS["quick" if quick else "cuda" if device.startswith("cuda") else "cpu"]
    given = {"epochs": epochs, "n": n, "image_size": image_size, "seeds": seeds, "arms": arms}
    root = keep or tempfile.mkdtemp(prefix="salient-bench-quality-")
    config = CompareConfig(
        demo=True, out=root, **{**preset, **{k: v for k, v in given.items() if v is not None}}
    )
    try:
        return run_compare(config)
    except Interrupted:
        if keep:
            raise  # the finished runs stay in ``keep``; the same command keeps them
        raise Interrupted(
            "nothing: without --keep DIR the comparison's folder is removed"
        ) from None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
