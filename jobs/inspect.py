"""``salient inspect``: what the teacher thinks is salient, how the masks fall, how maps change.

Two views of a published generation of the saliency store:

- :func:`run_inspect` writes a static report into ``OUT``: ``stats.json``, one PNG panel per
  sample (image, map as a heat overlay, one sampled mask plan — AMT Figure 3), with
  ``--compare`` the same images side by side across two generations (AMT Figure 2), and
  ``index.html`` (relative links, no script; written last, so an ``index.html`` on disk
  always points at finished files).
- :func:`print_sample` renders one sample's map as a text heat map with its statistics.

How the statistics are computed (every number in ``stats.json``). Stored maps are raw
(``cls_attn`` is a softmax share, ``gpa`` a sum of pre-softmax logits that can be negative),
so each valid map ``m [G, G]`` (float16, computed in float64) is first made a distribution:

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
- Every per-image number is averaged over the *usable* rows: ``valid == 1`` and all values
  finite. ``valid_share`` is the share of rows with ``valid == 1``.
- ``--compare``: over the rows usable in both generations, ``mean_abs_change`` = mean over
  images of the mean over cells of ``|p_a - p_b|``; ``spearman`` = mean over images of the
  Spearman rank correlation of the two maps' G² cells (average ranks for ties; images where
  either map is constant have no rank correlation and are counted in ``constant``).

Statistics cover every sample of the store, read one shard (= one zarr chunk) at a time;
panels cover the selected ids only.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from salient.errors import SalientError

__all__ = [
    "HIST_BINS",
    "InspectConfig",
    "InspectError",
    "normalize_maps",
    "map_mass",
    "map_entropy",
    "top_mass",
    "box_coverage",
    "spearman",
    "mask_plan_grid",
    "run_inspect",
    "print_sample",
]

HIST_BINS = 20
TOP_FRACTION = 0.25
SHADES = " ░▒▓█"  # text heat map: five levels of the min-max normalised map
_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}


class InspectError(SalientError):
    """Bad inspect input: unknown or unpublished generation, ids out of range, bad options."""


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class InspectConfig:
    """``salient inspect`` options; checks itself on construction (raises InspectError)."""

    store: str
    data: str
    out: str
    generation: str | None = None
    ids: tuple[int, ...] | None = None  # when None, ``n`` ids drawn with ``seed``
    n: int = 32
    strategy: str = "amt"
    mask_ratio: float = 0.45
    throw_ratio: float = 0.40
    compare: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.store or not self.data or not self.out:
            raise InspectError("inspect needs --store URL, --data DIR and --out DIR")
        if self.ids is not None:
            self._check_ids()
        if not isinstance(self.n, int) or self.n < 1:
            raise InspectError(f"--n must be a positive integer (got {self.n!r})")
        self._check_masking()

    def _check_ids(self) -> None:
        ids = tuple(self.ids)
        if not ids:
            raise InspectError("--ids is empty; give sample ids like --ids 1,5,9 or use --n")
        bad = [i for i in ids if not isinstance(i, (int, np.integer)) or i < 0]
        if bad:
            raise InspectError(f"--ids must be non-negative integers (got {bad[0]!r})")
        object.__setattr__(self, "ids", tuple(dict.fromkeys(int(i) for i in ids)))

    def _check_masking(self) -> None:
        from salient.pipeline.masking import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise InspectError(f"unknown --strategy {self.strategy!r}; choose one of "
                               f"{', '.join(sorted(STRATEGIES))}")
        if not 0.0 < self.mask_ratio < 1.0 or not 0.0 <= self.throw_ratio < 1.0:
            raise InspectError(f"--mask-ratio must be in (0, 1) and --throw-ratio in [0, 1) "
                               f"(got {self.mask_ratio} and {self.throw_ratio})")
        if self.mask_ratio + self.throw_ratio >= 1.0:
            raise InspectError(f"mask_ratio + throw_ratio must be < 1 (got {self.mask_ratio} "
                               f"+ {self.throw_ratio}); lower one so some patches stay visible")


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
    [v·H/G, (v+1)·H/G)`` (DESIGN.md, "Saliency maps")."""
    height, width = image_hw
    boxes = np.asarray(boxes, dtype=np.float64)
    cover_x = _axis_overlap(boxes[:, 0], boxes[:, 2], width, grid)  # [B, G] over columns u
    cover_y = _axis_overlap(boxes[:, 1], boxes[:, 3], height, grid)  # [B, G] over rows v
    return cover_y[:, :, None] * cover_x[:, None, :]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of each row of ``x [B, N]``; ties get the mean of the ranks they span."""
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=1)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair of ``a, b [B, N]`` -> ``[B]``; NaN where a
    row is constant (no ranking to correlate)."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), denom, out=np.full(len(a), np.nan),
                     where=denom > 0)


def _usable(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows with ``valid == 1`` whose values are all finite: ``[B]`` bool."""
    finite = np.isfinite(np.asarray(maps, dtype=np.float64)).reshape(len(maps), -1).all(axis=1)
    return (np.asarray(valid) == 1) & finite


