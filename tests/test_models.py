"""MAE / SimMIM with thrown tokens, and trainer checkpoints (docs/ARCHITECTURE.md, "Trainer").

Micro models (depth 2, embed 32) on 32 px images with 8 px patches: N = 16 patches.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from salient.trainer.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from salient.trainer.models import MAE, build_model
from salient.trainer.specs import MODELS, ModelError

SIZE, PATCH, N = 32, 8, 16
V, M, T = 4, 7, 5  # visible / masked / thrown counts of the test plans
MICRO = ["mae-micro", "simmim-micro"]


def _plan(batch: int, seed: int = 0, visible: int = V, masked: int = M) -> SimpleNamespace:
    """A random plan: the first `visible` of a permutation visible, next `masked` masked."""
    order = torch.rand(batch, N, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    return SimpleNamespace(
        visible_idx=order[:, :visible],
        mask_idx=order[:, visible : visible + masked],
        throw_idx=order[:, visible + masked :],
    )


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _model(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model(name, image_size=SIZE, patch_size=PATCH, **kwargs)


def _patch_pixels(images: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
    """A 0/1 pixel mask [B,1,H,W] of the given patches [B,K] (row-major grid)."""
    g = SIZE // PATCH
    grid = torch.zeros(images.shape[0], g * g)
    grid.scatter_(1, patch_ids, 1.0)
    grid = grid.view(-1, 1, g, g)
    return grid.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


def _loss_and_grads(model, images, plan):
    model.zero_grad()
    loss, _ = model(images, plan)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


# ---- models ----------------------------------------------------------------------------------


def test_patchify_follows_the_encoder_token_order():
    """Token k of patch_embed and row k of patchify are the same patch (Conv2d as a Linear)."""
    model = _model("mae-micro")
    images = _images(2)
    patches = model.patchify(images)  # [B, N, p*p*3], pixel order (row, col, channel)
    proj = model.encoder.patch_embed.proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)
    tokens = model.encoder.patch_embed(images)
    torch.testing.assert_close(tokens, patches @ weight.T + proj.bias, atol=1e-5, rtol=1e-5)
    row, col = 2, 3  # and the patch at grid (2, 3) is image rows 16..24, cols 24..32
    expected = images[0, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]
    assert torch.equal(patches[0, row * (SIZE // PATCH) + col], expected.permute(1, 2, 0).flatten())


@pytest.mark.parametrize("name", MICRO)
def test_thrown_pixels_have_no_influence_on_loss_or_gradients(name):
    model = _model(name)
    images, plan = _images(3), _plan(3)
    thrown = _patch_pixels(images, plan.throw_idx)
    loss, grads = _loss_and_grads(model, images, plan)
    noisy = images + 5.0 * thrown * _images(3, seed=1)
    assert not torch.equal(noisy, images)
    loss2, grads2 = _loss_and_grads(model, noisy, plan)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for key in grads:
        assert torch.equal(grads[key], grads2[key]), key
    # and through the input: the loss has exactly zero gradient on thrown pixels only
    leaf = images.clone().requires_grad_(True)
    model(leaf, plan)[0].backward()
    assert leaf.grad.mul(thrown).abs().max() == 0
    assert leaf.grad.mul(1 - thrown).abs().sum() > 0


@pytest.mark.parametrize("name", [*MICRO, "norm-pix"])
def test_only_masked_patches_carry_loss(name):
    model = _model("mae-micro", norm_pix_loss=True) if name == "norm-pix" else _model(name)
    images, plan = _images(3), _plan(3)
    with torch.no_grad():
        _, pred = model(images, plan)
        assert pred.shape == (3, M, PATCH * PATCH * 3)  # predictions exist for masked patches only
        loss = model.forward_loss(images, pred, plan.mask_idx)
        other = _images(3, seed=2)
        not_masked = 1 - _patch_pixels(images, plan.mask_idx)
        changed_elsewhere = images * (1 - not_masked) + other * not_masked
        changed_masked = images * not_masked + other * (1 - not_masked)
        assert torch.equal(model.forward_loss(changed_elsewhere, pred, plan.mask_idx), loss)
        assert model.forward_loss(changed_masked, pred, plan.mask_idx) != loss
        assert model.forward_loss(images, pred + 0.1, plan.mask_idx) != loss


@pytest.mark.parametrize("name", MICRO)
def test_loss_matches_a_per_sample_reference(name):
    """The batched gather gives the loss a plain per-sample loop over patches gives."""
    model = _model(name)
    images, plan = _images(2), _plan(2)
    with torch.no_grad():
        loss, pred = model(images, plan)
    p = PATCH
    errors = []
    for b in range(2):
        for j, k in enumerate(plan.mask_idx[b].tolist()):
            r, c = divmod(k, SIZE // p)
            target = images[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0)
            diff = pred[b, j] - target.flatten()
            errors.append(diff.pow(2) if name.startswith("mae") else diff.abs())
    torch.testing.assert_close(loss, torch.cat(errors).mean())


def _sequence_lengths(model, images, plan) -> dict[str, int]:
    """Sequence length entering the first encoder (and decoder) block, seen by a pre-hook."""
    seen = {}

    def recorder(part):
        def hook(_module, args):
            seen[part] = args[0].shape[1]

        return hook

    parts = {"encoder": model.encoder.blocks[0]}
    if isinstance(model, MAE):
        parts["decoder"] = model.decoder_blocks[0]
    hooks = [block.register_forward_pre_hook(recorder(part)) for part, block in parts.items()]
    with torch.no_grad():
        model(images, plan)
    for hook in hooks:
        hook.remove()
    return seen


def test_mae_encoder_sees_cls_plus_visible_and_decoder_no_thrown():
    seen = _sequence_lengths(_model("mae-micro"), _images(2), _plan(2))
    assert seen == {"encoder": 1 + V, "decoder": 1 + V + M}


def test_simmim_encoder_sees_cls_plus_all_but_thrown():
    seen = _sequence_lengths(_model("simmim-micro"), _images(2), _plan(2))
    assert seen == {"encoder": 1 + N - T}


@pytest.mark.parametrize("name", MICRO)
def test_encoder_with_every_patch_visible_is_timm_forward_features(name):
    """Our gather path (pos embed, CLS) is the teacher's plain timm forward on a full plan."""
    model = _model(name).eval()
    images = _images(2)
    everything = torch.arange(N).expand(2, N)
    none = everything[:, :0]
    with torch.no_grad():
        if isinstance(model, MAE):
            ours = model.forward_encoder(images, everything)
        else:
            ours = model.forward_encoder(images, everything, none)
        theirs = model.encoder.forward_features(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MICRO)
