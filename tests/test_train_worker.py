"""The train worker without Ray: one rank in a gloo process group, its refreshes run in this
process by the refresh job's own pieces (prepare, the refresh actor's class, publish).

What Ray Train and Ray tasks add (placement, restarts, DDP over several processes) is covered
in test_train.py and test_cluster.py; here, in seconds, the schedule itself: which epochs warm
up, when a refresh starts and from which checkpoint, which generation each epoch binds, and
which checkpoints survive pruning (never the teacher of a refresh in flight).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from salient.errors import SalientError
from salient.jobs.refresh.driver import RefreshConfig, prepare_refresh, worker_spec
from salient.jobs.refresh.worker import RefreshWorker
from salient.jobs.train.config import TrainConfig, resolved
from salient.jobs.train.driver import _with_map_heads, with_box_figures
from salient.jobs.train.worker import _Worker, draw_seed, refresh_due
from salient.store import SaliencyStore
from salient.trainer.checkpoint import save_checkpoint
from salient.trainer.models import build_model
from salient.trainer.specs import TrainError


@dataclass
class _Done:
    summary: dict

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        return self.summary


def refresh_here(refresh: RefreshConfig) -> str:
    """Run ``refresh`` in this process, shard by shard, with the refresh job's own pieces
    (prepare, the actor's class, publish); returns the published generation."""
    prepared = prepare_refresh(refresh)
    spec = worker_spec(refresh, prepared.teacher, prepared.spec, prepared.writer.name)
    actor = RefreshWorker(prepared.teacher.model, spec)
    for shard in prepared.dataset.shards:
        actor.compute_shard(shard.index, prepared.dataset.source(shard))
    prepared.writer.publish()
    return prepared.writer.name


class InProcessRefresh:
    """A refresh launcher that runs the run's refresh here, shard by shard, without Ray."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.teachers = config, []

    def reserve(self):
        return None

    def __call__(self, teacher: str, group) -> _Done:
        refresh = self.config.refresh_config(teacher)
        generation = refresh_here(refresh)
        self.teachers.append(Path(teacher).name)
        summary = {"store": refresh.store, "generation": generation, "kind": "cls_attn"}
        return _Done(with_box_figures(refresh, summary))  # as the refresh's Ray task does


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_follows_amts_schedule_refreshes_and_prunes(demo_data, tmp_path, process_group):
    config = TrainConfig(
        data=str(demo_data),
        store=str(tmp_path / "saliency.zarr"),
        run_dir=str(tmp_path / "run"),
        model="mae-micro",
        strategy="amt",
        epochs=4,
        warmup_epochs=1,
        refresh_every=1,
        keep_checkpoints=1,
        keep_generations=2,
        batch_size=16,
        image_size=32,
        patch_size=8,
        lr=1e-3,
        loader_workers=0,
        refresh_batch_size=32,
    )
    Path(config.run_dir).mkdir()
    Path(config.run_dir, "metrics.jsonl").touch()
    launcher, reports = InProcessRefresh(config), []
    args = {"config": config, "launch_refresh": launcher, "run_id": "t"}
    worker = _Worker(args, 0, 1, torch.device("cpu"), reports.append)
    try:
        worker.run()
    finally:
        worker.close()

    due = [e for e in range(1, config.epochs + 1) if refresh_due(config, e)]
    assert due == [1, 2, 3]  # after the warmup epoch, every epoch but the last
    assert launcher.teachers == [f"checkpoint-{e:05d}.pt" for e in due]
    # epoch 1 warms up at random; each later epoch binds the generation the refresh before
    # it published (refresh_wait is off, but this launcher's refresh is done at once)
    assert [r["generation"] for r in reports] == [None, "gen-000001", "gen-000002", "gen-000003"]
    assert [r["strategy"] for r in reports] == ["random", "amt", "amt", "amt"]
    assert [r["mask_ratio"] for r in reports] == [0.75, 0.45, 0.45, 0.45]
    records = [
        json.loads(line) for line in Path(config.run_dir, "metrics.jsonl").read_text().splitlines()
    ]
    refreshes = [r for r in records if r["kind"] == "refresh"]
    assert [r["generation"] for r in refreshes] == ["gen-000001", "gen-000002", "gen-000003"]
    # keep_generations=2 keeps the first one too: it was replaced less than the grace period
    # (an hour) ago, so a reader may still be bound to it
    assert [r["collected"] for r in refreshes] == [[], [], []]
    store = SaliencyStore.open(config.store)
    assert store.current() == "gen-000003"
    assert [g["name"] for g in store.generations()] == ["gen-000001", "gen-000002", "gen-000003"]
    # keep_checkpoints=1: only the newest checkpoint, with its exported encoder
    kept = sorted(p.name for p in Path(config.run_dir).glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00004.pt"]
    assert Path(config.run_dir, "encoder-00004", "model.safetensors").is_file()
    _check_tensorboard(Path(config.run_dir), records)
    _check_console(config, records)


def _check_console(config: TrainConfig, records: list[dict]) -> None:
    """The driver's console over this run's logs, without a terminal: a progress line with
    1-based epochs and an ETA, then every epoch and refresh as a line of its own."""
    import io
    import os

    from salient.jobs.train.console import TrainConsole

    os.environ["SALIENT_PROGRESS_EVERY"] = "0"
    try:
        out = io.StringIO()
        console = TrainConsole(config, 96 // 16, "lines", stream=out)
        console._steps.records()  # the run's steps were seen: the next poll shows one line
        console.poll()
    finally:
        del os.environ["SALIENT_PROGRESS_EVERY"]
    lines = out.getvalue().splitlines()
    assert (
        all(line.startswith("salient train: ") for line in lines) and "pid=" not in out.getvalue()
    )
    epochs = [r for r in records if r["kind"] == "epoch"]
    shown = [line for line in lines if " done · " in line]
    assert [line.split("epoch ")[1].split(" done")[0] for line in shown] == [
        "1/4",
        "2/4",
        "3/4",
        "4/4",
    ]
    assert all(f"loss {r['loss']:.4g}" in line for r, line in zip(epochs, shown))
    refreshes = [line for line in lines if "refresh from epoch" in line]
    assert [line.split("published ")[1].split(" ")[0] for line in refreshes] == [
        "gen-000001",
        "gen-000002",
        "gen-000003",
    ]
    assert all("box lift" in line for line in refreshes)


def _check_tensorboard(run_dir: Path, records: list[dict]) -> None:
    """RUN/tb/ holds every scalar of the run's records, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()

    def curve(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in tb.Scalars(tag)]

    steps = [
        json.loads(line) for line in (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()
    ]
    assert curve("step/loss") == [(s["step"], pytest.approx(s["loss"])) for s in steps]
    epochs = [r for r in records if r["kind"] == "epoch"]
    for tag in ("loss", "lr", "img_per_s", "saliency_share"):
        assert curve(f"epoch/{tag}") == [(r["step"], pytest.approx(r[tag])) for r in epochs]
    per_epoch = epochs[0]["step"]
    bound = [(r["step"], int(r["generation"][4:])) for r in epochs if r["generation"]]
    assert curve("epoch/generation") == bound  # gen-000002 -> 2; None (the warmup) is left out
    refreshes = [r for r in records if r["kind"] == "refresh"]
    lifts = curve("refresh/box/lift_mean")  # the demo set has object boxes
    assert lifts == [
        (r["epochs_done"] * per_epoch, pytest.approx(r["box"]["lift_mean"])) for r in refreshes
    ]
    assert all(v > 0 for _, v in lifts)


def test_the_console_shows_epochs_from_one_rate_and_eta_and_events_above_its_bar(
    tmp_path, monkeypatch
):
    """Records written by the worker's own log, read by the driver's console: off a terminal
    one progress line (epoch 1-based, step in it, img/s over the workers, ETA); on one a bar
    over the run's steps, with the epoch's line printed above it."""
    import io

    from salient.jobs.train.console import TrainConsole
    from salient.jobs.train.worker import _Log

    monkeypatch.setenv("SALIENT_PROGRESS_EVERY", "0")
    config = TrainConfig(data="d", strategy="random", epochs=3, run_dir=str(tmp_path), workers=2)
    log = _Log(tmp_path, 0)
    try:
        lines, drawn = io.StringIO(), io.StringIO()
        plain = TrainConsole(config, 4, "lines", stream=lines)  # 4 batches: 4 steps an epoch
        bar = TrainConsole(config, 4, "bar", stream=drawn)
        log.event({"kind": "start", "run": "r", "from": None, "epochs_done": 0, "restart": False})
        for step in range(1, 6):
            epoch = (step - 1) // 4
            log.step(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "rank": 0,
                    "step": step,
                    "loss": 0.5,
                    "img_per_s": 10.0,
                    "generation": None,
                }
            )
            if step == 4:
                log.event(
                    {
                        "kind": "epoch",
                        "epoch": 0,
                        "epochs_done": 1,
                        "step": 4,
                        "loss": 0.5,
                        "img_per_s": 19.5,
                        "generation": None,
                        "corrupt_maps": 2,
                        "damaged_chunks": ["saliency/0.0"],
                    }
                )
        for console in (plain, bar):
            console.poll()
        bar._view.close()
    finally:
        log.close()
    text = lines.getvalue().splitlines()
    assert text[0] == (  # what the epoch lost: a notice of its own, the chunk named once
        "salient train: damaged saliency/0.0: its rows read as no map (masked at random, counted)"
    )
    assert text[1].startswith(
        "salient train: epoch 1/3 done · img/s 19.5 · loss 0.5 · generation none"
        " · corrupt maps 2 · eta "
    )
    assert text[2].startswith(
        "salient train: epoch 2/3 · step 1/4 · img/s 20 · loss 0.5 · generation none · eta "
    ), text  # the step after the epoch
    shown = drawn.getvalue()
    assert "salient train: epoch 1/3 done · img/s 19.5" in shown
    assert "5/12 steps" in shown and "epoch 2/3 · step 1/4" in shown, shown


def test_no_progress_line_of_an_epoch_is_drawn_below_its_done_line(tmp_path, monkeypatch):
    """The epoch's last step, read in the same look as its epoch record (the events are read
    first), shows no stale ``step 4/4`` line under ``epoch 1/2 done``."""
    import io

    from salient.jobs.train.console import TrainConsole
    from salient.jobs.train.worker import _Log

    monkeypatch.setenv("SALIENT_PROGRESS_EVERY", "0")
    config = TrainConfig(data="d", strategy="random", epochs=2, run_dir=str(tmp_path))
    log, lines = _Log(tmp_path, 0), io.StringIO()
    console = TrainConsole(config, 4, "lines", stream=lines)
    try:
        log.event({"kind": "start", "run": "r", "from": None, "epochs_done": 0, "restart": False})
        for step in range(1, 5):
            record = {"kind": "step", "epoch": 0, "rank": 0, "step": step, "loss": 0.5}
            log.step({**record, "img_per_s": 10.0, "generation": None})
            if step == 3:
                console.poll()  # the look before the epoch's end
        log.event(
            {"kind": "epoch", "epoch": 0, "epochs_done": 1, "step": 4, "loss": 0.5,
             "img_per_s": 19.5, "generation": None}
        )  # fmt: skip
        console.poll()
    finally:
        log.close()
    text = lines.getvalue().splitlines()
    assert text[0].startswith("salient train: epoch 1/2 · step 3/4 · ")
    assert text[1].startswith("salient train: epoch 1/2 done · ") and len(text) == 2, text


# ---------------------------------------------------------------- AutoMAE on one rank

SIZE, PATCH = 32, 4  # an 8 x 8 grid for the micro student and the tiny teacher
STEP_KEYS = ("loss", "loss_rec", "loss_g", "loss_d_real", "loss_d_fake", "checksum")


@pytest.fixture(scope="module")
def heads_teacher(demo_data, tmp_path_factory) -> dict:
    """A frozen teacher (an MAE-Tiny checkpoint: 3 heads, where mae-micro has 2), its heads
    generation made by the refresh job's own pieces, and a store of one map per image."""
    root = tmp_path_factory.mktemp("automae")
    torch.manual_seed(1)
    teacher = build_model("mae-tiny", SIZE, PATCH)
    config = {"model": "mae-tiny", "image_size": SIZE, "patch_size": PATCH}
    path = str(save_checkpoint(root / "teacher.pt", teacher, None, None, 0, 0, None, config))
    stores = {}
    for kind in ("heads", "cls_attn"):
        stores[kind] = str(root / f"{kind}.zarr")
        refresh = RefreshConfig(
            data=str(demo_data), store=stores[kind], teacher=path, kind=kind, image_size=SIZE
        )
        stores[f"{kind}_generation"] = refresh_here(refresh)
    return {"teacher": path, **stores}


def automae_config(data, run_dir, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        run_dir=str(run_dir),
        model="mae-micro",
        family="automae",
        strategy="random",
        epochs=2,
        warmup_epochs=0,  # no lr warmup (it defaults to the masking warmup's 40 epochs)
        refresh_every=0,
        batch_size=16,
        accum_iter=2,  # 6 batches per epoch: 3 steps
        image_size=SIZE,
        patch_size=PATCH,
        lr=1e-3,
        loader_workers=1,  # its DataLoader starts with the first epoch a process trains
        log_details=True,
    )
    return TrainConfig(**{**fields, **overrides})


def run_worker(config: TrainConfig) -> list[dict]:
    """One rank's run of ``config`` (a restart when its run dir holds a checkpoint)."""
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    Path(config.run_dir, "metrics.jsonl").touch()
    reports = []
    args = {"config": config, "launch_refresh": None, "progress": False, "run_id": "t"}
    worker = _Worker(args, 0, 1, torch.device("cpu"), reports.append)
    try:
        worker.run()
    finally:
        worker.close()
    return reports


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_one_rank_automae_resumes_to_the_steps_of_an_uninterrupted_run(
    demo_data, heads_teacher, tmp_path, process_group
):
    straight = _with_map_heads(
        automae_config(demo_data, tmp_path / "a", store=heads_teacher["heads"])
    )
    assert straight.generator_heads == 3  # the teacher's heads, read from the generation
    run_worker(straight)
    stopped = replace(straight, run_dir=str(tmp_path / "b"))
    run_worker(replace(stopped, stop_after_epochs=1))  # as if killed after epoch 1's checkpoint
    run_worker(stopped)  # the restart restores the latest checkpoint by itself

    runs = [read_jsonl(Path(c.run_dir) / "metrics" / "rank-0.jsonl") for c in (straight, stopped)]
    assert [r["step"] for r in runs[0]] == [r["step"] for r in runs[1]] == list(range(1, 7))
    for key in ("lr", "ids", "generation"):
        assert [r[key] for r in runs[1]] == [r[key] for r in runs[0]]
    for key in STEP_KEYS:  # the discriminator, its Adam and the rank's draws came back too
        assert [r[key] for r in runs[1]] == pytest.approx([r[key] for r in runs[0]], rel=1e-6)

    epochs = [
        r for r in read_jsonl(Path(straight.run_dir) / "metrics.jsonl") if r["kind"] == "epoch"
    ]
    for epoch in epochs:  # the family's scalars as image-weighted means of its steps
        steps = [r for r in runs[0] if r["epoch"] == epoch["epoch"]]
        images = sum(r["images"] for r in steps)
        for key in ("loss_rec", "loss_g", "loss_d_real", "loss_d_fake"):
            mean = sum(r[key] * r["images"] for r in steps) / images
            assert epoch[key] == pytest.approx(mean, rel=1e-9)
        assert epoch["generation"] == heads_teacher["heads_generation"]
        assert epoch["saliency_share"] == 1.0
    ckpt = torch.load(Path(straight.run_dir) / "checkpoint-00002.pt", weights_only=True)
    assert {int(s["step"]) for s in ckpt["hooks"]["optimizer_d"]["state"].values()} == {6}
    assert any(k.startswith("discriminator.") for k in ckpt["model"])
    assert ckpt["model"]["generator.net.0.weight"].shape[1] == 3
    assert len({draw_seed(0, rank, epoch) for rank in (0, 1) for epoch in (0, 1)}) == 4


def test_one_rank_automae_with_the_online_teacher(
    demo_data, heads_teacher, tmp_path, process_group
):
    config = _with_map_heads(
        automae_config(
            demo_data,
            tmp_path / "run",
            epochs=1,
            map_source="online",
            map_teacher=heads_teacher["teacher"],
        )
    )
    assert config.generator_heads == 3 and not config.reads_store
    loader = config.loader_config()
    assert loader.store is None and loader.head_maps is None  # the teacher runs in the step
    [report] = run_worker(config)
    assert report["maps"] == "online" and report["generation"] is None
    assert report["saliency_share"] is None  # the loader read no map (as iBOT's online source)
    assert all(math.isfinite(report[k]) for k in ("loss_rec", "loss_g", "loss_d_fake"))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"strategy": "amt"}, "use --strategy random"),
        ({"store": None}, "--map-source store reads AutoMAE's per-head maps from --store"),
        ({"map_source": "online"}, "--map-source online needs --map-teacher"),
        ({"map_teacher": "t.pt"}, "--map-teacher is the online source's teacher"),
        ({"model": "simmim-micro"}, "use an mae-* --model"),
        ({"throw_ratio": 0.1}, "throws none"),
        ({"mask_ratio": 0.99}, "keeps 0 of 64 patches"),
        ({"family": None, "saliency_kind": "heads"}, "only AutoMAE reads (--family automae)"),
        ({"family": None, "map_source": "online"}, "--map-source set an AutoMAE run"),
        ({"map_source": "fresh"}, "--map-source must be one of"),
    ],
)
def test_automae_settings_are_checked_in_one_line(demo_data, tmp_path, overrides, words):
    with pytest.raises(TrainError, match=re.escape(words)) as error:
        automae_config(demo_data, tmp_path, **{"store": "s.zarr", **overrides})
    assert "\n" not in str(error.value)


