"""Every user error through the CLI is one line under ~300 characters, names flags (not config
fields) and never repeats a library's long text: walked case by case with real files (a timm
ViT's weights for another ViT, a pickle of objects, a text file, a recipe on a small set)."""

from __future__ import annotations

import pickle
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from salient.errors import brief
from salient.jobs.cli import MESSAGE_LIMIT, main


class Opaque:
    """An object a weights-only load refuses."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file(tiny.state_dict(), root / "tiny.safetensors")
    torch.save({"model": Opaque()}, root / "objects.pt")
    (root / "notes.txt").write_text("not a checkpoint\n")
    with open(root / "objects.pkl", "wb") as f:
        pickle.dump({"x": Opaque()}, f)
    return root


def _cases(data, val, store, files, tmp):
    base = ["--data", str(data), "--store", str(store)]
    refresh = ["refresh", *base, "--image-size", "32"]
    train = ["train", *base, "--run-dir", str(tmp / "run"), "--model", "mae-micro"]
    train += ["--image-size", "32", "--patch-size", "8"]
    return [  # (argv, what the line must say)
        (
            [
                *refresh,
                "--teacher",
                "timm:vit_small_patch16_224",
                "--weights",
                str(files / "tiny.safetensors"),
            ],
            r"does not fit this ViT: size mismatch for \w+.* \(and \d+ more\); check the model name",
        ),
        (
            [*refresh, "--teacher", "vit_tiny_patch16_224"],
            r"did you mean timm:vit_tiny_patch16_224 \(with --weights FILE",
        ),
        (
            [*refresh, "--teacher", str(files / "objects.pt")],
            r"pickles Python objects \(.*Opaque\), not only tensors",
        ),
        (
            [
                *refresh,
                "--teacher",
                "timm:vit_tiny_patch16_224",
                "--weights",
                str(files / "objects.pkl"),
            ],
            r"cannot read weights file .*objects.pkl: not a file torch.save wrote",
        ),
        (
            [*refresh, "--teacher", str(files / "notes.txt")],
            r"cannot read teacher checkpoint .*notes.txt: not a file torch.save wrote",
        ),
        (
            [
                "eval",
                "--checkpoint",
                str(files / "notes.txt"),
                "--data",
                str(data),
                "--val",
                str(val),
                "--out",
                str(tmp / "e"),
            ],
            r"notes.txt: not a file torch.save wrote",
        ),
        (
            [*train, "--recipe", "amt-mae"],
            r"--batch-size 128 on each of --workers 1 needs 128 images but .* holds 96; lower --batch-size to 96",
        ),
        (
            [*train, "--recipe", "amt-mae", "--batch-size", "16"],
            r"--effective-batch 4096 needs 256 batches of 16 .*; use --effective-batch 96 or less",
        ),
        (
            [*train, "--resume", "--strategy", "random"],
            r"--resume but .* holds no checkpoint; drop --resume",
        ),
        (["train", "--data", "d", "--bogus"], r"unrecognized arguments: --bogus"),
    ]


def test_every_error_is_one_short_line(demo_data, demo_val, files, tmp_path, capsys):
    for argv, said in _cases(demo_data, demo_val, tmp_path / "s.zarr", files, tmp_path):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's usage errors exit from inside the parser
            code = exit.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and len(err) < MESSAGE_LIMIT + 40, (
            err
        )  # + "salient JOB: error: "
        assert re.search(said, err), err
        assert "weights_only" not in err and "Traceback" not in err, err


def test_library_field_names_become_flags(tmp_path, capsys):
    """The masking library says ``mask_ratio``; through ``salient train`` it says the flag."""
    argv = ["train", "--data", "d", "--store", "s", "--strategy-option", "ratio_var=0.4"]
    assert main([*argv, "--strategy", "attmask_high"]) == 2
    err = capsys.readouterr().err
    assert "ratio_var must lie in [0, --mask-ratio = 0.3]" in err, err  # an option stays a key


def test_a_config_file_with_a_misspelt_setting_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: d\nepoks: 3\nbatchsize: 8\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        "did you mean 'batchsize' → 'batch_size', 'epoks' → 'epochs'?" in err and len(err) < 300
    ), err


def test_brief_keeps_the_first_item_and_a_count():
    listing = "Error(s) in loading state_dict for VisionTransformer:\n" + "".join(
        f"\tsize mismatch for blocks.{i}.attn.qkv.weight: copying a param with shape "
        f"torch.Size([1152, 384]) from checkpoint, the shape in current model is "
        f"torch.Size([576, 192]).\n"
        for i in range(150)
    )
    short = brief(listing)
    assert short.startswith("size mismatch for blocks.0.attn.qkv.weight")
    assert short.endswith("(and 149 more)") and len(short) < 190
    assert brief("one line") == "one line" and brief("x" * 500, 50) == "x" * 49 + "…"