# ---------------------------------------------------------------- accumulation over shards


@dataclass
class _Tally:
    """Per-image statistics of one generation, gathered shard by shard."""

    total: int = 0
    valid: int = 0
    nonfinite: int = 0
    entropy: list = field(default_factory=list)
    top: list = field(default_factory=list)
    box_mass: list = field(default_factory=list)
    box_area: list = field(default_factory=list)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    def add(self, maps: np.ndarray, valid: np.ndarray, boxes: np.ndarray | None,
            image_hw: tuple[int, int] | None) -> None:
        ok = _usable(maps, valid)
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
            "samples": self.total, "valid": self.valid, "usable": int(len(entropy)),
            "valid_share": self.valid / self.total if self.total else 0.0,
            "nonfinite_valid": self.nonfinite,
            "entropy_mean": _mean(entropy),
            "entropy_norm_mean": _mean(entropy / math.log(grid * grid)),
            "top25_mass_mean": _mean(top),
            "histogram": {"edges": np.linspace(0.0, 1.0, HIST_BINS + 1).tolist(),
                          "counts": self.hist.tolist()},
            "box": None,
        }
        if self.box_mass or self.box_area:
            mass, area = _cat(self.box_mass), _cat(self.box_area)
            out["box"] = {"images": int(len(mass)), "mass_mean": _mean(mass),
                          "area_mean": _mean(area), "lift_mean": _mean(mass / area),
                          "hit_share": _mean((mass > area).astype(np.float64))}
        return out


@dataclass
class _DiffTally:
    """Per-image change between two generations, gathered shard by shard."""

    abs_change: list = field(default_factory=list)
    rho: list = field(default_factory=list)

    def add(self, maps_a, valid_a, maps_b, valid_b) -> None:
        both = _usable(maps_a, valid_a) & _usable(maps_b, valid_b)
        if not both.any():
            return
        pa, pb = normalize_maps(maps_a[both]), normalize_maps(maps_b[both])
        self.abs_change.append(np.abs(pa - pb).mean(axis=1))
        self.rho.append(spearman(_flat(maps_a[both]), _flat(maps_b[both])))

    def summary(self) -> dict:
        change, rho = _cat(self.abs_change), _cat(self.rho)
        ranked = rho[np.isfinite(rho)]
        return {"images": int(len(change)), "mean_abs_change": _mean(change),
                "spearman_mean": _mean(ranked), "constant": int(len(rho) - len(ranked))}


def _flat(maps: np.ndarray) -> np.ndarray:
    return np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)  # [B, N]


def _cat(parts: list) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


# ---------------------------------------------------------------- dataset access


def _demo_hw(dataset) -> tuple[int, int] | None:
    """Image (H, W) of a demo dataset (scenes are square), None for other datasets."""
    demo = dataset.manifest.demo
    return (int(demo["image_size"]),) * 2 if demo and demo.get("image_size") else None


def _shard_records(dataset, shard, wanted: set[int] | None, fields: set[str]) -> dict:
    """``{id: {field: bytes}}`` of one tar shard for the ``wanted`` ids (None: all) and
    ``fields`` (``"image"`` stands for the sample's image, whatever its extension)."""
    records: dict[int, dict[str, bytes]] = {}
    with tarfile.open(dataset.shard_url(shard)) as tar:
        for member in tar:
            key, _, name = member.name.partition(".")
            if not member.isfile() or not key.isdigit():
                continue
            if wanted is not None and int(key) not in wanted:
                continue
            if name in fields or ("image" in fields and name in _IMAGE_EXTS):
                records.setdefault(int(key), {})[name] = tar.extractfile(member).read()
    return records


