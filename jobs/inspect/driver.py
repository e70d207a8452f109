"""``salient inspect``: what the teacher thinks is salient, how the masks fall, how maps change.

Two views of a published generation of the saliency store:

- :func:`run_inspect` writes a static report into ``OUT``: ``stats.json``, one PNG panel per
  sample (image, map as a heat overlay with a colour bar, one sampled mask plan — AMT
  Figure 3), the same images side by side in every published generation (AMT Figure 2; the
  first and the newest ones, at most :data:`MAX_HISTORY`), the statistics per class on
  labelled datasets, with ``--compare`` a diff of two generations, with ``--run-dir`` the
  run's loss curve and k-NN probe accuracies over epochs, with ``--generator`` an AutoMAE
  checkpoint's mask probability and sampled masks on a heads generation and their box
  statistics (:mod:`salient.jobs.inspect.generator`), and ``index.html`` (relative links,
  no script; written last, so an ``index.html`` on disk always points at finished files).
- :func:`print_sample` renders one sample's map as a text heat map with its statistics.

And :func:`verify_store` (``--verify``) reads every chunk of a generation and names the
damaged ones. Both hold a reader lease (``salient inspect``) on what they read until done. A
report counts the rows of damaged chunks it met (``corrupt_maps``) and names each chunk;
every view names the teacher that made the maps (``trainer.provenance``).

The numbers in ``stats.json`` (min-max normalised maps as distributions: entropy, top-25% mass,
histogram, box lift on demo datasets, drift between generations) are computed in
:mod:`salient.jobs.inspect.stats`, whose docstring defines each one; this module reads the
store, takes samples from :mod:`salient.jobs.inspect.data`, and writes the report.

Statistics cover every sample of the store, read one shard (= one zarr chunk) at a time;
panels cover the selected ids only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from salient.jobs.inspect import report
from salient.jobs.inspect.config import InspectConfig, InspectError
from salient.jobs.inspect.data import demo_hw, read_samples, shard_boxes
from salient.jobs.inspect.generator import GeneratorTally, generator_view, load_generator
from salient.jobs.inspect.stats import (
    ClassTally,
    DiffTally,
    GenerationTally,
    mask_plan_grid,
    normalize_maps,
    sample_generator,
    sample_stats,
    usable,
)
from salient.jobs.runtime.progress import ProgressLines, progress_bar
from salient.jobs.runtime.records import METRICS, read_records
from salient.pipeline.adopt import key_ids
from salient.pipeline.manifest import DatasetError, open_dataset
from salient.pipeline.shards import read_labels
from salient.store import GenerationNotFoundError, NotPublishedError, SaliencyStore
from salient.trainer.provenance import describe_teacher, provenance

__all__ = [
    "InspectConfig",
    "InspectError",
    "generation_stats",
    "print_sample",
    "render_inspect",
    "run_inspect",
    "verify_store",
]

SHADES = " ░▒▓█"  # text heat map: five levels of the min-max normalised map
MAX_HISTORY = 10  # generations side by side in a panel: the first and the 9 newest


# ---------------------------------------------------------------- config


# ---------------------------------------------------------------- store access


def _open_store(url: str, dataset):
    """The store at ``url``, checked against ``dataset`` (StoreError on another dataset)."""

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
            raise InspectError(
                f"the store at {store.url} holds no generation yet; run "
                "`salient refresh` to compute saliency maps first"
            )
        pending = ", ".join(f"{g['name']} ({g.get('status')})" for g in generations)
        raise InspectError(
            f"the store at {store.url} has no published generation "
            f"(found {pending}); finish it with `salient refresh`, which resumes"
        )
    known = {g["name"]: g for g in generations}
    if name not in known:
        raise InspectError(
            f"unknown generation {name!r} in the store at {store.url}; "
            f"published: {', '.join(published) or 'none'}"
        )
    if name not in published:
        raise InspectError(
            f"generation {name!r} is not published (status "
            f"{known[name].get('status')!r}); inspect one of: "
            f"{', '.join(published) or 'none — run `salient refresh`'}"
        )
    return name


def _select_ids(config: InspectConfig, dataset) -> list[int]:
    """The requested ids (each one a sample holds: DatasetError otherwise) or ``n`` ids drawn
    with ``seed`` among the samples with an image (an adopted dataset's ids are not dense;
    the samples its index listed as skipped have none)."""
    if config.ids is not None:
        outside = [i for i in config.ids if not _holds(dataset, i)]
        if outside:
            gaps = ", with gaps" if dataset.num_ids != dataset.num_samples else ""
            raise InspectError(
                f"--ids {', '.join(map(str, outside[:5]))} out of range: no sample holds them "
                f"(the dataset holds ids 0..{dataset.num_ids - 1}{gaps})"
            )
        return list(config.ids)
    skipped = {s["id"] for s in dataset.manifest.skipped if isinstance(s.get("id"), int)}
    ids = np.setdiff1d(dataset.sample_ids(), np.fromiter(skipped, np.int64, len(skipped)))
    rng = np.random.default_rng(config.seed)
    return sorted(rng.choice(ids, size=min(config.n, len(ids)), replace=False).tolist())


def _holds(dataset, sample_id: int) -> bool:
    try:
        dataset.shard_of(sample_id)
    except DatasetError:  # a gap after a short shard, or past the end
        return False
    return True


def _generation_info(store, name: str) -> dict:
    info = next((g for g in store.generations() if g["name"] == name), {"name": name})
    return json.loads(json.dumps(info, default=str))


def _teacher(store, name: str) -> dict:
    """``{"generation", "path" | "name", "sha256", "about"}``: who made ``name``'s maps."""
    meta = store.bind(name).attrs.get("teacher")
    return {**provenance(name, meta), "about": describe_teacher(meta)}


