"""Teacher saliency: the fast path against timm's own non-fused attention, and teacher loading.

References are read independently of salient's code: the softmax is captured from timm's
non-fused attention (``fused_attn=False``, forward hook on ``attn.attn_drop``), and GPA is
summed from an explicit N×N logits matrix built from q / k captured on ``attn.q_norm`` /
``attn.k_norm``. Tiny real ViTs (depth 3, embed 32, patch 8, images 32–64 px).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torchvision.transforms.v2 import functional as TF

from salient.errors import SalientError
from salient.trainer.teacher import SaliencySpec, TeacherError, preprocess, saliency
from salient.trainer.teacher_load import load_teacher

TOL = {"atol": 1e-5, "rtol": 1e-5}
TINY = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 4,
    "num_classes": 0,
}

CONFIGS = {
    "plain": {},
    "qk_norm": {"qk_norm": True},
    "reg4": {"reg_tokens": 4},
    "no_embed_class": {"no_embed_class": True},
    "res_post": {"block_fn": ResPostBlock},
    "size64": {"img_size": 64},
    "dynamic": {"dynamic_img_size": True},
}


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A depth-3 ViT with weights spread out enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def images_for(model: VisionTransformer, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = (48, 64) if model.dynamic_img_size else tuple(model.patch_embed.img_size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def grid_of(model, images) -> tuple[int, int]:
    p = model.patch_embed.patch_size[0]
    return images.shape[-2] // p, images.shape[-1] // p


def timm_softmax(model, images, block) -> torch.Tensor:
    """[B, H, T, T] softmax of `block`, captured from timm's own non-fused attention."""
    attn = model.blocks[block].attn
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    assert len(captured) == 1
    return captured[0]


def explicit_gpa(model, images, block) -> torch.Tensor:
    """[B, H, N] float64: GPA eq. 4–5 summed from the full N×N logits matrix of timm's q and k."""
    attn = model.blocks[block].attn
    qk = {}
    hooks = [
        attn.q_norm.register_forward_hook(lambda m, i, out: qk.setdefault("q", out)),
        attn.k_norm.register_forward_hook(lambda m, i, out: qk.setdefault("k", out)),
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    p = model.num_prefix_tokens
    q, k = qk["q"][:, :, p:].double(), qk["k"][:, :, p:].double()  # [B, H, N, d]
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, N, N]: logits[i, m] = q_i·k_m/√d
    return logits.sum(-2) - logits.diagonal(dim1=-2, dim2=-1)  # Σ_{i≠m}


def assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor) -> None:
    """GPA sums N logits (values up to ~10^3 here): fp32 resolves 1e-5 of the map's scale."""
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * scale, rtol=0)


def minmax_mean(per_head: torch.Tensor) -> torch.Tensor:
    low, high = per_head.amin(-1, keepdim=True), per_head.amax(-1, keepdim=True)
    return ((per_head - low) / (high - low)).mean(1)


# --------------------------------------------------------------------------- cls_attn


@pytest.mark.parametrize("config", CONFIGS)
def test_cls_attn_equals_timm_softmax_row(config):
    model = tiny_vit(**CONFIGS[config])
    images = images_for(model)
    b, grid, prefix = images.shape[0], grid_of(model, images), model.num_prefix_tokens
    heads = model.blocks[0].attn.num_heads
    for block in range(len(model.blocks)):
        row = timm_softmax(model, images, block)[:, :, 0, prefix:]  # [B, H, N]
        assert row.std(-1).min() > 1e-3  # the maps are not flat, so the checks can fail
        got = saliency(model, images, block=block)
        assert got.dtype == torch.float32 and got.shape == (b, *grid)
        torch.testing.assert_close(got, row.mean(1).view(b, *grid), **TOL)
        got = saliency(model, images, block=block, reduce="minmax_mean")
        torch.testing.assert_close(got, minmax_mean(row).view(b, *grid), **TOL)
        for head in range(heads):
            got = saliency(model, images, block=block, head=head)
            torch.testing.assert_close(got, row[:, head].view(b, *grid), **TOL)
        got = saliency(model, images, kind="heads", block=block)
        torch.testing.assert_close(got, row.view(b, heads, *grid), **TOL)