def _shard_boxes(dataset, shard) -> np.ndarray:
    """Object boxes of one demo shard: ``[count, 4]`` (x0, y0, x1, y1 px), NaN where absent."""
    boxes = np.full((shard.count, 4), np.nan)
    for sample_id, rec in _shard_records(dataset, shard, None, {"box.json"}).items():
        if "box.json" in rec:
            box = json.loads(rec["box.json"])
            boxes[sample_id - shard.first_id] = [box["x0"], box["y0"], box["x1"], box["y1"]]
    return boxes


@dataclass(frozen=True)
class _Sample:
    """One sample read back from its shard for a panel."""

    sample_id: int
    image: object  # PIL.Image RGB
    label: int | None
    box: tuple[float, float, float, float] | None


def _read_samples(dataset, ids: list[int]) -> dict[int, _Sample]:
    """Image, label and box of each id (in the order of ``ids``), one pass over each shard
    that holds some of them."""
    from PIL import Image

    by_shard: dict[int, set[int]] = {}
    for sample_id in ids:
        by_shard.setdefault(dataset.shard_of(sample_id).index, set()).add(sample_id)
    samples = {}
    for index, wanted in sorted(by_shard.items()):
        for sample_id, rec in _shard_records(dataset, dataset.shards[index], wanted,
                                             {"image", "cls", "box.json"}).items():
            data = next((rec[k] for k in rec if k in _IMAGE_EXTS), None)
            if data is None:
                raise InspectError(f"sample {sample_id} has no image in "
                                   f"{dataset.shards[index].name}; re-run `salient ingest`")
            box = json.loads(rec["box.json"]) if "box.json" in rec else None
            samples[sample_id] = _Sample(
                sample_id, Image.open(io.BytesIO(data)).convert("RGB"),
                int(rec["cls"]) if "cls" in rec else None,
                tuple(float(box[k]) for k in ("x0", "y0", "x1", "y1")) if box else None)
    return {sample_id: samples[sample_id] for sample_id in ids}  # in the order asked


# ---------------------------------------------------------------- store access


def _open_store(url: str, dataset):
    """The store at ``url``, checked against ``dataset`` (StoreError on another dataset)."""
    from salient.store import SaliencyStore

    return SaliencyStore.open(url, dataset)


def _resolve_generation(store, name: str | None) -> str:
    """The published generation ``name`` (default: current) or a clear InspectError."""
    generations = store.generations()
    published = [g["name"] for g in generations if g.get("status") == "published"]
    if name is None:
        current = store.current()
        if current is not None:
            return current
        if not generations:
            raise InspectError(f"the store at {store.url} holds no generation yet; run "
                               "`salient refresh` to compute saliency maps first")
        pending = ", ".join(f"{g['name']} ({g.get('status')})" for g in generations)
        raise InspectError(f"the store at {store.url} has no published generation "
                           f"(found {pending}); finish it with `salient refresh`, which resumes")
    known = {g["name"]: g for g in generations}
    if name not in known:
        raise InspectError(f"unknown generation {name!r} in the store at {store.url}; "
                           f"published: {', '.join(published) or 'none'}")
    if name not in published:
        raise InspectError(f"generation {name!r} is not published (status "
                           f"{known[name].get('status')!r}); inspect one of: "
                           f"{', '.join(published) or 'none — run `salient refresh`'}")
    return name


def _select_ids(config: InspectConfig, num_samples: int) -> list[int]:
    """The requested ids (checked against the dataset) or ``n`` ids drawn with ``seed``."""
    if config.ids is not None:
        outside = [i for i in config.ids if i >= num_samples]
        if outside:
            raise InspectError(f"--ids {', '.join(map(str, outside[:5]))} out of range: the "
                               f"dataset holds ids 0..{num_samples - 1}")
        return list(config.ids)
    rng = np.random.default_rng(config.seed)
    return sorted(rng.choice(num_samples, size=min(config.n, num_samples), replace=False).tolist())


def _generation_info(store, name: str) -> dict:
    info = next((g for g in store.generations() if g["name"] == name), {"name": name})
    return json.loads(json.dumps(info, default=str))


# ---------------------------------------------------------------- mask plan on the whole image


