"""``InspectConfig``: one ``salient inspect`` run's options, checked when built.

Its module imports no torch, timm or Ray, so that a parser, ``--help`` and a bad flag answer
before they load (docs/ARCHITECTURE.md, "Start-up"); the driver (``jobs.inspect.driver``) runs
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from salient import urls
from salient.errors import SalientError
from salient.pipeline.strategies import STRATEGY_NAMES, check_ratio_sum
from salient.settings import DATASET, check_fields, flag_of, ranged

__all__ = ["InspectConfig", "InspectError"]


class InspectError(SalientError):
    """Bad inspect input: unknown or unpublished generation, ids out of range, bad options."""


@dataclass(frozen=True)
class InspectConfig:
    """``salient inspect`` options; checks itself on construction (raises InspectError).

    A report (``out``) or one sample in the terminal (``id``)."""

    store: str
    """Saliency store path or URL."""
    data: str | None = field(default=None, metadata=DATASET)
    """Dataset directory (or URL) the store was made for (not needed with --verify)."""
    out: str | None = None
    """Report directory: index.html, stats.json and one PNG panel per sample."""
    generation: str | None = None
    """Generation to inspect (default: the current one)."""
    ids: tuple[int, ...] | None = None
    """Sample ids to draw panels for, e.g. 1,5,9 (default: --n ids drawn with --seed)."""
    n: int = field(default=32, metadata=ranged(ge=1))
    """Number of sample ids drawn at random when --ids is not given."""
    id: int | None = field(default=None, metadata=ranged(ge=0))
    """Print one sample's map as a text heat map with its statistics (no report)."""
    key: str | None = None
    """As --id, for the sample with this key (an adopted dataset's own key, e.g.
    n01440764_10026; SHARD/KEY when a key is in several shards)."""
    verify: bool = False
    """Read every chunk of the generation (--generation, default the current one) and list
    the damaged ones, one line each (exit 2 when any is); no report."""
    strategy: str = field(default="amt", metadata={"choices": lambda: STRATEGY_NAMES})
    """Mask strategy drawn on the panels."""
    mask_ratio: float = field(default=0.45, metadata=ranged(gt=0, lt=1))
    """Share of patches masked in the drawn plan."""
    throw_ratio: float = field(default=0.40, metadata=ranged(ge=0, lt=1))
    """Share of patches thrown in the drawn plan."""
    compare: str | None = None
    """A second generation to diff against (panels side by side, drift statistics)."""
    seed: int = 0
    """Seed of the drawn ids and mask plans."""
    run_dir: str | None = None
    """A training run directory (salient train --run-dir): its loss curve and k-NN probe
    accuracies over epochs, from metrics.jsonl, join the report."""
    generator: str | None = None
    """An AutoMAE run's checkpoint: its generator's mask probability on the inspected heads
    generation, beside the stored maps and the object box on each panel, and its box lift in
    stats.json."""

    def __post_init__(self):
        if not self.store or not (self.data or self.verify):
            raise InspectError("inspect needs --store URL and --data DIR")
        if isinstance(self.id, np.integer):
            object.__setattr__(self, "id", int(self.id))
        check_fields(self, InspectError)  # types, ranges and choices, declared with the fields
        if self.id is not None and self.key is not None:
            raise InspectError("give --id N or --key KEY, not both")
        if self.id is None and self.key is None and not self.out and not self.verify:
            raise InspectError(
                "inspect needs --out DIR for the report, --id N or --key KEY for one sample "
                "in the terminal, or --verify"
            )
        if self.out and urls.is_remote(self.out):
            raise InspectError(
                f"--out {self.out} must be a local folder (the report opens from disk); "
                "--store and --data may be URLs"
            )
        if self.ids is not None:
            self._check_ids()
        ratios = (flag_of(InspectConfig, "mask_ratio"), flag_of(InspectConfig, "throw_ratio"))
        check_ratio_sum(self.mask_ratio, self.throw_ratio, InspectError, ratios)

    def _check_ids(self) -> None:
        ids = tuple(self.ids)
        if not ids:
            raise InspectError("--ids is empty; give sample ids like --ids 1,5,9 or use --n")
        bad = [i for i in ids if not isinstance(i, (int, np.integer)) or i < 0]
        if bad:
            raise InspectError(f"--ids must be non-negative integers (got {bad[0]!r})")
        object.__setattr__(self, "ids", tuple(dict.fromkeys(int(i) for i in ids)))