def test_negative_block_and_head_count_from_the_end():
    model = tiny_vit()
    images = images_for(model)
    for kind, extra in [("cls_attn", {}), ("gpa", {"head": -2}), ("cls_attn", {"head": -1})]:
        a = saliency(model, images, kind=kind, block=-1, **extra)
        head = extra.get("head")
        b = saliency(model, images, kind=kind, block=2, head=None if head is None else 4 + head)
        assert torch.equal(a, b)
    assert not torch.equal(saliency(model, images, block=-1), saliency(model, images, block=-2))


def test_reductions_differ():
    model = tiny_vit()
    images = images_for(model)
    maps = {r: saliency(model, images, reduce=r) for r in ("mean", "minmax_mean")}
    assert not torch.allclose(maps["mean"], maps["minmax_mean"])
    assert maps["minmax_mean"].min() >= 0 and maps["minmax_mean"].max() <= 1
    # cls_attn rows are softmax shares of all keys: the patch part sums to less than 1
    sums = maps["mean"].flatten(1).sum(-1)
    assert ((sums > 0) & (sums < 1)).all()


# --------------------------------------------------------------------------- gpa


@pytest.mark.parametrize("config", [*CONFIGS, "no_cls_reg2"])
def test_gpa_equals_explicit_logits_matrix(config):
    overrides = CONFIGS.get(config, {"class_token": False, "reg_tokens": 2, "global_pool": "avg"})
    model = tiny_vit(**overrides)
    images = images_for(model)
    b, grid = images.shape[0], grid_of(model, images)
    for block in range(len(model.blocks)):
        ref = explicit_gpa(model, images, block)  # [B, H, N]
        for head in range(ref.shape[1]):
            got = saliency(model, images, kind="gpa", block=block, head=head)
            assert_close_to_scale(got, ref[:, head].view(b, *grid))
        got = saliency(model, images, kind="gpa", block=block, reduce="mean")
        assert_close_to_scale(got, ref.mean(1).view(b, *grid))
    default = saliency(model, images, kind="gpa")  # GPA Table 5: last block, last head
    assert_close_to_scale(default, ref[:, -1].view(b, *grid))


def test_gpa_is_pre_softmax_and_can_be_negative():
    model = tiny_vit()
    maps = saliency(model, images_for(model), kind="gpa")
    assert (maps < 0).any() and (maps > 0).any()


def test_cls_attn_needs_a_class_token():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(TeacherError, match="no CLS token"):
        saliency(model, images_for(model))


# --------------------------------------------------------------------------- fast path


