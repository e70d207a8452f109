"""Statistics of stored saliency maps for ``salient inspect``: pure computation on arrays.

Stored maps are raw (``cls_attn`` is a softmax share, ``gpa`` a sum of pre-softmax logits that
can be negative), so each valid map ``m [G, G]`` (float16, computed in float64) is first made a
distribution:

- ``p = (m - min m) / (max m - min m)`` — per-image min-max to [0, 1], as the loader does
  (AMT); a constant map gives ``p = 1`` everywhere (uniform).
- ``q = p / sum(p)`` — the saliency *mass* of each cell, summing to 1.
- ``entropy = -sum(q ln q)`` in nats (``0 ln 0 = 0``); ``entropy_norm = entropy / ln(G²)``
  (1 = uniform, 0 = one cell).
- ``top25_mass`` = sum of the ``ceil(G²/4)`` largest ``q`` (0.25 for a uniform map).
- ``histogram``: counts of the ``p`` values of every cell of every valid map in
  :data:`HIST_BINS` equal bins over [0, 1].
- Demo datasets (``manifest.demo`` set, ``box.json`` per sample, square images of side
  ``S = manifest.demo["image_size"]``): the map covers the whole image linearly, cell
  ``(u, v)`` (column u, row v) ↔ pixels ``[u·S/G, (u+1)·S/G) × [v·S/G, (v+1)·S/G)``. A cell's
  box coverage ``c`` is the fraction of its area inside the box ``[x0, x1) × [y0, y1)``
  (partial cells count by area); ``box_mass = sum(q · c)`` and
  ``box_area = (x1 - x0)(y1 - y0) / S²``; ``box_lift = box_mass / box_area`` (1 = no better
  than uniform); ``box_hit_share`` = share of images whose box_mass exceeds box_area.
- Per class (datasets with labels): the same numbers over the rows of each class label.
- Every per-image number is averaged over the *usable* rows: ``valid == 1`` and all values
  finite. ``valid_share`` is the share of rows with ``valid == 1``.
- ``--compare``: over the rows usable in both generations, ``mean_abs_change`` = mean over
  images of the mean over cells of ``|p_a - p_b|``; ``spearman`` = mean over images of the
  Spearman rank correlation of the two maps' G² cells (``salient.pipeline.map_stats.spearman``:
  average ranks for ties; images where either map is constant have no rank correlation and
  are counted in ``constant``).

Also here: one seeded mask plan on the whole image for a panel. No disk, store or Ray access;
:mod:`salient.jobs.inspect.data` reads the shards; :mod:`salient.jobs.inspect.driver` feeds them in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from salient.pipeline.crops import normalize_weights
from salient.pipeline.map_stats import spearman
from salient.pipeline.masking import NEEDS_SALIENCY, plan_masks

__all__ = [
    "HIST_BINS",
    "TOP_FRACTION",
    "ClassTally",
    "DiffTally",
    "GenerationTally",
    "box_coverage",
    "map_entropy",
    "map_mass",
    "mask_plan_grid",
    "normalize_maps",
    "sample_generator",
    "sample_stats",
    "top_mass",
    "usable",
]

HIST_BINS = 20
TOP_FRACTION = 0.25


# ---------------------------------------------------------------- map statistics (pure)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1]: ``maps [B, G, G]`` raw -> ``p [B, G*G]`` float64.

    A constant map becomes all ones (uniform mass).
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)  # [B, N]
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    p = np.divide(flat - low, span, out=np.ones_like(flat), where=span > 0)
    return p


def map_mass(p: np.ndarray) -> np.ndarray:
    """Saliency mass per cell: ``p [B, N]`` in [0, 1] -> ``q [B, N]``, each row summing to 1."""
    return p / p.sum(axis=1, keepdims=True)


def map_entropy(q: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row of ``q [B, N]`` (0 ln 0 = 0) -> ``[B]``."""
    logs = np.log(q, out=np.zeros_like(q), where=q > 0)
    return -(q * logs).sum(axis=1)


