"""AutoMAE as a job: `salient refresh --kind heads`, then `salient train --family automae` on
2 Ray Train workers (gloo), stopped after its first checkpoint and resumed.

One teacher (a random MAE-Tiny checkpoint, 3 heads) refreshed into a heads generation by the
refresh job on the session's Ray; three runs of a micro AutoMAE (32 px, 4 px patches: an 8 × 8
grid; 96 demo images, batch 8 per worker, 2 batches per step: 3 steps an epoch):

- ``stopped``: 2 epochs planned, stopped right after epoch 1's checkpoint (as a kill there);
- ``resumed``: the same config with ``resume=True``;
- ``straight``: the same 2 epochs uninterrupted, in its own run dir: the reference.

Checks read the JSONL logs, the checkpoints (``torch.load``) and config.json, not the trainer's
code. The one-rank schedule (epoch means, the online teacher, the driver's checks) is tested
without Ray in test_train_worker.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from salient.jobs.refresh.driver import RefreshConfig, run_refresh
from salient.jobs.train.driver import TrainConfig, run_train
from salient.trainer.checkpoint import save_checkpoint
from salient.trainer.models import build_model

SIZE, PATCH, TEACHER_HEADS = 32, 4, 3
LOSSES = ("loss_rec", "loss_g", "loss_d_real", "loss_d_fake")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def steps_of(config: TrainConfig, rank: int) -> list[dict]:
    return read_jsonl(Path(config.run_dir) / "metrics" / f"rank-{rank}.jsonl")


@pytest.fixture(scope="module")
def runs(ray_session, demo_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("automae-train")
    torch.manual_seed(1)
    teacher = build_model("mae-tiny", SIZE, PATCH)
    about = {"model": "mae-tiny", "image_size": SIZE, "patch_size": PATCH}
    path = save_checkpoint(root / "teacher.pt", teacher, None, None, 0, 0, None, about)
    store = str(root / "heads.zarr")
    refresh = run_refresh(
        RefreshConfig(
            data=str(demo_data), store=store, teacher=str(path), kind="heads", image_size=SIZE
        ),
        progress=False,
    )
    config = TrainConfig(
        data=str(demo_data),
        store=store,
        run_dir=str(root / "a"),
        model="mae-micro",
        family="automae",
        strategy="random",
        epochs=2,
        warmup_epochs=0,  # no lr warmup (it defaults to the masking warmup's 40 epochs)
        refresh_every=0,
        workers=2,
        batch_size=8,
        accum_iter=2,
        image_size=SIZE,
        patch_size=PATCH,
        lr=1e-3,
        loader_workers=0,
        log_details=True,
    )
    stopped = run_train(replace(config, stop_after_epochs=1), progress=False)
    resumed = run_train(replace(config, resume=True), progress=False)
    straight_config = replace(config, run_dir=str(root / "b"))
    straight = run_train(straight_config, progress=False)
    return {
        "refresh": refresh,
        "config": config,
        "straight_config": straight_config,
        "stopped": stopped,
        "resumed": resumed,
        "straight": straight,
    }


def test_the_heads_refresh_feeds_a_two_worker_automae_run(runs):
    config, stopped = runs["config"], runs["stopped"]
    assert runs["refresh"]["kind"] == "heads"
    assert stopped["family"] == "automae" and (stopped["epochs_done"], stopped["steps"]) == (1, 3)
    written = json.loads(Path(config.run_dir, "config.json").read_text())
    assert written["generator_heads"] == TEACHER_HEADS  # read from the generation at start
    [epoch, _] = [
        r for r in read_jsonl(Path(config.run_dir) / "metrics.jsonl") if r["kind"] == "epoch"
    ]
    assert epoch["generation"] == runs["refresh"]["generation"] and epoch["saliency_share"] == 1.0
    assert all(math.isfinite(epoch[key]) for key in LOSSES)
    rank0, rank1 = ([r for r in steps_of(config, k) if r["epoch"] == 0] for k in (0, 1))
    # one model on both ranks (the generator and the discriminator included) ...
    assert [r["checksum"] for r in rank0] == [r["checksum"] for r in rank1]
    assert len({r["checksum"] for r in rank0}) == len(rank0) == 3
    # ... trained on different images, with each rank's own draws
    assert not {i for r in rank0 for i in r["ids"]} & {i for r in rank1 for i in r["ids"]}
    assert [r["loss_d_real"] for r in rank0] != [r["loss_d_real"] for r in rank1]


def test_a_resumed_automae_run_matches_the_uninterrupted_one(runs):
    config, straight_config = runs["config"], runs["straight_config"]
    assert runs["resumed"]["resumed_from"] == str(Path(config.run_dir) / "checkpoint-00001.pt")
    assert runs["resumed"]["steps"] == runs["straight"]["steps"] == 6
    for rank in (0, 1):
        resumed = [r for r in steps_of(config, rank) if r["epoch"] == 1]
        straight = [r for r in steps_of(straight_config, rank) if r["epoch"] == 1]
        for key in ("step", "lr", "ids"):
            assert [r[key] for r in resumed] == [r[key] for r in straight]
        for key in ("loss", *LOSSES, "checksum"):
            assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-5)
    last = torch.load(Path(config.run_dir) / "checkpoint-00002.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (2, 6)
    adam_steps = {int(s["step"]) for s in last["hooks"]["optimizer_d"]["state"].values()}
    assert adam_steps == {6}  # the discriminator's Adam: one step per optimiser step, restored
    for key in LOSSES:
        assert runs["resumed"][key] == pytest.approx(runs["straight"][key], rel=1e-5)