def test_fast_path_runs_only_up_to_the_read_block():
    model = tiny_vit(depth=4)
    images = images_for(model)
    calls = {}

    def count(name):
        return lambda m, i, o: calls.__setitem__(name, calls.get(name, 0) + 1)

    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(count(f"block{i}"))
        blk.attn.register_forward_hook(count(f"attn{i}"))
    for kind in ("cls_attn", "gpa"):
        calls.clear()
        saliency(model, images, kind=kind, block=2)
        # blocks 0, 1 ran whole (timm's fused blocks); block 2 only in part; block 3 never
        assert calls == {"block0": 1, "attn0": 1, "block1": 1, "attn1": 1}
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_same_teacher_same_images_identical_maps():
    model = tiny_vit()
    images = images_for(model, batch=4)
    for kind in ("cls_attn", "gpa", "heads"):
        first = saliency(model, images, kind=kind)
        assert torch.equal(first, saliency(model, images, kind=kind))
        one_by_one = torch.cat([saliency(model, images[i : i + 1], kind=kind) for i in range(4)])
        torch.testing.assert_close(one_by_one, first, **TOL)  # no mixing across the batch


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "rollout"}, "unknown saliency kind"),
        ({"reduce": "max"}, "unknown reduce"),
        ({"kind": "heads", "head": 1}, "every head"),
        ({"block": 3}, "block 3 out of range"),
        ({"block": -4}, "out of range"),
        ({"head": 4}, "head 4 out of range"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    model = tiny_vit()
    with pytest.raises(TeacherError, match=message):
        saliency(model, images_for(model), **options)


def test_bad_inputs_are_clear_errors():
    model = tiny_vit()
    images = images_for(model)
    with pytest.raises(TeacherError, match="built for"):
        saliency(model, torch.randn(1, 3, 40, 40))
    with pytest.raises(TeacherError, match="float tensor"):
        saliency(model, (images * 50).to(torch.uint8))
    with pytest.raises(TeacherError, match="divisible"):
        saliency(tiny_vit(dynamic_img_size=True), torch.randn(1, 3, 36, 32))
    with pytest.raises(TeacherError, match="training mode"):
        saliency(model.train(), images)
    assert issubclass(TeacherError, SalientError)


def test_a_head_wins_over_reduce_and_heads_ignores_reduce():
    model = tiny_vit()
    images = images_for(model)
    for kind in ("cls_attn", "gpa"):
        one = saliency(model, images, kind=kind, head=1)
        assert torch.equal(saliency(model, images, kind=kind, head=1, reduce="mean"), one)
    every = saliency(model, images, kind="heads")
    assert torch.equal(saliency(model, images, kind="heads", reduce="minmax_mean"), every)


def test_spec_resolves_kind_defaults_for_the_metadata():
    model = tiny_vit()
    assert SaliencySpec().resolve(model).as_meta() == {
        "kind": "cls_attn",
        "block": 2,
        "head": None,
        "reduce": "mean",
    }
    assert SaliencySpec("gpa").resolve(model).as_meta() == {
        "kind": "gpa",
        "block": 2,
        "head": 3,
        "reduce": None,
    }
    assert SaliencySpec("gpa", block=0, reduce="mean").resolve(model).as_meta() == {
        "kind": "gpa",
        "block": 0,
        "head": None,
        "reduce": "mean",
    }
    assert SaliencySpec("cls_attn", head=-1, reduce="mean").resolve(model).as_meta() == {
        "kind": "cls_attn",
        "block": 2,
        "head": 3,
        "reduce": None,
    }
    assert SaliencySpec("heads", reduce="mean").resolve(model).reduce is None


# --------------------------------------------------------------------------- preprocess


def test_preprocess_normalises_without_resizing_at_the_target_size():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    got = preprocess(x, 32, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(preprocess(x.float() / 255, 32, mean, std), ref)


def test_preprocess_squashes_the_whole_image_like_torchvision_resize():
    x = torch.randint(0, 256, (1, 3, 90, 60), dtype=torch.uint8)
    got = preprocess(x, 32, (0, 0, 0), (1, 1, 1))
    ref = TF.resize(x.float() / 255, [32, 32], antialias=True)
    assert got.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    flat = preprocess(torch.full((3, 70, 41), 128, dtype=torch.uint8), 32)
    expected = (128 / 255 - torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN)) / torch.tensor(
        timm.data.IMAGENET_DEFAULT_STD
    )
    torch.testing.assert_close(flat, expected.view(1, 3, 1, 1).expand(1, 3, 32, 32))


def test_preprocess_takes_a_list_of_sizes_and_rejects_non_rgb():
    ims = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(40, 30), (16, 64)]]
    got = preprocess(ims, 32)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got[1:], preprocess(ims[1], 32))
    for bad in [torch.zeros(1, 1, 32, 32), torch.zeros(32, 32), [], "image"]:
        with pytest.raises(TeacherError):
            preprocess(bad, 32)


# --------------------------------------------------------------------------- load_teacher

ENCODER = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "num_classes": 0,
}