# ---------------------------------------------------------------- the job


def _scan_store(
    readers: list, dataset, grid: int, generator: GeneratorTally | None = None
) -> tuple[list[dict], dict | None, dict | None]:
    """Statistics of each bound generation, their diff when two, and the first one's
    statistics per class on a labelled dataset (and its AutoMAE ``generator``'s, when given):
    one shard at a time."""

    image_hw, classes = demo_hw(dataset), dataset.manifest.classes
    tallies, diff, per_class = [GenerationTally() for _ in readers], DiffTally(), ClassTally()
    with progress_bar(len(dataset.shards), "shards") as advance:
        for shard in dataset.shards:
            boxes = shard_boxes(dataset, shard) if image_hw else None
            rows = [tuple(map(np.asarray, reader.read_shard(shard.index))) for reader in readers]
            for tally, (maps, valid) in zip(tallies, rows):
                tally.add(maps, valid, boxes, image_hw)
            if generator is not None:
                heads = np.asarray(readers[0].read_head_maps(shard.first_id, shard.stop_id))
                generator.add(heads, rows[0][1], shard.first_id, boxes, image_hw)
            if classes:
                labels = read_labels(dataset.source(shard))
                per_class.add(*rows[0], boxes, image_hw, labels)
            if len(rows) == 2:
                diff.add(*rows[0], *rows[1])
            advance(1)
    return (
        [t.summary(grid) for t in tallies],
        diff.summary() if len(readers) == 2 else None,
        per_class.summary(grid, classes) if classes else None,
    )


def _damage(readers: list, dataset) -> list[dict]:
    """Per reader: ``corrupt_maps`` (the sample ids in the damaged chunks it met: their rows
    read as no map) and ``damaged_chunks`` (one line each); each chunk is printed once."""
    lines = ProgressLines("inspect")
    found = []
    for reader in readers:
        ids = set()
        for chunk in reader.damaged:
            lines.line(damaged=str(chunk))
            if chunk.array != "shards_done":  # row chunk i is shard i: its sample ids
                stop = min(chunk.stop, dataset.shards[chunk.chunk].stop_id)
                ids.update(range(chunk.start, stop))
        found.append({"corrupt_maps": len(ids), "damaged_chunks": [str(c) for c in reader.damaged]})
    return found