def top_mass(q: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Mass in the ``ceil(fraction·N)`` heaviest cells of each row of ``q [B, N]`` -> ``[B]``."""
    k = math.ceil(fraction * q.shape[1])
    return np.sort(q, axis=1)[:, -k:].sum(axis=1)


def _axis_overlap(lo: np.ndarray, hi: np.ndarray, size: float, grid: int) -> np.ndarray:
    """Share of each of ``grid`` equal cells of ``[0, size)`` covered by ``[lo, hi)``: [B, G]."""
    edges = np.arange(grid + 1) * (size / grid)  # [G+1]
    start = np.maximum(edges[None, :-1], lo[:, None])
    stop = np.minimum(edges[None, 1:], hi[:, None])
    return np.clip(stop - start, 0.0, None) / (size / grid)


def box_coverage(boxes: np.ndarray, image_hw: tuple[int, int], grid: int) -> np.ndarray:
    """Fraction of each map cell inside the box: ``boxes [B, 4]`` (x0, y0, x1, y1 px) ->
    ``c [B, G, G]`` indexed ``[row v, column u]``; cell (u, v) ↔ ``[u·W/G, (u+1)·W/G) ×
    [v·H/G, (v+1)·H/G)`` (docs/ARCHITECTURE.md, "Saliency maps")."""
    height, width = image_hw
    boxes = np.asarray(boxes, dtype=np.float64)
    cover_x = _axis_overlap(boxes[:, 0], boxes[:, 2], width, grid)  # [B, G] over columns u
    cover_y = _axis_overlap(boxes[:, 1], boxes[:, 3], height, grid)  # [B, G] over rows v
    return cover_y[:, :, None] * cover_x[:, None, :]


def usable(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows with ``valid == 1`` whose values are all finite: ``[B]`` bool."""
    finite = np.isfinite(np.asarray(maps, dtype=np.float64)).reshape(len(maps), -1).all(axis=1)
    return (np.asarray(valid) == 1) & finite


# ---------------------------------------------------------------- accumulation over shards


@dataclass
class GenerationTally:
    """Per-image statistics of one generation, gathered shard by shard."""

    total: int = 0
    valid: int = 0
    nonfinite: int = 0
    entropy: list = field(default_factory=list)
    top: list = field(default_factory=list)
    box_mass: list = field(default_factory=list)
    box_area: list = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    def add(
        self,
        maps: np.ndarray,
        valid: np.ndarray,
        boxes: np.ndarray | None,
        image_hw: tuple[int, int] | None,
    ) -> None:
        ok = usable(maps, valid)
        self.total += len(valid)
        self.valid += int((np.asarray(valid) == 1).sum())
        self.nonfinite += int((np.asarray(valid) == 1).sum() - ok.sum())
        if not ok.any():
            return
        p = normalize_maps(maps[ok])
        q = map_mass(p)
        self.entropy.append(map_entropy(q))
        self.top.append(top_mass(q))
        self.hist += np.histogram(p, bins=HIST_BINS, range=(0.0, 1.0))[0]
        if boxes is not None:
            boxed = np.isfinite(boxes[ok]).all(axis=1)  # [usable] rows that carry a box
            box = boxes[ok][boxed]
            cover = box_coverage(box, image_hw, maps.shape[-1]).reshape(len(box), -1)
            self.box_mass.append((q[boxed] * cover).sum(axis=1))
            area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
            self.box_area.append(area / (image_hw[0] * image_hw[1]))

    def summary(self, grid: int) -> dict:
        entropy, top = _cat(self.entropy), _cat(self.top)
        out = {
            "samples": self.total,
            "valid": self.valid,
            "usable": len(entropy),
            "valid_share": self.valid / self.total if self.total else 0.0,
            "nonfinite_valid": self.nonfinite,
            "entropy_mean": _mean(entropy),
            "entropy_norm_mean": _mean(entropy / math.log(grid * grid)),
            "top25_mass_mean": _mean(top),
            "histogram": {
                "edges": np.linspace(0.0, 1.0, HIST_BINS + 1).tolist(),
                "counts": self.hist.tolist(),
            },
            "box": None,
        }
        if self.box_mass or self.box_area:
            mass, area = _cat(self.box_mass), _cat(self.box_area)
            out["box"] = {
                "images": len(mass),
                "mass_mean": _mean(mass),
                "area_mean": _mean(area),
                "lift_mean": _mean(mass / area),
                "hit_share": _mean((mass > area).astype(np.float64)),
            }
        return out


@dataclass
class ClassTally:
    """The statistics of one generation per class label (``labels [n]`` beside each shard's
    rows; -1 = no label, left out)."""

    tallies: dict = field(default_factory=dict)  # label -> GenerationTally

    def add(self, maps, valid, boxes, image_hw, labels: np.ndarray) -> None:
        for label in np.unique(labels[labels >= 0]):
            rows = labels == label
            tally = self.tallies.setdefault(int(label), GenerationTally())
            tally.add(maps[rows], valid[rows], None if boxes is None else boxes[rows], image_hw)

    def summary(self, grid: int, classes: list[str] | None) -> dict[str, dict]:
        """``{class name: GenerationTally.summary without the histogram}``, in label order."""
        out = {}
        for label, tally in sorted(self.tallies.items()):
            name = classes[label] if classes and label < len(classes) else str(label)
            out[name] = {k: v for k, v in tally.summary(grid).items() if k != "histogram"}
        return out


@dataclass
class DiffTally:
    """Per-image change between two generations, gathered shard by shard."""

    abs_change: list = field(default_factory=list)
    rho: list = field(default_factory=list)

    def add(self, maps_a, valid_a, maps_b, valid_b) -> None:
        both = usable(maps_a, valid_a) & usable(maps_b, valid_b)
        if not both.any():
            return
        pa, pb = normalize_maps(maps_a[both]), normalize_maps(maps_b[both])
        self.abs_change.append(np.abs(pa - pb).mean(axis=1))
        self.rho.append(spearman(_flat(maps_a[both]), _flat(maps_b[both])))

    def summary(self) -> dict:
        change, rho = _cat(self.abs_change), _cat(self.rho)
        ranked = rho[np.isfinite(rho)]
        return {
            "images": len(change),
            "mean_abs_change": _mean(change),
            "spearman_mean": _mean(ranked),
            "constant": int(len(rho) - len(ranked)),
        }


def _flat(maps: np.ndarray) -> np.ndarray:
    return np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)  # [B, N]