def write_checkpoint(path, encoder=None, epoch=7):
    """A checkpoint in the documented trainer format (INTERFACES.md, "Trainer checkpoint")."""
    encoder = encoder if encoder is not None else tiny_vit(**ENCODER)
    torch.save(
        {
            "format": "salient-checkpoint/1",
            "config": {"model": "mae-tiny"},
            "encoder_kwargs": dict(ENCODER),
            "encoder": encoder.state_dict(),
            "model": {
                **{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "decoder_embed.weight": torch.zeros(8, 32),
            },
            "optimizer": {},
            "scheduler": {},
            "epoch": epoch,
            "step": 123,
            "generation": None,
        },
        path,
    )
    return encoder


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_teacher_rebuilds_the_encoder(tmp_path):
    path = tmp_path / "ckpt.pt"
    encoder = write_checkpoint(path)
    teacher = load_teacher(path, image_size=32)
    assert (teacher.patch_size, teacher.grid, teacher.image_size) == (8, 4, 32)
    assert teacher.meta["sha256"] == file_sha256(path)
    assert teacher.meta["path"] == str(path.resolve())
    assert (teacher.meta["name"], teacher.meta["epoch"]) == ("mae-tiny", 7)
    assert (teacher.meta["image_size"], teacher.meta["patch_size"]) == (32, 8)
    assert not teacher.model.training
    images = images_for(encoder)
    assert torch.equal(saliency(teacher.model, images), saliency(encoder, images))
    again = load_teacher(str(path), image_size=32)
    assert torch.equal(
        saliency(again.model, images, kind="gpa"), saliency(teacher.model, images, kind="gpa")
    )


def test_checkpoint_teacher_at_another_size_resamples_pos_embed(tmp_path):
    path = tmp_path / "ckpt.pt"
    encoder = write_checkpoint(path)
    teacher = load_teacher(path, image_size=48)
    assert teacher.grid == 6
    ref = resample_abs_pos_embed(encoder.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed, ref)
    maps = saliency(teacher.model, torch.randn(2, 3, 48, 48))
    assert maps.shape == (2, 6, 6)


def timm_weights(tmp_path, suffix: str, wrap: bool = False):
    model = timm.create_model("test_vit")  # 1000-class head, built for 160 px
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"test_vit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if wrap else state, path)
    return model, path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("suffix, wrap", [(".safetensors", False), (".pth", False), (".pth", True)])
def test_timm_teacher_from_a_local_file(tmp_path, no_network, suffix, wrap):
    source, path = timm_weights(tmp_path, suffix, wrap)
    teacher = load_teacher("timm:test_vit", weights=path, image_size=64)
    assert (teacher.patch_size, teacher.grid) == (16, 4)
    assert teacher.meta["name"] == "test_vit" and teacher.meta["sha256"] == file_sha256(path)
    assert teacher.mean == (0.5, 0.5, 0.5)  # from the model's pretrained_cfg
    for (name, got), (_, ref) in zip(
        teacher.model.blocks.state_dict().items(), source.blocks.state_dict().items()
    ):
        assert torch.equal(got, ref), name
    ref = resample_abs_pos_embed(source.pos_embed, new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed, ref)
    assert saliency(teacher.model, torch.randn(2, 3, 64, 64), kind="gpa").shape == (2, 4, 4)


def test_full_mae_checkpoint_is_a_teacher_from_its_encoder(tmp_path, no_network, caplog):
    """The official ``mae_pretrain_vit_base.pth`` layout: ``{"model": encoder + decoder}``."""
    encoder = timm.create_model("test_vit", num_classes=0)  # MAE's encoder: no head
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    dim, decoder_dim, n = encoder.embed_dim, 16, encoder.patch_embed.num_patches
    decoder = {  # MAE's models_mae.py names, fake values
        "mask_token": torch.randn(1, 1, decoder_dim),
        "decoder_embed.weight": torch.randn(decoder_dim, dim),
        "decoder_embed.bias": torch.randn(decoder_dim),
        "decoder_pos_embed": torch.randn(1, n + 1, decoder_dim),
        "decoder_blocks.0.norm1.weight": torch.randn(decoder_dim),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * decoder_dim, decoder_dim),
        "decoder_norm.weight": torch.randn(decoder_dim),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, decoder_dim),
    }
    path = tmp_path / "mae_pretrain_test_vit.pth"
    torch.save({"model": {**encoder.state_dict(), **decoder}}, path)
    with caplog.at_level(logging.WARNING, logger="salient.trainer.teacher_load"):
        teacher = load_teacher("timm:test_vit", weights=path, image_size=64)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "full MAE checkpoint" in logged and "left out 8 decoder keys" in logged
    assert all(key in logged for key in decoder)  # every key left out is named
    for (name, got), (_, ref) in zip(
        teacher.model.blocks.state_dict().items(), encoder.blocks.state_dict().items()
    ):
        assert torch.equal(got, ref), name  # the encoder's weights, strictly loaded
    torch.save({"model": {**encoder.state_dict(), "extra.weight": torch.ones(2)}}, path)
    with pytest.raises(TeacherError, match="unexpected \\['extra.weight'\\]"):
        load_teacher("timm:test_vit", weights=path, image_size=64)  # not MAE's: still refused