def test_overfitting_one_batch_drives_the_loss_down(name):
    model = _model(name)
    images, plan = _images(4), _plan(4)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss, _ = model(images, plan)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", MICRO)
def test_bf16_autocast_gives_a_float32_loss_close_to_fp32(name):
    model = _model(name)
    images, plan = _images(2), _plan(2)
    with torch.no_grad():
        full, _ = model(images, plan)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, pred = model(images, plan)
    assert pred.dtype == torch.bfloat16 and half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)


def test_position_embeddings_are_fixed_sincos():
    model = _model("mae-micro")
    pos = model.encoder.pos_embed
    assert not pos.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(pos[0, 0], torch.zeros(32))  # CLS position is zero (MAE)
    assert pos[0, 1:].abs().max() <= 1 and len({tuple(r.tolist()) for r in pos[0, 1:]}) == N


def test_named_sizes_and_errors():
    sizes = {n: (s.embed_dim, s.depth, s.num_heads) for n, s in MODELS.items()}
    assert sizes["mae-tiny"] == sizes["simmim-tiny"] == (192, 12, 3)
    assert sizes["mae-small"] == (384, 12, 6) and sizes["mae-base"] == (768, 12, 12)
    base = MODELS["mae-base"]
    assert (base.decoder_dim, base.decoder_depth, base.decoder_heads) == (512, 8, 16)
    tiny = build_model("simmim-tiny", image_size=64, patch_size=16)
    assert tiny.encoder.embed_dim == 192 and len(tiny.encoder.blocks) == 12
    with pytest.raises(ModelError, match="unknown model 'mae-huge'.*mae-base"):
        build_model("mae-huge")
    with pytest.raises(ModelError, match="not a multiple of patch size 16"):
        build_model("mae-micro", image_size=40)
    with pytest.raises(ModelError, match="norm_pix_loss"):
        build_model("simmim-micro", norm_pix_loss=True)
    with pytest.raises(ModelError, match="masks no patch"):
        _model("mae-micro")(_images(1), _plan(1, visible=V, masked=0))