def generation_stats(store_url: str, data: str, names: list[str] | None = None) -> dict:
    """``{generation: statistics}`` (``stats.json``'s, without the histogram) of the named
    published generations of a store, all of them by default; one pass over the shards."""

    dataset = open_dataset(data)
    store = _open_store(store_url, dataset)
    names = names or [g["name"] for g in store.generations() if g.get("status") == "published"]
    readers = [store.bind(_resolve_generation(store, name)) for name in names]
    stats, _, _ = _scan_store(readers, dataset, store.grid)
    stats = [{**s, **d} for s, d in zip(stats, _damage(readers, dataset))]
    return {n: {k: v for k, v in s.items() if k != "histogram"} for n, s in zip(names, stats)}


class _Leases(contextlib.ExitStack):
    """Reader leases (holder ``salient inspect``) on the generations a report reads, each taken
    once and released when the block ends, so ``salient gc`` keeps them meanwhile."""

    def __init__(self, store: SaliencyStore) -> None:
        super().__init__()
        self.store, self.held = store, set()

    def hold(self, name: str, missing_ok: bool = False) -> bool:
        """Hold ``name``; False when ``missing_ok`` and gc removed it since it was listed."""
        if name in self.held:
            return True
        try:
            lease = self.store.hold_if_writable(name, "salient inspect", stacklevel=3)
        except (NotPublishedError, GenerationNotFoundError):
            if not missing_ok:
                raise
            return False
        if lease is not None:
            self.enter_context(lease)
        self.held.add(name)
        return True


def _history(store) -> list[str]:
    """Published generations, oldest first: the first and the newest, ``MAX_HISTORY`` at most."""
    published = sorted(g["name"] for g in store.generations() if g.get("status") == "published")
    if len(published) <= MAX_HISTORY:
        return published
    return [published[0], *published[-(MAX_HISTORY - 1) :]]


def _training(run_dir: str) -> dict:
    """Per-epoch loss, strategy and generation, and the k-NN probes, from ``metrics.jsonl``."""
    path = Path(run_dir).expanduser() / METRICS
    if not path.is_file():
        raise InspectError(
            f"--run-dir {run_dir} holds no {METRICS}; give the --run-dir of a salient train run"
        )
    records = read_records(path)  # the records TensorBoard's curves are written from
    epochs = {r["epochs_done"]: r for r in records if r.get("kind") == "epoch"}  # last wins
    probes = {r["epochs_done"]: r for r in records if r.get("kind") == "eval"}
    return {
        "run_dir": str(path.parent),
        "epochs": [
            {
                "epochs_done": e,
                "loss": r.get("loss"),
                "strategy": r.get("strategy"),
                "generation": r.get("generation"),
                "knn_cls": probes[e]["knn"]["cls"]["top1"] if e in probes else None,
                "knn_mean": probes[e]["knn"]["mean"]["top1"] if e in probes else None,
            }
            for e, r in sorted(epochs.items())
        ],
    }


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
        ok = usable(maps, valid)
        result.append(
            {i: (maps[k].astype(np.float64) if ok[k] else None) for k, i in enumerate(ids)}
        )
    return result


