"""docs/LIBRARY.md's example runs as written: its Python block is saved as a script and run
in a fresh Python, as a user would run it (its refresh starts its own local Ray), and every
``LoaderConfig`` field is in its table."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from salient.pipeline.loader_config import LoaderConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "LIBRARY.md"


def _example() -> str:
    [code] = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return code


def test_the_library_example_runs_as_written(tmp_path):
    # as a user runs it: a script of its own in a fresh Python, which starts its own Ray
    script = tmp_path / "example.py"
    script.write_text(_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SALIENT_"))}
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.splitlines()
    assert (
        printed[0].startswith("epoch 1: loss ")
        and "maps of None, 64 samples without one" in printed[0]
    )
    assert printed[1] == "gen-000001 published"
    assert printed[2].endswith("maps of gen-000001, 0 samples without one")


def test_every_loader_field_is_documented():
    table = DOC.read_text().split("## Every `LoaderConfig` field")[1]
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, flags=re.M))
    names = {name for pair in documented for name in pair if name}
    assert names == {f.name for f in dataclasses.fields(LoaderConfig)}


def test_loader_config_resolves_each_strategys_paper_ratios_as_the_cli():
    from salient.jobs.train.config import TrainConfig
    from salient.pipeline.masking import STRATEGIES

    for strategy in STRATEGIES:
        loader = LoaderConfig(data="d", strategy=strategy)
        train = TrainConfig(data="d", store="s", strategy=strategy)
        assert (loader.mask_ratio, loader.throw_ratio) == (train.mask_ratio, train.throw_ratio)
    assert (
        LoaderConfig(data="d", strategy="random").mask_ratio,
        LoaderConfig(data="d", strategy="random").throw_ratio,
    ) == (0.75, 0.0)
    assert LoaderConfig(data="d", strategy="amt", throw_ratio=0.2).mask_ratio == 0.45  # one given