# ---- GPA's second loss (GPA eq. 7-8) and gradient accumulation ------------------------------


def _gpa_target(images: torch.Tensor) -> torch.Tensor:
    """A learnable per-patch target: each patch's mean brightness, standardised per image."""
    bright = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), PATCH).flatten(1)
    return (bright - bright.mean(1, keepdim=True)) / bright.std(1, keepdim=True)


def test_zero_gpa_weight_is_the_plain_loss_bit_for_bit():
    images, plan = _images(3), _plan(3)
    target, valid = _gpa_target(images), torch.tensor([True, False, True])
    plain, pred = _model("mae-micro")(images, plan)
    zero = _model("mae-micro", gpa_loss_weight=0.0)
    assert zero.decoder_gpa_pred is None and "gpa_head" not in zero.decoder_kwargs
    assert torch.equal(zero(images, plan, gpa_target=target, gpa_valid=valid)[0], plain)
    with_head = _model("mae-micro", gpa_loss_weight=1.0)  # the head is built last, so ...
    assert torch.equal(with_head(images, plan)[1], pred)  # ... the rest is a plain MAE's
    assert torch.equal(with_head(images, plan)[0], plain)  # no target: no GPA term (x + 0)
    features = with_head._decode(
        with_head.forward_encoder(images, plan.visible_idx), plan.visible_idx, plan.mask_idx
    )
    gpa = with_head.forward_gpa_loss(features, plan.mask_idx, target, valid)
    total, _ = with_head(images, plan, gpa_target=target, gpa_valid=valid)
    assert torch.equal(total, plain + gpa)  # eq. 8: L_RGB + 1 · L_GPA
    predicted = with_head.decoder_gpa_pred(features).squeeze(-1)  # eq. 7 on masked, valid rows
    by_hand = (predicted - target.gather(1, plan.mask_idx))[valid].pow(2).mean()
    torch.testing.assert_close(gpa, by_hand)
    with pytest.raises(ModelError, match="GPA's target loss needs MAE's decoder"):
        build_model("simmim-micro", image_size=SIZE, patch_size=PATCH, gpa_loss_weight=1.0)