def _render_panels(
    config: InspectConfig,
    out: Path,
    name: str,
    grid: int,
    samples: dict,
    maps: dict,
    history: dict[str, dict],
    classes: list[str] | None,
) -> list[dict]:
    """One panel per sample (the inspected generation ``name``), and its maps in every
    generation of ``history`` (name -> maps by id, oldest first) when there are two or more."""

    panels = []
    with progress_bar(len(samples), "panels") as advance:
        for sample_id, sample in samples.items():
            raw = maps[sample_id]
            state, used = mask_plan_grid(
                raw,
                grid,
                config.strategy,
                config.mask_ratio,
                config.throw_ratio,
                sample_generator(config.seed, sample_id),
            )
            label = _label_name(sample.label, classes)
            panel = report.render_sample(out, sample, name, raw, state, used, label)
            if len(history) >= 2:
                panel["compare"] = report.render_compare(
                    out, sample, list(history), [m[sample_id] for m in history.values()], label
                )
            panels.append(panel)
            advance(1)
    return panels


def _check_generator(model, reader, name: str, path: str) -> None:
    """The inspected generation holds the per-head maps ``model``'s generator takes."""
    if reader.heads != model.generator.heads:
        raise InspectError(
            f"--generator {path} takes {model.generator.heads} per-head maps but generation "
            f"{name} holds kind {reader.attrs.get('kind')} (heads={reader.heads}); inspect a "
            "generation of its teacher made by `salient refresh --kind heads` (--generation)"
        )


def _render_generator_panels(
    config: InspectConfig, out: Path, reader, model, samples: dict, panels: list[dict], classes
) -> None:
    """AutoMAE's panel of each sample with usable maps (``generator`` in its index entry)."""
    by_id = {panel["id"]: panel for panel in panels}
    for sample_id, sample in samples.items():
        heads = np.asarray(reader.read_head_maps(sample_id, sample_id + 1))
        _, valid = reader.read_ids([sample_id])
        if not usable(heads, valid)[0]:
            continue
        prob, state = generator_view(model, heads, config.seed, [sample_id])
        label = _label_name(sample.label, classes)
        by_id[sample_id]["generator"] = report.render_generator(
            out, sample, heads[0].astype(np.float64), prob[0], state[0], label
        )


def _label_name(label: int | None, classes: list[str] | None) -> str | None:
    if label is None:
        return None
    return classes[label] if classes and 0 <= label < len(classes) else str(label)


def run_inspect(config: InspectConfig) -> dict:
    """Write the inspection report into ``config.out``; return a JSON-able summary. With
    ``config.id``: ``{"id", "text"}``, one sample's text heat map (:func:`print_sample`),
    which :func:`render_inspect` shows as it is.

    Raises:
        InspectError: unknown / unpublished generation, empty store, ids out of range,
            ``--compare`` naming the inspected generation, OUT not a directory.
        StoreError: no store at the URL, or a store of another dataset.
        DatasetError: the dataset directory is missing or damaged.
    """

    if config.verify:
        return verify_store(config.store, config.generation)
    if config.id is not None or config.key is not None:
        sample_id, text = _one_sample(config)
        return {"id": sample_id, "text": text}
    dataset = open_dataset(config.data)
    store = _open_store(config.store, dataset)
    names = [_resolve_generation(store, config.generation)]
    if config.compare is not None:
        names.append(_resolve_generation(store, config.compare))
        if names[1] == names[0]:
            raise InspectError(
                f"--compare {config.compare} names the inspected generation "
                f"{names[0]}; compare with another one"
            )
    with _Leases(store) as leases:  # gc keeps what the report reads until it is written
        for name in names:
            leases.hold(name)
        return _report(config, dataset, store, names, leases)


