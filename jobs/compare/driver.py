"""``salient compare``: masking strategies compared on one dataset, seeds and all.

Every arm (``jobs.compare.arms``) trains on the same data with the same seeds, epochs,
learning-rate schedule, batch and model size, one run per (seed, arm), seed by seed; then
each run is measured the same way (``jobs.compare.measure``): the k-NN curve over its
checkpoints, k-NN and linear probes of its final encoder and of its random initialisation, the
box lift of the maps it trained on and of its final encoder's attention, and where its masks
land through its loader. Equal compute is reported beside equal epochs: each run's training
time (from its first epoch's start to its last one's end, waited-for refreshes included, Ray
Train's start-up not), the images it saw, and its k-NN at the time the fastest arm of the
same seed finished (the checkpoint of the last epoch it had ended by then).

Label arms train on the fixed maps of the label-aware teacher (``jobs.compare.teacher``),
trained once per comparison on the dataset's labels and refreshed once into one store per map
kind the arms ask for. Tables give mean ± sd over the seeds, and each arm's difference from
the reference arm (the first) and from its own initialisation with the verdict of
``jobs.compare.noise``. Everything lands under ``OUT``: ``compare.json``, the report
``index.html`` (``jobs.compare.report``), and per run ``runs/ARM/seed-S/record.json`` — the same
command again keeps the runs whose record is there with the same settings and does the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path

from salient.jobs.compare.arms import Arm, arm_config, parse_arm
from salient.jobs.compare.config import CompareConfig, CompareError
from salient.jobs.compare.measure import (
    PROBES,
    generation_figures,
    init_probes,
    maps_of_checkpoint,
    mask_box_shares,
    probe,
    read_metrics,
)
from salient.jobs.compare.noise import difference, equal_time_epoch, summarise
from salient.jobs.compare.report import write_report
from salient.jobs.compare.teacher import train_label_teacher
from salient.jobs.eval.driver import check_class_lists
from salient.jobs.refresh.driver import run_refresh
from salient.jobs.runtime.interrupt import Interrupted
from salient.jobs.runtime.progress import progress_mode
from salient.jobs.train.config import TrainConfig
from salient.jobs.train.driver import run_train
from salient.pipeline.ingest import ingest_demo
from salient.pipeline.manifest import Manifest, open_dataset
from salient.store import SaliencyStore, store_exists
from salient.trainer.checkpoint import checkpoint_path

__all__ = ["render_compare", "run_compare"]


def _say(text: str) -> None:
    if progress_mode() != "off":
        print(f"salient compare: {text}", file=sys.stderr, flush=True)


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _plain(value) -> object:
    """``value`` as JSON gives it back (tuples as lists), to compare settings with a record."""
    return json.loads(json.dumps(value, default=str))


def _same_run(recorded: dict, config: TrainConfig) -> bool:
    """Whether a finished run's recorded config is ``config``'s. A field the record lacks (one
    TrainConfig gained since) reads as its default, which keeps the run's old behaviour: a
    new setting the arms do not use keeps the finished runs, where a stricter test would
    retrain every arm and seed (hours) after an upgrade."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return _plain({**defaults, **recorded}) == _plain(config.as_dict())


# ---------------------------------------------------------------- data


def _demo_split(config: CompareConfig, path: Path, split: str, n: int) -> str:
    """One demo split under ``path``, reused when it is there with the same settings."""
    wanted = {"seed": 0, "image_size": config.scene_size, "split": split}
    if config.variant != "plain":
        wanted["variant"] = config.variant
    if (path / "manifest.json").is_file():
        manifest = open_dataset(str(path)).manifest
        have = {k: v for k, v in (manifest.demo or {}).items() if k != "quality"}
        if have == wanted and manifest.num_samples == n:
            return str(path)
    _say(f"composing {n} demo scenes ({split}, {config.variant})")
    ingest_demo(
        path,
        n=n,
        seed=0,
        image_size=config.scene_size,
        split=split,
        variant=config.variant,
        overwrite=True,
    )
    return str(path)