def test_gpa_target_loss_falls_on_a_toy():
    model = _model("mae-micro", gpa_loss_weight=1.0)
    images, plan = _images(8), _plan(8)
    target, valid = _gpa_target(images), torch.ones(8, dtype=torch.bool)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def gpa_loss() -> float:
        with torch.no_grad():
            latent = model.forward_encoder(images, plan.visible_idx)
            features = model._decode(latent, plan.visible_idx, plan.mask_idx)
            return model.forward_gpa_loss(features, plan.mask_idx, target, valid).item()

    before = gpa_loss()
    for _ in range(100):
        loss, _ = model(images, plan, gpa_target=target, gpa_valid=valid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # measured: 1.14 -> 0.37 after 100 steps with 1, 2 or 4 torch threads; after 60 steps the
    # curve passes a bump whose height depends on the thread count (0.57-0.71), so the check
    # reads the curve past it
    assert gpa_loss() < 0.5 * before, (before, gpa_loss())


def test_gradient_accumulation_equals_one_big_batch():
    """MAE's --accum_iter: two half batches, loss / 2 each, one step = one full batch."""
    from salient.trainer.loop import build_optimizer, train_one_epoch
    from salient.trainer.schedules import WarmupCosine

    images, plan = _images(8), _plan(8)

    def batch(rows: slice) -> dict:
        return {
            "images": images[rows],
            "visible_idx": plan.visible_idx[rows],
            "mask_idx": plan.mask_idx[rows],
            "throw_idx": plan.throw_idx[rows],
            "ids": torch.arange(8)[rows],
            "has_saliency": torch.zeros(8, dtype=torch.bool)[rows],
            "generation": None,
        }

    results = []
    for batches, accum in (
        ([batch(slice(0, 8))], 1),
        ([batch(slice(0, 4)), batch(slice(4, 8))], 2),
    ):
        model = _model("mae-micro")
        optimizer = build_optimizer(model, 1e-3)
        records = []
        totals = train_one_epoch(
            model,
            optimizer,
            WarmupCosine(1e-3, 10),
            batches + [batch(slice(0, 4))] * (accum - 1),  # a partial step: dropped (MAE)
            epoch=0,
            step=0,
            device=torch.device("cpu"),
            accum_iter=accum,
            on_step=lambda record, merged, out=records: out.append(
                (record, merged["ids"].tolist())
            ),
        )
        results.append((model, totals, records))
    (one, one_totals, one_records), (acc, acc_totals, acc_records) = results
    assert one_totals["step"] == acc_totals["step"] == 1 and acc_totals["images"] == 8
    assert acc_records[0][1] == list(range(8)) and acc_records[0][0]["images"] == 8
    torch.testing.assert_close(acc_records[0][0]["loss"], one_records[0][0]["loss"])
    for (name, a), (_, b) in zip(one.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# ---- checkpoints -----------------------------------------------------------------------------


def _trained(name: str, steps: int = 2):
    model = _model(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        loss, _ = model(_images(2), _plan(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


CONFIG = {
    "model": "mae-micro",
    "image_size": SIZE,
    "patch_size": PATCH,
    "lr": 1e-3,
    "betas": (0.9, 0.95),
}


@pytest.mark.parametrize("name", MICRO)
def test_checkpoint_round_trip(tmp_path, name):
    model, optimizer, scheduler = _trained(name)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 3),
        model,
        optimizer,
        scheduler,
        epoch=3,
        step=2,
        generation="gen-000002",
        config={**CONFIG, "model": name},
    )
    assert path.name == "checkpoint-00003.pt" and sorted(p.name for p in tmp_path.iterdir()) == [
        path.name
    ]
    raw = torch.load(path, weights_only=True)  # plain values only
    assert raw["format"] == "salient-checkpoint/1" and raw["config"]["betas"] == [0.9, 0.95]
    assert raw["config"]["model"] == name and raw["generation"] == "gen-000002"

    fresh, fresh_opt, fresh_sched = _trained(name, steps=0)
    fresh_opt.param_groups[0]["lr"] = 0.5
    ckpt = load_checkpoint(path, fresh, fresh_opt, fresh_sched, config={**CONFIG, "model": name})
    assert (ckpt["epoch"], ckpt["step"], ckpt["generation"]) == (3, 2, "gen-000002")
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert fresh_sched.last_epoch == scheduler.last_epoch == 2
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    first = next(iter(optimizer.state.values()))
    assert torch.equal(first["exp_avg"], next(iter(fresh_opt.state.values()))["exp_avg"])
    # training goes on identically from the restored state
    images, plan = _images(2, seed=5), _plan(2, seed=5)
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        loss, _ = m(images, plan)
        o.zero_grad()
        loss.backward()
        o.step()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


@pytest.mark.parametrize("name", MICRO)
def test_checkpoint_loads_as_a_teacher(tmp_path, name):
    model, optimizer, scheduler = _trained(name)
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer, scheduler, 1, 2, None, {})
    ckpt = torch.load(path, weights_only=True)
    teacher = VisionTransformer(**ckpt["encoder_kwargs"])
    teacher.load_state_dict(ckpt["encoder"], strict=True)
    teacher.eval()
    model.eval()
    images = _images(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            teacher.forward_features(images), model.encoder.forward_features(images)
        )
        assert not torch.equal(
            teacher.forward_features(images),
            VisionTransformer(**ckpt["encoder_kwargs"]).eval().forward_features(images),
        )


def test_checkpoint_is_a_teacher_for_refresh(tmp_path):
    """Through the refresh's own loader: same encoder outputs, and a saliency map per image."""
    from salient.trainer.teacher import saliency
    from salient.trainer.teacher_load import load_teacher

    model, optimizer, scheduler = _trained("mae-micro")
    path = save_checkpoint(
        checkpoint_path(tmp_path, 4), model, optimizer, scheduler, 4, 2, None, CONFIG
    )
    teacher = load_teacher(path, image_size=SIZE)
    assert teacher.meta["name"] == "mae-micro" and teacher.meta["epoch"] == 4
    assert teacher.grid == SIZE // PATCH
    images = _images(2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            teacher.model.forward_features(images), model.eval().encoder.forward_features(images)
        )
        maps = saliency(teacher.model, images)
    assert maps.shape == (2, SIZE // PATCH, SIZE // PATCH) and torch.isfinite(maps).all()
    assert load_teacher(path, image_size=2 * SIZE).grid == 2 * SIZE // PATCH  # resampled pos embed


def test_resume_refuses_another_architecture_and_names_the_field(tmp_path):
    model, optimizer, scheduler = _trained("mae-micro")
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer, scheduler, 1, 2, None, CONFIG)
    simmim = _model("simmim-micro")
    before = [p.clone() for p in simmim.parameters()]
    with pytest.raises(CheckpointError, match=r"model: checkpoint 'mae-micro', now 'simmim-micro'"):
        load_checkpoint(path, simmim)
    assert all(torch.equal(a, b) for a, b in zip(before, simmim.parameters(), strict=True))
    with pytest.raises(CheckpointError, match=r"encoder_kwargs\.img_size: checkpoint 32, now 64"):
        load_checkpoint(path, build_model("mae-micro", image_size=64, patch_size=PATCH))
    deeper = MAE(
        "mae-micro", model.encoder_kwargs, decoder_dim=32, decoder_depth=2, decoder_heads=2
    )
    with pytest.raises(CheckpointError, match=r"decoder_kwargs\.depth: checkpoint 1, now 2"):
        load_checkpoint(path, deeper)
    with pytest.raises(CheckpointError, match=r"config\.patch_size: checkpoint 8, now 16"):
        load_checkpoint(path, config={**CONFIG, "patch_size": 16})


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    model, optimizer, scheduler = _trained("mae-micro", steps=1)
    path = save_checkpoint(tmp_path / "c.pt", model, optimizer, scheduler, 1, 1, None, CONFIG)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a salient checkpoint"):
        load_checkpoint(foreign)
    bare = save_checkpoint(tmp_path / "b.pt", model, None, None, 1, 1, None, CONFIG)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(bare, optimizer=optimizer)


def test_save_refuses_a_config_that_is_not_plain_or_names_another_model(tmp_path):
    model = _model("mae-micro")
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_checkpoint(tmp_path / "c.pt", model, None, None, 0, 0, None, {"data": tmp_path})
    with pytest.raises(CheckpointError, match="config says model 'mae-base'"):
        save_checkpoint(tmp_path / "c.pt", model, None, None, 0, 0, None, {"model": "mae-base"})
    assert list(tmp_path.iterdir()) == []


def test_latest_checkpoint_ignores_partial_writes(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    model = _model("mae-micro")
    for epoch in (2, 10, 9):
        save_checkpoint(checkpoint_path(tmp_path, epoch), model, None, None, epoch, epoch, None, {})
    # a writer killed mid-save leaves only a .partial, never a torn checkpoint-00011.pt
    torn = checkpoint_path(tmp_path, 11)
    torn.with_name(torn.name + ".partial").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("x")
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_path(tmp_path, 10)
    assert load_checkpoint(latest, _model("mae-micro"))["epoch"] == 10


def test_save_unwraps_ddp_and_loads_into_a_wrapped_model(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(_model("mae-micro", seed=1))
        path = save_checkpoint(tmp_path / "c.pt", model, None, None, 0, 0, None, {})
        keys = list(torch.load(path, weights_only=True)["model"])
        assert keys and not any(k.startswith("module.") for k in keys)
        other = DistributedDataParallel(_model("mae-micro", seed=2))
        load_checkpoint(path, other)
        for a, b in zip(
            model.module.state_dict().values(), other.module.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()