def test_the_online_teachers_files_resolve_for_workers_elsewhere(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = automae_config(demo_data, "run", map_source="online", map_teacher="t/teacher.pt")
    assert resolved(config).map_teacher == str(tmp_path / "t" / "teacher.pt")
    timm = replace(config, map_teacher="timm:vit_tiny_patch16_224", map_teacher_weights="w.pth")
    assert resolved(timm).map_teacher == "timm:vit_tiny_patch16_224"
    assert resolved(timm).map_teacher_weights == str(tmp_path / "w.pth")


def test_the_driver_reads_automaes_heads_before_any_work(demo_data, heads_teacher, tmp_path):
    def check(words: str, **overrides) -> None:
        config = automae_config(demo_data, tmp_path, **overrides)
        with pytest.raises(SalientError, match=re.escape(words)):
            _with_map_heads(config)

    check("does not exist; run `salient refresh --kind heads", store=str(tmp_path / "no.zarr"))
    check("holds one cls_attn map per image", store=heads_teacher["cls_attn"])
    check("--generator-heads 5 but AutoMAE's maps hold 3 heads", store=heads_teacher["heads"],
          generator_heads=5)  # fmt: skip
    check("gives 8x8 maps at --image-size 32, the model's grid is 4x4", patch_size=8,
          map_source="online", map_teacher=heads_teacher["teacher"])  # fmt: skip
    check("does not exist", map_source="online", map_teacher=str(tmp_path / "none.pt"))
