"""A real 2-node Ray cluster on this machine (``ray start`` processes, 1 CPU each, token
authentication on), driven the way users drive one: ``salient … --address`` processes.

- refresh with 2 actors places one on each node, survives a killed actor, and writes the very
  bytes a one-node run writes;
- train with 2 workers, a refresh after every epoch, for 3 epochs — the case that used to wait
  forever for a CPU no node had — finishes, even with a train worker killed mid-epoch: Ray Train
  restarts it and the run ends with the uninterrupted run's steps and generations;
- a plan that fits no node is one line before any work.

The cluster has its own ports, temp dir and token, and is stopped (every process it started,
by pid) at the end; the session's own Ray is used only for the one-node reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from timm.models.vision_transformer import VisionTransformer

RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 96 // (2 * 8)  # demo_data: 96 images, 2 workers, batch 8


@dataclass
class Cluster:
    address: str
    env: dict  # what a client process needs: the cluster's token
    procs: list


_TAKEN: set[int] = set()  # ports handed out in this session: never the same one twice


def _free_port() -> int:
    """A port free now and not handed out before (the OS may offer a just-released one
    again, and Ray refuses two of its components on one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _node_args() -> list[str]:
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port"]
    ports += ["--runtime-env-agent-port", "--dashboard-agent-grpc-port"]
    ports += ["--dashboard-agent-listen-port"]
    args = [arg for flag in ports for arg in (flag, str(_free_port()))]
    return [*args, "--num-cpus", "1", "--object-store-memory", str(100 * 1024**2), "--block"]


def _descendants(roots: list[int]) -> list[int]:
    """Every process under ``roots`` (from /proc), roots included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _live_nodes(address: str, env: dict) -> int:
    status = subprocess.run(
        [RAY, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
    )
    active = status.stdout.split("Pending:")[0]
    return sum(line.strip().startswith("1 node_") for line in active.splitlines())


@pytest.fixture(scope="module")
def cluster():
    token = secrets.token_hex(16)
    address = f"127.0.0.1:{_free_port()}"
    # RAY_ADDRESS on the nodes: Ray's own State API clients there (Ray Train's placement-group
    # cleaner) find their cluster by it; several Ray instances share this machine.
    node_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    node_env["RAY_ADDRESS"] = address
    temp = tempfile.mkdtemp(prefix="sr", dir="/tmp")  # short: Ray's socket paths live there
    head = [RAY, "start", "--head", "--port", address.split(":")[1], "--temp-dir", temp]
    head += ["--ray-client-server-port", str(_free_port()), "--dashboard-host", "127.0.0.1"]
    head += ["--dashboard-port", str(_free_port()), "--disable-usage-stats", *_node_args()]
    worker = [RAY, "start", "--address", address, "--disable-usage-stats", *_node_args()]
    procs: list[subprocess.Popen] = []
    with Path(temp, "logs.txt").open("w") as logs:
        try:
            for argv, nodes in ((head, 1), (worker, 2)):  # a node joins a head that runs
                procs.append(
                    subprocess.Popen(
                        argv,
                        env=node_env,
                        stdout=logs,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                _wait_for_nodes(address, node_env, nodes, procs, Path(temp, "logs.txt"))
            # What an operator sees in a log file: no RAY_* of ours, progress as lines (the
            # asserts read them) even where CI turns progress off for the rest of the suite.
            client = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            client.pop("SALIENT_PROGRESS", None)
            yield Cluster(address, {**client, "RAY_AUTH_TOKEN": token}, procs)
        finally:
            for pid in _descendants([p.pid for p in procs]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for proc in procs:
                proc.wait(timeout=60)
            shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, env: dict, nodes: int, procs: list, logs: Path) -> None:
    deadline = time.monotonic() + 240
    while _live_nodes(address, env) < nodes:
        assert time.monotonic() < deadline, logs.read_text()[-3000:]
        assert all(p.poll() is None for p in procs), logs.read_text()[-3000:]
        time.sleep(2)


def salient(cluster: Cluster, *args: str, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "salient.jobs.cli", *args, "--address", cluster.address]
    return subprocess.Popen(
        argv, env=cluster.env, stdout=log.open("w"), stderr=log.with_suffix(".err").open("w")
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[dict, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.with_suffix(".err").read_text()
    assert proc.returncode == 0, err[-4000:]
    return json.loads(log.read_text().strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = VisionTransformer(**kwargs, num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint-00001.pt"
    body = {"format": "salient-checkpoint/1", "config": {"model": "vit-test"}, "epoch": 1}
    torch.save(
        {**body, "encoder_kwargs": {**kwargs, "num_classes": 0}, "encoder": model.state_dict()},
        path,
    )
    return path


def maps_of(store: Path) -> np.ndarray:
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return root[root.attrs["current"]]["maps"][:]


# ---------------------------------------------------------------- refresh


def test_refresh_spreads_over_both_nodes_survives_a_killed_actor_and_matches_one_node(
    cluster, ray_session, demo_data, teacher, tmp_path
):
    from salient.jobs.refresh.driver import RefreshConfig, run_refresh

    common = {"data": str(demo_data), "teacher": str(teacher), "image_size": 32, "batch_size": 32}
    run_refresh(
        RefreshConfig(store=str(tmp_path / "one.zarr"), workers=1, **common), progress=False
    )

    log = tmp_path / "refresh.json"
    args = ["refresh", "--data", str(demo_data), "--store", str(tmp_path / "two.zarr")]
    args += ["--teacher", str(teacher), "--image-size", "32", "--batch-size", "32"]
    args += ["--workers", "2", "--cpus-per-worker", "0.5", "--shard-delay-s", "2"]
    driver = salient(cluster, *args, log=log)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        computing = [
            pid
            for pid in _descendants([p.pid for p in cluster.procs])
            if "RefreshWorker.compute_shard" in _cmdline(pid)
        ]
        if computing:
            killed = computing[0]
            os.kill(killed, signal.SIGKILL)  # an actor dies with a shard in flight
        time.sleep(0.05)
    summary, err = finish(driver, log, timeout=300)
    assert killed is not None, "no refresh actor was seen computing"
    assert summary["nodes"] == 2 and summary["retries"] >= 1 and summary["shards_computed"] == 3
    np.testing.assert_array_equal(maps_of(tmp_path / "two.zarr"), maps_of(tmp_path / "one.zarr"))
    assert "salient refresh: shard 3/3" in err and "Traceback" not in err


# ---------------------------------------------------------------- train


def _train_killing_rank_1(
    cluster: Cluster, args: list[str], run_dir: Path, log: Path
) -> tuple[dict, str]:
    """``salient train ARGS`` on the cluster, its rank 1 killed (SIGKILL) in the middle of the
    second epoch; returns the run's summary and stderr."""
    driver = salient(cluster, *args, log=log)
    rank1, killed = run_dir / "metrics" / "rank-1.jsonl", None
    deadline = time.monotonic() + 600
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        lines = rank1.read_text().splitlines() if rank1.is_file() else []
        mid = [r for r in map(json.loads, lines) if r["epoch"] == 1 and r["step"] > STEPS + 1]
        if mid:  # rank 1 is in the middle of the second epoch
            killed = mid[-1]["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    summary, err = finish(driver, log, timeout=600)
    assert killed is not None, "rank 1 never reached the second epoch"
    return summary, err


def test_train_two_workers_refreshing_every_epoch_survives_a_killed_worker(
    cluster, demo_data, tmp_path
):
    run_dir, store = tmp_path / "run", tmp_path / "saliency.zarr"
    args = ["train", "--data", str(demo_data), "--store", str(store), "--run-dir", str(run_dir)]
    args += ["--model", "mae-micro", "--image-size", "32", "--patch-size", "8"]
    args += ["--batch-size", "8", "--workers", "2", "--epochs", "3", "--warmup-epochs", "1"]
    args += ["--refresh-every", "1", "--refresh-wait", "--refresh-batch-size", "32"]
    args += ["--loader-workers", "0", "--lr", "1e-3", "--keep-checkpoints", "2", "--log-details"]
    args += ["--step-delay-s", "0.3"]  # else the epoch can end between two polls and the kill
    summary, err = _train_killing_rank_1(cluster, args, run_dir, tmp_path / "train.json")

    assert (summary["epochs_done"], summary["steps"], summary["restarts"]) == (3, 3 * STEPS, 1)
    assert summary["refreshes"] == ["gen-000001", "gen-000002"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    used = {r["epochs_done"]: r["generation"] for r in records if r["kind"] == "epoch"}
    assert used == {1: None, 2: "gen-000001", 3: "gen-000002"}  # as without the kill
    starts = [r for r in records if r["kind"] == "start"]
    assert [s["from"] for s in starts] == [None, str(run_dir / "checkpoint-00001.pt")]
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    assert root.attrs["current"] == "gen-000002"
    assert sorted(p.name for p in run_dir.glob("*-0000*")) == [
        "checkpoint-00002.pt",
        "checkpoint-00003.pt",
        "encoder-00002",
        "encoder-00003",
    ]
    assert "restarted from checkpoint-00001.pt" in err and "salient train: epoch 3/3 done" in err
    for noise in ("PreemptionWatcher", "Token authentication is enabled", "multiple active Ray"):
        assert noise not in err


def test_ibot_with_store_maps_from_its_ema_teacher_survives_a_killed_worker(
    cluster, demo_data, tmp_path
):
    # AttMask-High on iBOT, salient's way: the maps from the store, refreshed every epoch from
    # the EMA teacher's checkpoint; rank 1 dies mid-epoch and Ray Train restarts the group from
    # the last checkpoint (student, EMA teacher, centres, optimiser).
    run_dir, store = tmp_path / "run", tmp_path / "saliency.zarr"
    args = ["train", "--recipe", "attmask-ibot-high", "--saliency-source", "store"]
    args += ["--data", str(demo_data), "--store", str(store), "--run-dir", str(run_dir)]
    args += ["--model", "ibot-micro", "--image-size", "32", "--patch-size", "8"]
    args += ["--local-crops", "2", "--local-size", "16", "--out-dim", "64"]
    args += ["--batch-size", "8", "--effective-batch", "16", "--workers", "2", "--epochs", "3"]
    args += ["--refresh-every", "1", "--refresh-wait", "--refresh-batch-size", "32"]
    # a DataLoader worker per rank: the killed rank's must die with it, or Ray never sees the
    # rank go and never restarts the group (stages.die_with_parent)
    args += ["--loader-workers", "1", "--log-details", "--step-delay-s", "0.3"]
    summary, err = _train_killing_rank_1(cluster, args, run_dir, tmp_path / "train.json")
    assert (summary["epochs_done"], summary["steps"], summary["restarts"]) == (3, 3 * STEPS, 1)
    assert summary["refreshes"] == ["gen-000001", "gen-000002"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["generation"] for r in epochs] == [None, "gen-000001", "gen-000002"]
    assert [r["strategy"] for r in epochs] == ["attmask_high"] * 3 and epochs[2]["maps"] == "store"
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    teachers = [root[g].attrs["teacher"]["path"] for g in ("gen-000001", "gen-000002")]
    assert teachers == [str(run_dir / f"checkpoint-0000{e}.pt") for e in (1, 2)]  # the run's
    assert "restarted from checkpoint-00001.pt" in err and "salient train: epoch 3/3 done" in err


def test_a_plan_that_fits_no_node_is_one_line(cluster, demo_data, tmp_path):
    args = ["train", "--data", str(demo_data), "--store", str(tmp_path / "s.zarr")]
    args += ["--run-dir", str(tmp_path / "run"), "--model", "mae-micro", "--image-size", "32"]
    args += [
        "--patch-size",
        "8",
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.75",
    ]
    log = tmp_path / "train.json"
    driver = salient(cluster, *args, log=log)
    driver.wait(timeout=300)
    err = log.with_suffix(".err").read_text()
    assert driver.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("salient train: error: 1 refresh actor(s) of {CPU: 0.5} each do not fit")
    assert "--cpus-per-worker" in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()