def _report(config: InspectConfig, dataset, store: SaliencyStore, names: list, leases) -> dict:
    """The report of generations ``names`` (held by ``leases``), written into ``config.out``:
    :func:`run_inspect`'s summary."""
    ids = _select_ids(config, dataset)
    training = _training(config.run_dir) if config.run_dir else None
    readers = [store.bind(name) for name in names]
    model = load_generator(config.generator) if config.generator else None
    if model is not None:
        _check_generator(model, readers[0], names[0], config.generator)
    out = _prepare_out(config.out)
    tally = None if model is None else GeneratorTally(model, config.seed)
    stats, diff, per_class = _scan_store(readers, dataset, store.grid, tally)
    stats = [{**s, **d} for s, d in zip(stats, _damage(readers, dataset))]
    samples = read_samples(dataset, ids)
    history = [n for n in _history(store) if leases.hold(n, missing_ok=True)]
    history_maps = _panel_maps([store.bind(n) for n in history], ids) if len(history) > 1 else []
    panels = _render_panels(
        config,
        out,
        names[0],
        store.grid,
        samples,
        _panel_maps(readers[:1], ids)[0],
        dict(zip(history, history_maps)),
        dataset.manifest.classes,
    )
    generator = None
    if model is not None:
        _render_generator_panels(
            config, out, readers[0], model, samples, panels, dataset.manifest.classes
        )
        generator = {"checkpoint": config.generator, "grid": model.grid, "stats": tally.summary()}
    body = {
        "store": str(config.store),
        "dataset": str(dataset.root),
        "grid": store.grid,
        "generations": {
            n: {"info": _generation_info(store, n), "teacher": _teacher(store, n), "stats": s}
            for n, s in zip(names, stats)
        },
        "compare": None if diff is None else {"from": names[0], "to": names[1], **diff},
        "per_class": per_class,
        "history": history if len(history) > 1 else [],
        "training": training,
        "generator": generator,
        "ids": ids,
        "config": asdict(config),
        "mass": "min-max normalised maps as distributions (see salient.jobs.inspect.stats)",
    }
    report.render_histogram(out, {n: s["histogram"] for n, s in zip(names, stats)})
    if training is not None:
        report.render_training(out, training)
    _write_json(out / "stats.json", body)
    index = report.write_index(out, body, panels)  # last: it links the files above
    return {
        "out": str(out),
        "index": str(index),
        "generation": names[0],
        "teacher": body["generations"][names[0]]["teacher"],
        "compare": names[1] if len(names) == 2 else None,
        "panels": len(panels),
        "history": body["history"],
        "per_class": per_class,
        "training": None if training is None else training["epochs"],
        "generator": None if generator is None else generator["stats"],
        "stats": {
            n: {k: v for k, v in s.items() if k != "histogram"} for n, s in zip(names, stats)
        },
        "diff": diff,
    }


# ---------------------------------------------------------------- terminal view


def _text_heatmap(p: np.ndarray, grid: int) -> list[str]:
    """Rows of shade blocks in a frame, two characters per cell so cells look square."""
    levels = np.minimum((p * len(SHADES)).astype(int), len(SHADES) - 1).reshape(grid, grid)
    rows = ["│" + "".join(SHADES[k] * 2 for k in row) + "│" for row in levels]
    return ["┌" + "─" * 2 * grid + "┐", *rows, "└" + "─" * 2 * grid + "┘"]


def _one_sample(config: InspectConfig) -> tuple[int, str]:
    """The id of ``--id`` or ``--key`` and its terminal view."""
    sample_id = config.id
    if config.key is not None:
        sample_id = key_ids(open_dataset(config.data), [config.key])[config.key]
    return sample_id, print_sample(config.store, config.data, sample_id, config.generation)


