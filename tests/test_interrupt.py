"""Ctrl-C: a real ``salient train`` (and ``salient compare``) process gets SIGINT (as a terminal sends it, to its
whole process group) after its first checkpoint, ends with exit code 130 and one line naming
the checkpoint it kept and the command that continues; that very command (given fewer
epochs, so the test stays short) resumes, and its console, drawn by the driver as a bar,
shows 1-based epochs, no Ray ``(pid=…)`` prefix, and ends with the run's summary."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SALIENT = str(Path(sys.executable).with_name("salient"))
_TINY = ["--model", "mae-micro", "--image-size", "32", "--patch-size", "8", "--batch-size", "8"]
_TINY += ["--strategy", "random", "--loader-workers", "0", "--workers", "1"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SALIENT_"))}
    return {**env, "SALIENT_PROGRESS": "1"}  # the terminal's display: one bar, lines above it


def _interrupted(argv: list[str], ready, what: str, within: float) -> tuple[int, str, str, float]:
    """Run ``argv`` in its own process group, the one SIGINT goes to from a terminal; send it
    SIGINT once ``ready()`` holds. Returns exit code, stdout, stderr and the seconds from the
    signal to the exit."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + within
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{what} within {within:.0f} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)  # a bound, not a measurement: it ends at once
    return proc.returncode, out, err, time.monotonic() - sent


def test_ctrl_c_in_train_exits_130_with_what_it_kept_and_the_command_to_continue(
    demo_data, tmp_path
):
    run = tmp_path / "run"
    argv = [SALIENT, "train", "--data", str(demo_data), "--run-dir", str(run), *_TINY]
    first = run / "checkpoint-00001.pt"
    code, out, err, _ = _interrupted([*argv, "--epochs", "200"], first.exists, "a checkpoint", 300)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    kept = Path(last.split("kept ")[1].split(" (epoch")[0])
    config = run / "config.json"
    assert last == (
        f"salient train: interrupted; kept {kept} (epoch {int(kept.stem[-5:])} of 200) and the "
        f"run's metrics; continue with: salient train --config {config} --resume"
    ), err
    assert kept.parent == run and kept.is_file() and (run / "interrupted").is_file()
    assert out == "" and "pid=" not in err and "Traceback" not in err
    _settled(run / "metrics" / "rank-0.jsonl")  # its workers stopped at their next step

    kept = sorted(run.glob("checkpoint-*.pt"))[-1]  # one being written as it stopped lands
    done = int(kept.stem[-5:])
    command = shlex.split(last.split("continue with: ")[1])
    assert command[0] == "salient"
    again = subprocess.run(
        [SALIENT, *command[1:], "--epochs", str(done + 1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, as a terminal shows them
        text=True,
        env=_env(),
        timeout=600,
    )
    assert again.returncode == 0, again.stdout
    lines = [line for line in again.stdout.replace("\r", "\n").splitlines() if line.strip()]
    summary = json.loads(lines[-1])  # the summary is the last thing shown
    assert summary["epochs_done"] == done + 1 and summary["resumed_from"] == str(kept)
    shown = "\n".join(lines[:-1])
    assert f"salient train: resumed from {kept.name}" in shown, shown
    assert f"salient train: epoch {done + 1}/{done + 1} done" in shown, shown
    assert "pid=" not in again.stdout and "Traceback" not in again.stdout


def _settled(path: Path, quiet_s: float = 3.0, limit_s: float = 120.0) -> None:
    """Wait until ``path`` has not grown for ``quiet_s`` (the stopped run's workers are gone)."""
    deadline, size, since = time.monotonic() + limit_s, -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"{path} still grows"
        now = path.stat().st_size
        if now != size:
            size, since = now, time.monotonic()
        time.sleep(0.2)


def test_ctrl_c_in_compare_keeps_its_finished_runs_and_the_same_command_continues(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--demo", "--n", "32", "--scene-size", "32", "--out", str(out)]
    argv += ["--arms", "random", "--seeds", "3", "--size", "micro", "--image-size", "32"]
    argv += ["--patch-size", "8", "--epochs", "1", "--batch-size", "8", "--workers", "1"]
    argv += ["--loader-workers", "0", "--probe-every", "0", "--no-final-maps"]
    argv += ["--mask-samples", "8"]
    first = out / "runs" / "random" / "seed-0" / "record.json"
    code, _, err, took = _interrupted([SALIENT, *argv], first.exists, "a finished run", 300)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    finished = len(list(out.glob("runs/*/seed-*/record.json")))  # 1, or 2 if seed 1 landed
    assert last == (
        f"salient compare: interrupted; kept {finished} finished run{'s' * (finished > 1)} "
        f"under {out / 'runs'} (the same command keeps them; a run cut short starts over); "
        f"continue with: {shlex.join(['salient', *argv])}"
    ), err
    assert "Traceback" not in err and "pid=" not in err
    assert took < 30, f"{took:.1f} s from Ctrl-C to exit"  # a bound; it ends in a few seconds

    kept = json.loads(first.read_text())["checkpoint"]
    trained = Path(kept).stat().st_mtime_ns
    again = subprocess.run(  # the same command, one seed: the kept run is not trained again
        [SALIENT, *shlex.split(last.split("continue with: ")[1])[1:], "--seeds", "1"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(first.read_text())["checkpoint"] == kept, again.stderr
    assert Path(kept).stat().st_mtime_ns == trained and "training" not in again.stderr
    assert "warning" not in again.stderr, again.stderr  # the report draws without matplotlib's


def test_ctrl_c_in_inspect_links_no_half_written_report_and_names_the_same_command(
    demo_data, tmp_path
):
    """A job with nothing to keep (the report's index.html is written last) says so, and the
    same command is the one that continues."""
    from salient.pipeline.manifest import open_dataset
    from salient.store import SaliencyStore
    from salient.store.testing import synthetic_teacher

    dataset, url = open_dataset(demo_data), str(tmp_path / "s.zarr")
    store = SaliencyStore.create(url, dataset, grid=12)
    writer = store.begin_generation(
        {**synthetic_teacher(0), "image_size": 96, "patch_size": 8}, "cls_attn", 96, 8
    )
    for shard in dataset.shards:
        rows = shard.stop_id - shard.first_id
        maps = np.random.default_rng(shard.index).random((rows, 12, 12)).astype(np.float16)
        writer.write_shard(shard.index, maps + 0.01, np.ones(rows, np.uint8))
    writer.publish()
    out = tmp_path / "report"
    argv = ["inspect", "--store", url, "--data", str(demo_data), "--out", str(out), "--n", "96"]

    def panels() -> bool:  # part way through its panels
        return any(out.glob("**/*.png"))

    code, _, err, _ = _interrupted([SALIENT, *argv], panels, "a panel", 120)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (
        "salient inspect: interrupted; kept nothing (nothing half-done is used); "
        f"continue with: {shlex.join(['salient', *argv])}"
    ), err
    assert not (out / "index.html").exists() and "Traceback" not in err
    assert store.readers() == []  # its reader lease went with it