def _cat(parts: list) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


# ---------------------------------------------------------------- one sample


def sample_stats(raw: np.ndarray, box, image_hw) -> dict:
    """The per-image numbers of the module docstring for one raw map ``[G, G]``."""
    p = normalize_maps(raw[None])
    q = map_mass(p)
    grid = raw.shape[-1]
    stats = {
        "min": float(raw.min()),
        "max": float(raw.max()),
        "entropy": float(map_entropy(q)[0]),
        "entropy_norm": float(map_entropy(q)[0] / math.log(grid * grid)),
        "top25_mass": float(top_mass(q)[0]),
    }
    if box is not None and image_hw is not None:
        cover = box_coverage(np.array([box]), image_hw, grid).reshape(1, -1)
        stats["box_mass"] = float((q * cover).sum())
        stats["box_area"] = (box[2] - box[0]) * (box[3] - box[1]) / (image_hw[0] * image_hw[1])
    return stats


# ---------------------------------------------------------------- mask plan on the whole image


def sample_generator(seed: int, sample_id: int):
    """A torch generator seeded by ``(seed, sample_id)``: a panel's plan does not depend on
    which other ids were picked."""
    import torch

    state = np.random.SeedSequence([seed, sample_id]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mask_plan_grid(
    saliency_map: np.ndarray | None,
    grid: int,
    strategy: str,
    mask_ratio: float,
    throw_ratio: float,
    generator,
) -> tuple[np.ndarray, str]:
    """One mask plan on the whole (uncropped) image at the teacher grid.

    ``saliency_map [G, G]`` raw, or None when the sample has no valid map (then ``random``
    is used, as the loader's fallback). Returns ``(state [G, G] int8, strategy used)`` with
    0 = visible, 1 = masked, 2 = thrown; cells in the map's row-major patch order.
    """
    import torch

    if saliency_map is None:
        weights = torch.ones(1, grid * grid)
        strategy = "random" if strategy in NEEDS_SALIENCY else strategy
    else:
        weights = normalize_weights(torch.as_tensor(saliency_map, dtype=torch.float32)[None])
    plan = plan_masks(strategy, weights, mask_ratio, throw_ratio, generator=generator)
    state = np.zeros(grid * grid, dtype=np.int8)
    state[plan.mask_idx[0].numpy()] = 1
    state[plan.throw_idx[0].numpy()] = 2
    return state.reshape(grid, grid), strategy