def print_sample(store_url: str, data: str, sample_id: int, generation: str | None = None) -> str:
    """One sample's map as a text heat map plus its statistics, for a terminal.

    Raises:
        InspectError: unknown / unpublished generation, empty store, id out of range.
        DatasetError: an id no sample holds (an adopted dataset's gap after a short shard).
        StoreError: no store at the URL, or a store of another dataset.
    """

    dataset = open_dataset(data)
    store = _open_store(store_url, dataset)
    name = _resolve_generation(store, generation)
    if not isinstance(sample_id, (int, np.integer)) or not 0 <= sample_id < dataset.num_ids:
        raise InspectError(
            f"--id {sample_id} out of range: the dataset holds ids 0..{dataset.num_ids - 1}"
        )
    shard = dataset.shard_of(int(sample_id))  # one line for an id in a gap
    reader = store.bind(name)
    maps, valid = (np.asarray(a) for a in reader.read_ids([int(sample_id)]))
    sample = read_samples(dataset, [int(sample_id)], images=False)[int(sample_id)]
    label = _label_name(sample.label, dataset.manifest.classes)
    head = f"sample {sample_id} · generation {name} · shard {shard.name}" + (
        f" · label {label}" if label else ""
    )
    teacher = f"teacher {describe_teacher(reader.attrs.get('teacher'))}"
    damaged = reader.damaged_between(int(sample_id), int(sample_id) + 1)
    if damaged:
        return f"{head}\nno map: {damaged[0]} (the loader masks it at random)\n{teacher}\n"
    if not usable(maps, valid)[0]:
        return (
            f"{head}\nno saliency map (valid={int(valid[0])}): the loader masks it at random"
            f"\n{teacher}\n"
        )
    raw = maps[0].astype(np.float64)
    stats = sample_stats(raw, sample.box, demo_hw(dataset))
    lines = [
        head,
        *_text_heatmap(normalize_maps(raw[None])[0], store.grid),
        f"shades '{SHADES}' = min-max normalised map in {len(SHADES)} steps",
        f"raw min {stats['min']:.4g} · max {stats['max']:.4g}",
        f"entropy {stats['entropy']:.3f} nats ({stats['entropy_norm']:.3f} of uniform)",
        f"top-25% mass {stats['top25_mass']:.3f} (uniform: 0.25)",
    ]
    if "box_mass" in stats:
        lines.append(
            f"box mass {stats['box_mass']:.3f} vs box area {stats['box_area']:.3f} "
            f"(lift ×{stats['box_mass'] / stats['box_area']:.2f})"
        )
    return "\n".join([*lines, teacher]) + "\n"


# ---------------------------------------------------------------- verification


def verify_store(store_url: str, generation: str | None = None) -> dict:
    """Read every chunk of ``generation`` (default: the current one) and list the damaged
    ones: ``{"verify", "store", "checksummed", "chunks", "damaged", "teacher"}``.

    Raises:
        InspectError: the generation has damaged chunks (after printing one line per chunk
            on stdout), or the store has no current generation and none was named.
        GenerationNotFoundError, StoreError: no such generation, no store.
    """
    store = SaliencyStore.open(store_url)
    name = generation or store.current()
    if name is None:
        raise InspectError(
            f"the store at {store.url} has no published generation; name one with --generation"
        )
    with _Leases(store) as leases:  # gc keeps it while every chunk is read
        leases.hold(name)
        result = store.verify(name)
    for chunk in result.damaged:
        print(chunk, flush=True)
    if result.damaged:
        raise InspectError(
            f"{name} of {store.url} has {len(result.damaged)} damaged chunk(s) of "
            f"{result.chunks} (listed above); their rows read as no map, masked at random and "
            "counted as corrupt_maps — the next refresh writes a whole new generation"
        )
    meta = next((g.get("teacher") for g in store.generations() if g["name"] == name), None)
    return {
        "verify": name,
        "store": store.url,
        "checksummed": result.checksummed,
        "chunks": result.chunks,
        "damaged": [],
        "teacher": describe_teacher(meta),
    }


def render_inspect(summary: dict) -> str:
    """What ``salient inspect`` prints: one sample's heat map (``--id``), else the summary as
    one JSON line."""
    if "text" in summary:
        return summary["text"]
    if "verify" in summary:
        note = (
            ""
            if summary["checksummed"]
            else " (written before checksums: only chunks that do not decode are caught)"
        )
        return (
            f"{summary['verify']} of {summary['store']}: {summary['chunks']} chunks read, none "
            f"damaged{note}; teacher {summary['teacher']}"
        )
    return json.dumps(summary, sort_keys=True, default=str)
