"""Checkpoints on a bounded disk: the encoder exported for timm loads every key three ways, and
pruning keeps the newest checkpoints (and a refresh's teacher) with their exports."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from salient.trainer.checkpoint import (
    checkpoint_path,
    encoder_dir,
    export_encoder,
    prune_checkpoints,
    save_checkpoint,
)
from salient.trainer.models import build_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mae-micro", 32, 8)
    path = checkpoint_path(tmp_path_factory.mktemp("run"), 4)
    save_checkpoint(path, model, None, None, 4, 24, None, {"model": "mae-micro"})
    return model.encoder.state_dict(), export_encoder(path)


def assert_same(state: dict, want: dict) -> None:
    assert state.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(state[key], value), key


def test_timm_loads_the_folder_by_itself(exported):
    want, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert_same(model.state_dict(), want)
    assert model.pretrained_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_timm_loads_it_by_name_with_the_file_overlay(exported):
    """The way a timm user loads a local file; a file whose keys did not match would load
    nothing and say nothing, so every tensor is compared."""
    want, folder = exported
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(folder / "model.safetensors")},
        **config["model_args"],
    )
    assert_same(model.state_dict(), want)


def test_a_plain_load_state_dict_matches_every_key(exported):
    want, folder = exported
    config = json.loads((folder / "config.json").read_text())
    model = VisionTransformer(**config["model_args"])
    result = model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert_same(model.state_dict(), want)


def test_pruning_keeps_the_newest_and_a_running_refreshs_teacher(tmp_path):
    model = build_model("mae-micro", 32, 8)
    for epoch in range(1, 6):
        export_encoder(
            save_checkpoint(
                checkpoint_path(tmp_path, epoch), model, None, None, epoch, epoch, None, {}
            )
        )
    teacher = checkpoint_path(tmp_path, 2)
    removed = prune_checkpoints(tmp_path, keep=2, protect=[teacher])
    assert [p.name for p in removed] == ["checkpoint-00001.pt", "checkpoint-00003.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00002.pt",
        "checkpoint-00004.pt",
        "checkpoint-00005.pt",
        "encoder-00002",
        "encoder-00004",
        "encoder-00005",
    ]
    assert encoder_dir(teacher) == tmp_path / "encoder-00002"
    assert prune_checkpoints(tmp_path, keep=0) == []  # 0 keeps everything