def _datasets(config: CompareConfig, out: Path) -> tuple[str, str]:
    """The training and held-out datasets (the demo splits composed under OUT with --demo),
    checked: both open, share their class list, and carry labels."""
    if config.demo:
        data = _demo_split(config, out / "data" / "train", "train", config.n)
        val = _demo_split(config, out / "data" / "val", "val", max(16, config.n // 4))
    else:
        data, val = config.data, config.val
    train_set, val_set = open_dataset(data), open_dataset(val)
    if not train_set.manifest.classes:
        raise CompareError(
            f"--data {data} has no class labels: the probes (and a label teacher) need them; "
            "ingest an ImageFolder tree or adopt shards with labels"
        )
    check_class_lists(train_set, val_set)
    return data, val


def _held_out(val: str) -> int:
    manifest: Manifest = open_dataset(val).manifest
    return manifest.num_samples - len(manifest.skipped)


# ---------------------------------------------------------------- the label teacher


_TEACHER_MEMORY = 8 * 2**30  # bytes of decoded images the label teacher may hold


class _Teacher:
    """The label-aware teacher: trained once (``OUT/teacher``), refreshed once per map kind
    the arms ask for (one store each); both kept for the next run of the same command."""

    def __init__(self, config: CompareConfig, data: str, val: str, out: Path):
        self.config, self.data, self.val, self.root = config, data, val, out / "teacher"
        self.summary: dict | None = None
        self.stores: dict[str, dict] = {}

    def _settings(self) -> dict:
        c = self.config
        return {
            "data": self.data,
            "val": self.val,
            "model": f"mae-{c.size}",
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "epochs": c.teacher_epochs,
            "lr": c.teacher_lr,
            "seed": c.seed,
        }

    def _check_memory(self) -> None:
        """The teacher trains on the training set decoded once into memory (uint8, S×S)."""
        images = open_dataset(self.data).num_samples
        size = images * 3 * self.config.image_size**2
        if size > _TEACHER_MEMORY:
            raise CompareError(
                f"the label teacher holds the decoded training set in memory: {images} images "
                f"at {self.config.image_size} px are {size / 2**30:.0f} GiB; lower --image-size "
                "or compare on fewer images (--n with --demo) for -label arms"
            )

    def checkpoint(self) -> str:
        path = self.root / "checkpoint-label.pt"
        record = _read_json(self.root / "teacher.json")
        settings = self._settings()
        if record is None or record["settings"] != _plain(settings) or not path.is_file():
            self._check_memory()
            for old in self.root.glob("*.zarr"):  # maps of an earlier teacher: refreshed anew
                shutil.rmtree(old)
            _say("training the label-aware teacher on the dataset's labels")
            device = "cuda" if self.config.gpu else "cpu"
            trained = train_label_teacher(path=path, device=device, **settings)
            record = {"settings": settings, **trained}
            _write_json(self.root / "teacher.json", record)
        self.summary = record
        return str(path)

    def store_for(self, run: TrainConfig) -> str:
        """The store holding the teacher's maps of the kind ``run`` reads, refreshed once."""
        refresh = run.refresh_config(self.checkpoint())
        head = "" if refresh.head is None else f"-head{refresh.head}"
        key = f"{refresh.kind}-{refresh.reduce or 'default'}-block{refresh.block}{head}"
        store = str(self.root / f"{key}.zarr")
        if key not in self.stores:
            if not (store_exists(store) and SaliencyStore.open(store).current()):
                _say(f"refreshing the label teacher's {refresh.kind} maps")
                run_refresh(replace(refresh, store=store, wait_for_other=False), progress=False)
            self.stores[key] = {
                "store": store,
                "kind": refresh.kind,
                "generations": generation_figures(store, self.data),
            }
        return store


# ---------------------------------------------------------------- one run


def _timeline(run_dir: str) -> dict:
    """Time and images of a finished run from its ``metrics.jsonl``."""
    records = read_metrics(run_dir)
    epochs = [r for r in records if r["kind"] == "epoch"]
    refreshes = [r for r in records if r["kind"] == "refresh"]
    # The clock starts when the first epoch does: Ray Train's start-up (~20 s, longer for the
    # first run in a process) is not the masking's cost; the refreshes waited for are.
    first_start = epochs[0]["time"] - epochs[0]["seconds"]
    epoch_end_s = [round(r["time"] - first_start, 1) for r in epochs]
    return {
        "epoch_end_s": epoch_end_s,
        "train_s": epoch_end_s[-1],
        "refresh_s": round(sum(r.get("seconds", 0.0) for r in refreshes), 1),
        "images": sum(r["images"] for r in epochs),
        "loss": [round(r["loss"], 5) for r in epochs],
    }


def _probed_epochs(config: CompareConfig) -> list[int]:
    every = config.probe_every
    epochs = range(every, config.epochs, every) if every else []
    return [*epochs, config.epochs]


class _Run:
    """One (arm, seed): train, then measure; its record is ``record.json`` in its folder."""

    def __init__(self, compare: CompareConfig, arm: Arm, seed: int, data: str, val: str, out):
        self.compare, self.arm, self.seed, self.data, self.val = compare, arm, seed, data, val
        self.root = out / "runs" / arm.name / f"seed-{seed}"
        self.eval_out = out / "eval"  # one feature cache for every run

    def train_config(self, teacher: _Teacher | None) -> TrainConfig:
        shared = self.compare.shared(self.data, self.seed)
        config = arm_config(self.arm, shared, str(self.root / "run"), str(self.root / "maps.zarr"))
        if self.arm.teacher == "label" and teacher is not None:  # None: nothing trains (init)
            config = replace(config, store=teacher.store_for(config))
        elif self.arm.teacher is None:
            config = replace(config, store=None)
        return config

    def record(self, teacher: _Teacher | None, label: str) -> dict:
        config = self.train_config(teacher)
        done = _read_json(self.root / "record.json")
        taught = None if teacher is None or self.arm.teacher != "label" else teacher.summary
        same_teacher = (
            taught is None
            or done is None
            or done.get("teacher_settings")
            in (
                None,  # a record from before teachers were recorded: its run is kept
                taught["settings"],
            )
        )
        if done is not None and _same_run(done["config"], config) and same_teacher:
            return done
        stale = [self.root / "run", self.root / "maps.zarr", *self.root.glob("maps-epoch-*.zarr")]
        for path in stale:  # a run cut short starts over
            shutil.rmtree(path, ignore_errors=True)
        _say(f"{label}: training")
        start = time.perf_counter()
        summary = run_train(config)
        record = {
            "arm": self.arm.name,
            "seed": self.seed,
            "teacher": self.arm.teacher,
            "config": _plain(config.as_dict()),
            "teacher_settings": None if taught is None else taught["settings"],
            "wall_s": round(time.perf_counter() - start, 1),
            "checkpoint": summary["checkpoint"],
            **_timeline(config.run_dir),
        }
        _say(f"{label}: measuring")
        record.update(self._measure(config, summary["checkpoint"]))
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / "record.json", record)
        return record

    def _measure(self, config: TrainConfig, final: str) -> dict:
        c = self.compare
        probed = self._checkpoints(final)
        curve = {  # epochs done -> probes; JSON keys are strings, so they are strings here too
            str(epoch): probe(config, self.val, self.eval_out, checkpoint, False)
            for epoch, checkpoint in probed[:-1]
        }
        final_probes = probe(config, self.val, self.eval_out, final, linear=True)
        init = init_probes(config, self.val, self.eval_out)
        measured = {
            "final": final_probes,
            "init": init,
            "curve": {"0": init, **curve, str(c.epochs): final_probes},
            "masks": mask_box_shares(config, c.mask_samples),
            "generations": None,
            "final_maps": None,
        }
        if config.store is not None:
            measured["generations"] = generation_figures(config.store, self.data)
        if c.final_maps and open_dataset(self.val).manifest.demo:
            # Masks planned online (iBOT's EMA teacher) have no stored generations: the maps
            # they followed are sampled at each probed checkpoint instead, on the held-out
            # split, as the run's "generations" (the teacher's box lift per epoch).
            online = config.maps_from == "online"
            maps = {
                epoch: maps_of_checkpoint(
                    config, self.val, str(self.root / f"maps-epoch-{epoch}.zarr"), checkpoint
                )
                for epoch, checkpoint in (probed if online else probed[-1:])
            }
            measured["final_maps"] = maps[c.epochs]
            if online:
                measured["generations"] = {f"epoch-{e}": figures for e, figures in maps.items()}
        return measured

    def _checkpoints(self, final: str) -> list[tuple[int, str]]:
        """(epoch, checkpoint) of every probed epoch, oldest first; the last is ``final``."""
        probed = _probed_epochs(self.compare)[:-1]
        return [*((e, self.checkpoint(e)) for e in probed), (self.compare.epochs, final)]

    def checkpoint(self, epoch: int) -> str:
        return str(checkpoint_path(self.root / "run", epoch))


def _equal_time(runs: dict[str, _Run], records: dict[str, dict], teacher) -> None:
    """Each run's k-NN at the time the fastest run of the seed finished, into its record."""
    budget = min(r["train_s"] for r in records.values())
    for name, record in records.items():
        epoch, finished = equal_time_epoch(record["epoch_end_s"], budget)
        knn = record["curve"].get(str(epoch))
        if knn is None:  # an epoch off the curve: its checkpoint probed now (features cached)
            run = runs[name]
            config = run.train_config(teacher)
            knn = probe(config, run.val, run.eval_out, run.checkpoint(epoch), linear=False)
        record["equal_time"] = {
            "budget_s": budget,
            "epochs_done": epoch,
            "finished": finished,
            **{k: knn[k] for k in ("knn_cls", "knn_mean")},
        }


# ---------------------------------------------------------------- the job


def run_compare(config: CompareConfig) -> dict:
    """Run the comparison (module docstring); returns the summary also written to
    ``OUT/compare.json``, with the report at ``OUT/index.html``.

    Raises:
        CompareError: datasets without labels or of other classes, bad settings.
        TrainError, EvalError, RefreshError, DatasetError: from the jobs it runs.
    """
    out = Path(config.out).expanduser().resolve()
    try:
        return _compare(config, out)
    except KeyboardInterrupt:  # Ctrl-C, here or in a run: the finished runs stay (exit 130)
        finished = len(list(out.glob("runs/*/seed-*/record.json")))
        raise Interrupted(
            f"{finished} finished run{'' if finished == 1 else 's'} under {out / 'runs'} (the "
            "same command keeps them; a run cut short starts over)"
        ) from None


def _compare(config: CompareConfig, out: Path) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data, val = _datasets(config, out)
    arms = [parse_arm(name) for name in config.arms]
    labelled = any(a.teacher == "label" for a in arms) and not config.init_only
    teacher = _Teacher(config, data, val, out) if labelled else None
    if teacher is not None:
        teacher.checkpoint()  # first: a teacher that cannot train fails before any arm runs
    records: dict[str, list[dict]] = {arm.name: [] for arm in arms}
    inits: list[dict] = []
    total, done = len(arms) * config.seeds, 0
    for seed in config.seed_list:
        runs = {arm.name: _Run(config, arm, seed, data, val, out) for arm in arms}
        if config.init_only:
            reference = runs[arms[0].name].train_config(teacher)
            inits.append({"seed": seed, **init_probes(reference, val, out / "eval")})
            continue
        seed_records = {}
        for name, run in runs.items():
            done += 1
            seed_records[name] = run.record(teacher, f"seed {seed}, {name} ({done}/{total})")
        _equal_time(runs, seed_records, teacher)
        for name, record in seed_records.items():
            records[name].append(record)
            _write_json(runs[name].root / "record.json", record)
        inits.append({"seed": seed, **seed_records[arms[0].name]["init"]})
    summary = summarise_runs(config, records, inits, _held_out(val))
    summary["chance"] = 1 / len(open_dataset(val).manifest.classes)
    summary.update(
        data=data,
        val=val,
        out=str(out),
        teacher=None if teacher is None else {**teacher.summary, "stores": teacher.stores},
        seconds=round(time.perf_counter() - start, 1),
    )
    _write_json(out / "compare.json", {**summary, "runs": records})
    summary["report"] = str(write_report(out, summary, records))
    return summary


def _values(records: list[dict], path: tuple) -> list[float]:
    values = []
    for record in records:
        value = record
        for key in path:
            value = None if value is None else value.get(key)
        if value is not None:
            values.append(value)
    return values


# (name in the table, path into a run record, a top-1 accuracy: judged against noise)
FIGURES = [
    *((probe_name, ("final", probe_name), True) for probe_name in PROBES),
    ("equal_time_knn_cls", ("equal_time", "knn_cls"), True),
    ("equal_time_knn_mean", ("equal_time", "knn_mean"), True),
    ("train_s", ("train_s",), False),
    ("wall_s", ("wall_s",), False),
    ("images", ("images",), False),
    ("refresh_s", ("refresh_s",), False),
    ("masks_lift", ("masks", "lift"), False),
    ("masked_in_box", ("masks", "masked_in_box"), False),
    ("final_maps_lift", ("final_maps", "lift"), False),
]


def summarise_runs(config: CompareConfig, records: dict, inits: list[dict], held_out: int):
    """The tables of ``compare.json`` from the run records: each figure's mean ± sd per arm,
    and each probe's difference from the reference arm and from the arm's own random
    initialisation, with its verdict (``noise.difference``)."""
    names = list(records)
    reference = records[names[0]] if names else []
    arms = {}
    for name, runs in records.items():
        if not runs:  # --init-only: nothing trained
            continue
        figures = {key: summarise(_values(runs, path)) for key, path, _ in FIGURES}
        versus = {}
        for key, path, accuracy in FIGURES:
            if not accuracy or name == names[0]:
                continue
            mine, theirs = _values(runs, path), _values(reference, path)
            if mine and theirs:
                versus[key] = difference(mine, theirs, held_out)
        over_init = {
            key: difference(_values(runs, ("final", key)), _values(runs, ("init", key)), held_out)
            for key in PROBES
            if _values(runs, ("final", key))
        }
        arms[name] = {
            "teacher": runs[0]["teacher"] if runs else None,
            "figures": figures,
            "versus_reference": versus,
            "versus_init": over_init,
        }
    init = {key: summarise([i[key] for i in inits if key in i]) for key in PROBES}
    return {
        "settings": _plain(config.__dict__),
        "seeds": config.seed_list,
        "reference": names[0] if names else config.arms[0],
        "held_out": held_out,
        "init": init,
        "init_runs": inits,
        "arms": arms,
    }


def render_compare(summary: dict) -> str:
    """The comparison's tables as text (``salient compare`` without ``--json``)."""
    lines = [
        f"salient compare · {len(summary['seeds'])} seed(s) · reference {summary['reference']}"
    ]
    head = f"{'arm':<22}" + "".join(f"{p:>20}" for p in PROBES)
    lines += [head, f"{'random init':<22}" + "".join(_cell(summary["init"][p]) for p in PROBES)]
    for name, arm in summary["arms"].items():
        lines.append(f"{name:<22}" + "".join(_cell(arm["figures"][p]) for p in PROBES))
    lines.append("")
    lines.append(f"{'arm':<22}{'train s':>16}{'images':>12}{'k-NN CLS at equal time':>26}")
    for name, arm in summary["arms"].items():
        f = arm["figures"]
        lines.append(
            f"{name:<22}{_cell(f['train_s'], '.0f', 16)}{_cell(f['images'], '.0f', 12)}"
            f"{_cell(f['equal_time_knn_cls'], '.3f', 26)}"
        )
    verdicts = [
        f"{name} vs {summary['reference']}, {key}: {v['diff']:+.3f} "
        f"({'exceeds' if v['exceeds'] else 'within'} noise, {v['rule']})"
        for name, arm in summary["arms"].items()
        for key, v in arm["versus_reference"].items()
        if key in PROBES and v["exceeds"] is not None
    ]
    lines += ["", *verdicts]
    if summary.get("report"):
        lines += ["", f"report: {summary['report']}"]
    return "\n".join(lines) + "\n"


def _cell(stats: dict, spec: str = ".3f", width: int = 20) -> str:
    if stats["mean"] is None:
        return f"{'–':>{width}}"
    text = format(stats["mean"], spec)
    if stats["sd"] is not None:
        text += f" ± {format(stats['sd'], spec)}"
    return f"{text:>{width}}"
