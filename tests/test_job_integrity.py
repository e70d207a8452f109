"""Damaged maps at the job level, through the CLI: ``salient inspect --verify`` names each
damaged chunk and exits 2, a report counts the rows it met in damaged chunks
(``corrupt_maps``) and names the chunk, ``inspect --id`` on a damaged row says why it has no
map, and ``salient gc`` and ``inspect`` name the teacher of each generation.

The store holds maps written for the demo set; 4 bytes of one published chunk are flipped on
disk, as bit rot or a bad copy would. What the jobs report is checked against plain zarr.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from salient.jobs.cli import main
from salient.pipeline.manifest import open_dataset
from salient.store import SaliencyStore

DAMAGED = "gen-000001: chunk 1 of maps (ids 32..63) fails its CRC-32C checksum"
TEACHER = {
    "source": "timm",
    "path": "/weights/vit_tiny.safetensors",
    "sha256": "ab" * 32,
    "name": "vit_tiny_patch16_224",
    "epoch": None,
    "kind": "cls_attn",
    "reduce": "minmax_mean",
    "block": -1,
    "head": None,
}


@pytest.fixture
def damaged(demo_data, tmp_path) -> str:
    """A store of the demo set with one published generation whose maps chunk 1 is damaged."""
    store = SaliencyStore.create(tmp_path / "s.zarr", open_dataset(demo_data), grid=4)
    writer = store.begin_generation(TEACHER, "cls_attn", 32, 8)
    rng = np.random.default_rng(0)
    for shard in range(3):
        writer.write_shard(shard, rng.random((32, 4, 4), np.float32), np.ones(32, np.uint8))
    writer.publish()
    chunk = tmp_path / "s.zarr" / writer.name / "maps" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = bytes(255 - b for b in data[len(data) // 2 :][:4])
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):  # plain zarr refuses it too
        zarr.open_array(str(tmp_path / "s.zarr" / writer.name / "maps"), mode="r")[32:64]
    return store.url


def test_verify_names_each_damaged_chunk_and_exits_2(damaged, capsys):
    code = main(["inspect", "--store", damaged, "--verify"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out.splitlines() == [DAMAGED]  # one line per damaged chunk, nothing else
    (line,) = err.splitlines()
    assert line.startswith("salient inspect: error: gen-000001 of ") and "1 damaged chunk" in line


def test_a_report_counts_and_names_the_damaged_rows(damaged, demo_data, tmp_path, capsys):
    code = main(
        ["inspect", "--store", damaged, "--data", str(demo_data), "--out", str(tmp_path / "r"),
         "--ids", "0,40", "--json"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    assert err.count(f"salient inspect: damaged {DAMAGED}") == 1
    stats = json.loads((tmp_path / "r" / "stats.json").read_text())["generations"]["gen-000001"]
    assert (stats["stats"]["corrupt_maps"], stats["stats"]["damaged_chunks"]) == (32, [DAMAGED])
    assert stats["stats"]["usable"] == 64  # the other rows, read whole
    assert stats["teacher"] == {
        "generation": "gen-000001",
        "name": "timm:vit_tiny_patch16_224",
        "sha256": "ab" * 32,
        "about": f"timm:vit_tiny_patch16_224 weights vit_tiny.safetensors (sha256 {'ab' * 6}…, "
        "cls_attn, minmax_mean)",
    }
    assert json.loads(out)["teacher"]["name"] == "timm:vit_tiny_patch16_224"


def test_one_damaged_row_says_why_it_has_no_map(damaged, demo_data, capsys):
    assert main(["inspect", "--store", damaged, "--data", str(demo_data), "--id", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"no map: {DAMAGED} (the loader masks it at random)"
    assert lines[2].startswith("teacher timm:vit_tiny_patch16_224 weights vit_tiny.safetensors")
    assert main(["inspect", "--store", damaged, "--data", str(demo_data), "--id", "7"]) == 0
    assert "┌" in capsys.readouterr().out  # a row of an intact chunk: its heat map


def test_gc_names_each_generations_teacher(damaged, capsys):
    assert main(["gc", "--store", damaged, "--dry-run"]) == 0
    (line, *_) = capsys.readouterr().out.splitlines()
    assert line.startswith("gen-000001  published  keep    current; teacher timm:vit_tiny")