def _sample_generator(seed: int, sample_id: int):
    import torch

    state = np.random.SeedSequence([seed, sample_id]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mask_plan_grid(saliency_map: np.ndarray | None, grid: int, strategy: str, mask_ratio: float,
                   throw_ratio: float, generator) -> tuple[np.ndarray, str]:
    """One mask plan on the whole (uncropped) image at the teacher grid.

    ``saliency_map [G, G]`` raw, or None when the sample has no valid map (then ``random``
    is used, as the loader's fallback). Returns ``(state [G, G] int8, strategy used)`` with
    0 = visible, 1 = masked, 2 = thrown; cells in the map's row-major patch order.
    """
    import torch

    from salient.pipeline.crops import normalize_weights
    from salient.pipeline.masking import NEEDS_SALIENCY, plan_masks

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


# ---------------------------------------------------------------- the job


def _scan_store(readers: list, dataset, grid: int) -> tuple[list[dict], dict | None]:
    """Statistics of each bound generation, and their diff when two: one shard at a time."""
    from salient.jobs.progress import progress_bar

    image_hw = _demo_hw(dataset)
    tallies, diff = [_Tally() for _ in readers], _DiffTally()
    with progress_bar(len(dataset.shards), "shards") as advance:
        for shard in dataset.shards:
            boxes = _shard_boxes(dataset, shard) if image_hw else None
            rows = [reader.read_shard(shard.index) for reader in readers]
            for tally, (maps, valid) in zip(tallies, rows):
                tally.add(np.asarray(maps), np.asarray(valid), boxes, image_hw)
            if len(rows) == 2:
                diff.add(*map(np.asarray, rows[0]), *map(np.asarray, rows[1]))
            advance(1)
    return [t.summary(grid) for t in tallies], diff.summary() if len(readers) == 2 else None


def _prepare_out(out: str) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InspectError(f"--out {path} exists and is not a directory; choose another path")
    (path / "panels").mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _panel_maps(readers: list, ids: list[int]) -> list[dict[int, np.ndarray | None]]:
    """Raw map per id for each reader (None where the row is not usable)."""
    result = []
    for reader in readers:
        maps, valid = (np.asarray(a) for a in reader.read_ids(ids))
        ok = _usable(maps, valid)
        result.append({i: (maps[k].astype(np.float64) if ok[k] else None)
                       for k, i in enumerate(ids)})
    return result


def _render_panels(config: InspectConfig, out: Path, names: list[str], grid: int,
                   samples: dict, maps: list[dict], classes: list[str] | None) -> list[dict]:
    from salient.jobs import inspect_report as report
    from salient.jobs.progress import progress_bar

    panels = []
    with progress_bar(len(samples), "panels") as advance:
        for sample_id, sample in samples.items():
            raw = maps[0][sample_id]
            state, used = mask_plan_grid(raw, grid, config.strategy, config.mask_ratio,
                                         config.throw_ratio, _sample_generator(config.seed,
                                                                               sample_id))
            label = _label_name(sample.label, classes)
            panel = report.render_sample(out, sample, names[0], raw, state, used, label)
            if len(names) == 2:
                order = sorted(range(2), key=names.__getitem__)  # gen-NNNNNN: oldest first
                panel["compare"] = report.render_compare(
                    out, sample, [names[k] for k in order], [maps[k][sample_id] for k in order],
                    label)
            panels.append(panel)
            advance(1)
    return panels


def _label_name(label: int | None, classes: list[str] | None) -> str | None:
    if label is None:
        return None
    return classes[label] if classes and 0 <= label < len(classes) else str(label)


def run_inspect(config: InspectConfig) -> dict:
    """Write the inspection report into ``config.out``; return a JSON-able summary.

    Raises:
        InspectError: unknown / unpublished generation, empty store, ids out of range,
            ``--compare`` naming the inspected generation, OUT not a directory.
        StoreError: no store at the URL, or a store of another dataset.
        DatasetError: the dataset directory is missing or damaged.
    """
    from salient.jobs import inspect_report as report
    from salient.pipeline.manifest import open_dataset

    dataset = open_dataset(config.data)
    store = _open_store(config.store, dataset)
    names = [_resolve_generation(store, config.generation)]
    if config.compare is not None:
        names.append(_resolve_generation(store, config.compare))
        if names[1] == names[0]:
            raise InspectError(f"--compare {config.compare} names the inspected generation "
                               f"{names[0]}; compare with another one")
    ids = _select_ids(config, dataset.num_samples)
    out = _prepare_out(config.out)
    readers = [store.bind(name) for name in names]
    stats, diff = _scan_store(readers, dataset, store.grid)
    samples = _read_samples(dataset, ids)
    panels = _render_panels(config, out, names, store.grid, samples, _panel_maps(readers, ids),
                            dataset.manifest.classes)
    body = {
        "store": str(config.store), "dataset": str(dataset.root), "grid": store.grid,
        "generations": {n: {"info": _generation_info(store, n), "stats": s}
                        for n, s in zip(names, stats)},
        "compare": None if diff is None else {"from": names[0], "to": names[1], **diff},
        "ids": ids, "config": asdict(config),
        "mass": "min-max normalised maps as distributions (see salient.jobs.inspect)",
    }
    report.render_histogram(out, {n: s["histogram"] for n, s in zip(names, stats)})
    _write_json(out / "stats.json", body)
    index = report.write_index(out, body, panels)  # last: it links the files above
    return {"out": str(out), "index": str(index), "generation": names[0],
            "compare": names[1] if len(names) == 2 else None, "panels": len(panels),
            "stats": {n: {k: v for k, v in s.items() if k != "histogram"}
                      for n, s in zip(names, stats)},
            "diff": diff}


# ---------------------------------------------------------------- terminal view


def _text_heatmap(p: np.ndarray, grid: int) -> list[str]:
    """Rows of shade blocks in a frame, two characters per cell so cells look square."""
    levels = np.minimum((p * len(SHADES)).astype(int), len(SHADES) - 1).reshape(grid, grid)
    rows = ["│" + "".join(SHADES[k] * 2 for k in row) + "│" for row in levels]
    return ["┌" + "─" * 2 * grid + "┐", *rows, "└" + "─" * 2 * grid + "┘"]


def _sample_stats(raw: np.ndarray, box, image_hw) -> dict:
    """The per-image numbers of the module docstring for one raw map ``[G, G]``."""
    p = normalize_maps(raw[None])
    q = map_mass(p)
    grid = raw.shape[-1]
    stats = {"min": float(raw.min()), "max": float(raw.max()),
             "entropy": float(map_entropy(q)[0]),
             "entropy_norm": float(map_entropy(q)[0] / math.log(grid * grid)),
             "top25_mass": float(top_mass(q)[0])}
    if box is not None and image_hw is not None:
        cover = box_coverage(np.array([box]), image_hw, grid).reshape(1, -1)
        stats["box_mass"] = float((q * cover).sum())
        stats["box_area"] = (box[2] - box[0]) * (box[3] - box[1]) / (image_hw[0] * image_hw[1])
    return stats


def print_sample(store_url: str, data: str, sample_id: int, generation: str | None = None) -> str:
    """One sample's map as a text heat map plus its statistics, for a terminal.

    Raises:
        InspectError: unknown / unpublished generation, empty store, id out of range.
        StoreError: no store at the URL, or a store of another dataset.
    """
    from salient.pipeline.manifest import open_dataset

    dataset = open_dataset(data)
    store = _open_store(store_url, dataset)
    name = _resolve_generation(store, generation)
    if not isinstance(sample_id, (int, np.integer)) or not 0 <= sample_id < dataset.num_samples:
        raise InspectError(f"--id {sample_id} out of range: the dataset holds ids "
                           f"0..{dataset.num_samples - 1}")
    maps, valid = (np.asarray(a) for a in store.bind(name).read_ids([int(sample_id)]))
    sample = _read_samples(dataset, [int(sample_id)])[int(sample_id)]
    label = _label_name(sample.label, dataset.manifest.classes)
    head = (f"sample {sample_id} · generation {name} · shard "
            f"{dataset.shard_of(int(sample_id)).name}" + (f" · label {label}" if label else ""))
    if not _usable(maps, valid)[0]:
        return f"{head}\nno saliency map (valid={int(valid[0])}): the loader masks it at random\n"
    raw = maps[0].astype(np.float64)
    stats = _sample_stats(raw, sample.box, _demo_hw(dataset))
    lines = [head, *_text_heatmap(normalize_maps(raw[None])[0], store.grid),
             f"shades '{SHADES}' = min-max normalised map in {len(SHADES)} steps",
             f"raw min {stats['min']:.4g} · max {stats['max']:.4g}",
             f"entropy {stats['entropy']:.3f} nats ({stats['entropy_norm']:.3f} of uniform)",
             f"top-25% mass {stats['top25_mass']:.3f} (uniform: 0.25)"]
    if "box_mass" in stats:
        lines.append(f"box mass {stats['box_mass']:.3f} vs box area {stats['box_area']:.3f} "
                     f"(lift ×{stats['box_mass'] / stats['box_area']:.2f})")
    return "\n".join(lines) + "\n"