def test_random_teacher_only_when_allowed_and_seeded(no_network):
    with pytest.raises(TeacherError, match="allow-random-teacher"):
        load_teacher("timm:test_vit", image_size=64)
    rng = torch.get_rng_state()
    a = load_teacher("timm:test_vit", allow_random=True, image_size=64)
    b = load_teacher("timm:test_vit", allow_random=True, image_size=64)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert a.meta["sha256"] == "random" and a.meta["path"] is None
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(saliency(a.model, images), saliency(b.model, images))


def test_load_errors_are_clear(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    write_checkpoint(ckpt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    a_dict = tmp_path / "dict.pth"
    torch.save({"a": 1, "b": [2, 3]}, a_dict)
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), resnet)
    pickled = tmp_path / "namespace.pth"
    torch.save(argparse.Namespace(a=1), pickled)
    cases = [
        (lambda: load_teacher(tmp_path / "missing.pt"), "does not exist"),
        (lambda: load_teacher("test_vit"), "did you mean timm:test_vit"),
        (lambda: load_teacher(garbage), "cannot read"),
        (lambda: load_teacher(pickled), r"pickles Python objects \(argparse.Namespace\)"),
        (lambda: load_teacher(a_dict), "not a salient training checkpoint"),
        (lambda: load_teacher(resnet), "not a salient training checkpoint"),
        (lambda: load_teacher(ckpt, weights=resnet), "carries its own"),
        (lambda: load_teacher(ckpt, image_size=50), "not a multiple of the teacher's patch"),
        (lambda: load_teacher("timm:no_such_vit", weights=resnet), "unknown timm model"),
        (lambda: load_teacher("timm:test_vit", weights=tmp_path / "x.pth"), "does not exist"),
        (lambda: load_teacher("timm:test_vit", weights=garbage), "cannot read weights"),
        (lambda: load_teacher("timm:test_vit", weights=a_dict), "no state dict of tensors"),
        (lambda: load_teacher("timm:test_vit", weights=resnet), "not a checkpoint of this ViT"),
        (lambda: load_teacher("timm:test_vit", weights=ckpt), "not a checkpoint of this ViT"),
        (lambda: load_teacher("timm:test_resnet", allow_random=True), "VisionTransformer"),
        (lambda: load_teacher("timm:test_vit", allow_random=True, image_size=72), "multiple"),
    ]
    for load, message in cases:
        with pytest.raises(TeacherError, match=message):
            load()


def test_checkpoint_with_a_foreign_encoder_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, encoder=tiny_vit(**{**ENCODER, "embed_dim": 64}))
    with pytest.raises(TeacherError, match="does not fit this ViT"):
        load_teacher(path, image_size=32)
