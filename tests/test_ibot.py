"""iBOT and AttMask's online masks: losses, schedules, EMA, masks, training steps, checkpoints.

Every figure is checked through an independent path: the losses against per-sample loops
written after iBOT's ``iBOTLoss.forward`` on the full head outputs (no masked-token
shortcut, no last-layer trick), the schedules against iBOT's ``utils.cosine_scheduler`` and
``np.linspace`` tables, the attention against timm's own unfused attention read through a
hook, the masks against ``torch.topk``, the local views against a timm ViT built at the local
size by timm's own checkpoint filter. Models: ``ibot-micro`` (depth 2, 32-d, head out 64).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from salient.errors import SalientError
from salient.trainer.checkpoint import export_encoder, load_checkpoint, save_checkpoint
from salient.trainer.family import FAMILIES
from salient.trainer.ibot import build_ibot
from salient.trainer.ibot_loss import (
    cls_distillation,
    masked_patch_distillation,
    teacher_temperature,
)
from salient.trainer.ibot_step import clip_per_parameter
from salient.trainer.loop import build_optimizer, train_one_epoch
from salient.trainer.schedules import WarmupCosine
from salient.trainer.specs import IBOTSettings
from salient.trainer.steps import Progress
from salient.trainer.teacher_load import load_teacher

IBOT = FAMILIES["ibot"]
CPU = torch.device("cpu")


def micro(image_size: int = 32, patch_size: int = 8, seed: int = 0, **settings):
    torch.manual_seed(seed)
    return build_ibot("ibot-micro", image_size, patch_size, **settings)


def images(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def masks_for(views: int, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random masks with one unmasked row (iBOT leaves half of the images unmasked)."""
    flags = torch.rand(views, batch, n, generator=torch.Generator().manual_seed(seed)) < 0.3
    flags[0, 1] = False
    return flags


def cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """iBOT's ``utils.cosine_scheduler``, as written there (the reference for the schedules)."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


# ---------------------------------------------------------------- losses


def test_cls_loss_is_the_per_sample_loop_of_ibot():
    g, v, b, k = 2, 5, 3, 7
    teacher = F.softmax(images(g, b, k, seed=1), -1)
    student = F.log_softmax(images(v, b, k, seed=2), -1)
    total, terms = 0.0, 0
    for q in range(g):  # iBOTLoss.forward: every teacher global view ...
        for view in range(v):  # ... against every student view but the same one
            if view == q:
                continue
            per_image = [-(teacher[q, i] * student[view, i]).sum() for i in range(b)]
            total += sum(per_image) / b
            terms += 1
    assert terms == g * v - g
    assert torch.allclose(cls_distillation(teacher, student), total / terms, atol=1e-6)


def test_patch_loss_is_the_per_sample_loop_of_ibot():
    g, b, n, k = 2, 4, 9, 6
    teacher = F.softmax(images(g * b, n, k, seed=3), -1)
    student = F.log_softmax(images(g * b, n, k, seed=4), -1)
    flags = masks_for(g, b, n).flatten(0, 1)  # [G·B, N], row 1 unmasked
    rows, cols = flags.nonzero(as_tuple=True)
    got = masked_patch_distillation(teacher[rows, cols], student[rows, cols], rows, g * b)
    expected = 0.0
    for q in range(g):  # loss2 per image: masked mean, 0 without a mask; mean over B, over G
        per_image = []
        for i in range(b):
            row = q * b + i
            ce = -(teacher[row] * student[row]).sum(-1)  # [N]
            per_image.append((ce * flags[row]).sum() / max(int(flags[row].sum()), 1))
        expected += sum(per_image) / b
    assert torch.allclose(got, expected / g, atol=1e-6)


def reference_loss(model, global_images, local_images, flags):
    """iBOT's loss of ``model`` on a batch, written independently: timm's own forward for the
    teacher, iBOT's ``mask_model`` by indexing for the student, a timm ViT built at the local
    size for the local views, heads on every token, iBOT's loops; and the centres it updates."""
    s, (tau, tau_patch) = model.settings, model.temperatures
    g, b = global_images.shape[:2]
    glob = global_images.flatten(0, 1)
    teacher = model.teacher.module
    with torch.no_grad():
        t_out = teacher["head"](teacher["backbone"].forward_features(glob))  # [G·B, 1+N, K]
    student = model.student["backbone"]
    x = student.patch_embed(glob).clone()
    x[flags.flatten(0, 1)] = model.mask_token[0, 0]  # iBOT's mask_model
    x = student.norm(student.blocks(student._pos_embed(x)))
    s_out = [model.student["head"](x)]  # [G·B, 1+N, K]
    size = local_images.shape[-1]
    local_vit = VisionTransformer(**{**model.encoder_kwargs, "img_size": size}).eval()
    state = checkpoint_filter_fn(student.state_dict(), local_vit, antialias=False)
    local_vit.load_state_dict(state)  # DINO: the position table resampled bicubic
    local_cls = model.student["head"](local_vit.forward_features(local_images.flatten(0, 1))[:, 0])
    t_cls = F.softmax((t_out[:, 0] - model.centers.cls) / tau, -1).view(g, b, -1)
    s_cls = torch.cat([s_out[0][:, 0], local_cls]).div(s.student_temp).log_softmax(-1)
    s_cls = s_cls.view(-1, b, s_cls.shape[-1])
    cls_total, terms = 0.0, 0
    for q in range(g):
        for v in range(len(s_cls)):
            if v != q:
                cls_total += (-(t_cls[q] * s_cls[v]).sum(-1)).mean()
                terms += 1
    t_patch = F.softmax((t_out[:, 1:] - model.centers.patch) / tau_patch, -1)
    t_patch = t_patch.view(g, b, *t_patch.shape[1:])  # [G, B, N, K]
    s_patch = s_out[0][:, 1:].div(s.student_temp).log_softmax(-1).view(t_patch.shape)
    patch_total = 0.0
    for q in range(g):
        ce = -(t_patch[q] * s_patch[q]).sum(-1)  # [B, N]
        mask = flags[q].float()
        patch_total += ((ce * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    loss = s.lambda1 * cls_total / terms + s.lambda2 * patch_total / g
    centers = (t_out[:, 0].mean(0), t_out[:, 1:].mean(1).mean(0))
    return loss, centers


def test_model_loss_and_centres_match_ibot_written_independently():
    model = micro().eval()  # eval: no drop path, so both paths see the same student
    glob, local = images(2, 3, 3, 32, 32, seed=5), images(4, 3, 3, 16, 16, seed=6)
    flags = masks_for(2, 3, 16, seed=7)
    for step in range(2):  # the second step uses the centres the first one moved
        before = (model.centers.cls.clone(), model.centers.patch.clone())
        expected, (cls_mean, patch_mean) = reference_loss(model, glob, local, flags)
        loss, metrics = model(glob, local, flags, mask_seed=0)
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5), step
        assert math.isclose(float(metrics["masked"]), flags.float().mean().item(), rel_tol=1e-6)
        assert torch.allclose(model.centers.cls, 0.9 * before[0] + 0.1 * cls_mean, atol=1e-6)
        assert torch.allclose(model.centers.patch, 0.9 * before[1] + 0.1 * patch_mean, atol=1e-6)
        assert model.centers.cls.abs().sum() > 0


def test_teacher_temperature_warms_up_linearly_over_30_epochs():
    table = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # iBOTLoss, 100 ep
    assert [teacher_temperature(e, 0.04, 0.07, 30) for e in range(100)] == pytest.approx(table)
    model = micro()
    optimizer = build_optimizer(model, 1e-3, 0.04, (0.9, 0.999))
    hooks = IBOT.hooks(model, optimizer)
    for epoch in (0, 7, 29, 30, 99):
        hooks.before_step(optimizer, Progress(epoch * 10, 1000, 10, epoch))
        assert model.temperatures == pytest.approx((table[epoch], table[epoch]))


# ---------------------------------------------------------------- step hooks


def test_weight_decay_and_ema_momentum_follow_ibots_cosine_schedules():
    epochs, per_epoch = 4, 5
    wd = cosine_scheduler(0.04, 0.4, epochs, per_epoch)  # main_ibot.py wd_schedule
    momentum = cosine_scheduler(0.996, 1, epochs, per_epoch)  # momentum_schedule
    model = micro()
    optimizer = build_optimizer(model, 1e-3, 0.04, (0.9, 0.999))
    hooks = IBOT.hooks(model, optimizer)
    for step in range(epochs * per_epoch):
        if step == 7:  # a resume: load_state_dict gives the optimizer new group dicts
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        progress = Progress(step, epochs * per_epoch, per_epoch, step // per_epoch)
        hooks.before_step(optimizer, progress)
        decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
        assert decays == pytest.approx([0.0, wd[step]])  # biases and norms are never decayed
        with torch.no_grad():  # a student that moved, so the EMA has something to average
            for p in model.student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        teacher = [p.clone() for p in model.teacher.parameters()]
        hooks.after_step(progress)
        m = momentum[step]
        for old, new, student in zip(
            teacher, model.teacher.parameters(), model.student.parameters()
        ):
            assert torch.allclose(new, m * old + (1 - m) * student, atol=1e-7)


def test_last_layer_is_frozen_during_the_first_epoch_only():
    model = micro()
    optimizer = build_optimizer(model, 1e-2, 0.04, (0.9, 0.999))
    hooks = IBOT.hooks(model, optimizer)
    last = model.student["head"].last_layer
    batch = {"global_images": images(2, 4, 3, 32, 32), "local_images": None, "mask_seed": 1}
    for epoch, moves in ((0, False), (1, True)):
        progress = Progress(epoch, 2, 1, epoch)
        before = [p.clone() for p in last.parameters()]
        loss, _ = IBOT.forward(model, batch, CPU)
        loss.backward()
        hooks.before_optimizer_step(progress)
        optimizer.step()
        optimizer.zero_grad()
        changed = [not torch.equal(a, b) for a, b in zip(before, last.parameters())]
        assert all(changed) if moves else not any(changed)


def test_gradients_are_clipped_per_parameter_as_ibot_does():
    model = micro()
    loss, _ = model(images(2, 4, 3, 32, 32), None, masks_for(2, 4, 16))
    loss.backward()
    grads = {n: p.grad.clone() * 50 for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            p.grad.copy_(grads[n])
    norm = clip_per_parameter(model, 3.0)
    assert norm == pytest.approx(torch.stack([g.norm() for g in grads.values()]).norm().item())
    for n, p in model.named_parameters():  # iBOT utils.clip_gradients
        if p.grad is not None:
            coef = 3.0 / (grads[n].norm() + 1e-6)
            expected = grads[n] * coef if coef < 1 else grads[n]
            assert torch.allclose(p.grad, expected, rtol=1e-6), n


# ---------------------------------------------------------------- AttMask's online masks


def hooked_cls_attention(vit: VisionTransformer, images_: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS] attention over the patches, heads averaged, read by timm's own
    unfused attention through a hook on its ``attn_drop`` (PITFALLS: the slow, plain path)."""
    vit = copy.deepcopy(vit).eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        vit.forward_features(images_)
    return seen[0][:, :, 0, 1:].mean(1)  # AttMask: teacher_attention[:, :, 0, 1:].mean(1)


def test_online_attmask_high_masks_exactly_the_teachers_top_attended_patches():
    model = micro(112, 8, strategy="attmask_high", strategy_options={})  # N = 196
    glob = images(2, 3, 3, 112, 112, seed=8)
    _, attention = model.forward_teacher(glob.flatten(0, 1), read_attention=True)
    reference = hooked_cls_attention(model.encoder, glob.flatten(0, 1))
    assert torch.allclose(attention, reference, atol=1e-6)
    flags = model.plan_masks(attention, glob.flatten(0, 1), seed=3)
    top = reference.topk(58, dim=1).indices  # int(0.3 · 196)
    assert torch.equal(flags, torch.zeros_like(flags).scatter_(1, top, True))
    _, metrics = model(glob, None, None, mask_seed=3)  # the step plans the same masks
    assert float(metrics["masked"]) == pytest.approx(58 / 196)


def test_online_attmask_hint_reveals_from_the_top_show_max_53_stay_masked():
    model = micro(112, 8, strategy="attmask_hint", strategy_options={})
    glob = images(2, 4, 3, 112, 112, seed=9).flatten(0, 1)
    _, attention = model.forward_teacher(glob, read_attention=True)
    rank = hooked_cls_attention(model.encoder, glob).argsort(1, descending=True).argsort(1)
    for seed in range(5):
        flags = model.plan_masks(attention, glob, seed)
        revealed = (rank < 58) & ~flags  # AttMask: the top int(0.3·196) masked, then ...
        assert (flags.sum(1) == 53).all() and (rank[flags] < 58).all()
        assert (revealed.sum(1) == 5).all() and (rank[revealed] < 19).all()  # ... top 10 %


def test_online_masks_keep_half_the_views_unmasked_with_one_ratio_per_batch():
    model = micro(112, 8, strategy="attmask_high")  # mask_prob 0.5, ratio_var 0.2 (AttMask)
    glob = images(2, 16, 3, 112, 112, seed=10).flatten(0, 1)
    _, attention = model.forward_teacher(glob, read_attention=True)
    picked, counts = [], set()
    for seed in range(30):
        per_row = model.plan_masks(attention, glob, seed).sum(1)
        assert len(set(per_row[per_row > 0].tolist())) == 1  # one ratio for the batch
        counts |= set(per_row[per_row > 0].tolist())
        picked.append((per_row > 0).double().mean().item())
    assert abs(np.mean(picked) - 0.5) < 4.5 * 0.5 / math.sqrt(30 * 32)
    assert min(counts) >= int(196 * 0.1) and max(counts) <= int(196 * 0.5) and len(counts) > 5


# ---------------------------------------------------------------- the model's parts


def test_local_views_read_the_position_table_resampled_as_dino():
    model = micro().eval()
    local = images(6, 3, 16, 16, seed=11)
    vit = VisionTransformer(**{**model.encoder_kwargs, "img_size": 16}).eval()
    backbone = model.student["backbone"]
    vit.load_state_dict(checkpoint_filter_fn(backbone.state_dict(), vit, antialias=False))
    assert torch.allclose(model.forward_student(local), vit.forward_features(local), atol=1e-6)


def test_encoder_is_the_teacher_backbone_and_starts_as_the_student():
    model = micro()
    assert model.encoder is model.teacher.module["backbone"]
    student, teacher = model.student.state_dict(), model.teacher.module.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)  # same start (iBOT)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training and model.student.training
    assert model.decoder_kwargs["drop_path"] == 0.1 and "drop_path_rate" not in model.encoder_kwargs


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"teacher_temp": 0.0}, "teacher_temp must be > 0"),
        ({"momentum_teacher": 1.5}, r"momentum_teacher must be in \[0, 1\]"),
        ({"drop_path": 1.0}, r"iBOT drop_path must be in \[0, 1\)"),
        ({"warmup_teacher_temp_epochs": 0}, "warmup_teacher_temp_epochs must be a positive"),
        ({"saliency_source": "disk"}, "iBOT saliency_source must be one of online, store"),
        ({"strategy": "nope"}, "unknown mask strategy"),
        ({"strategy_options": {"ratio_var": 0.5}}, "ratio_var must lie"),
        ({"colour": 1}, "bad iBOT setting"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, match):
    with pytest.raises(SalientError, match=match):
        build_ibot("ibot-micro", 32, 8, **settings)
    with pytest.raises(SalientError, match="unknown iBOT model"):
        build_ibot("ibot-huge", 32, 8)
    assert IBOTSettings().teacher_temp == 0.07


# ---------------------------------------------------------------- training, checkpoints


def fixed_batches(count: int, batch: int = 8, seed: int = 12):
    """The same multi-crop batch ``count`` times (the loop takes any iterable of batches)."""
    one = {
        "global_images": images(2, batch, 3, 32, 32, seed=seed),
        "local_images": images(2, batch, 3, 16, 16, seed=seed + 1),
        "masks": masks_for(2, batch, 16, seed=seed + 2),
        "mask_seed": 0,
        "ids": torch.arange(batch),
        "has_saliency": torch.zeros(batch, dtype=torch.bool),
        "generation": None,
    }
    return [one] * count


def run_steps(model, steps: int, epoch: int = 1):
    optimizer = build_optimizer(model, 1e-3, 0.04, (0.9, 0.999))
    hooks = IBOT.hooks(model, optimizer)
    records = []
    totals = train_one_epoch(
        model,
        optimizer,
        WarmupCosine(1e-3, 10 * steps, 0, 1e-6),
        fixed_batches(steps),
        epoch=epoch,
        step=epoch * steps,
        device=CPU,
        clip_grad=3.0,
        family=IBOT,
        hooks=hooks,
        steps_per_epoch=steps,
        on_step=lambda record, merged: records.append(record),
    )
    return optimizer, hooks, records, totals


def test_training_steps_lower_the_loss_and_move_the_teacher():
    model = micro(seed=1)
    encoder_before = copy.deepcopy(model.encoder.state_dict())
    _, _, records, totals = run_steps(model, 12)
    assert totals["steps"] == 12 and {"loss_cls", "loss_patch", "masked"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    moved = [not torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items()]
    assert any(moved)
    student, teacher = model.student.state_dict(), model.teacher.module.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # an average, lagging


def test_checkpoint_round_trip_keeps_student_teacher_and_centres(tmp_path):
    model = micro(seed=2)
    optimizer, hooks, _, totals = run_steps(model, 3)
    config = {"model": model.name, "image_size": 32, "patch_size": 8}
    path = save_checkpoint(
        tmp_path / "checkpoint-00001.pt", model, optimizer, None, 1, totals["step"], None,
        config, hooks.state_dict(),
    )  # fmt: skip
    fresh = micro(seed=3)
    ckpt = load_checkpoint(path, fresh, config=config)
    saved, restored = model.state_dict(), fresh.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert any(k.startswith("student.") for k in ckpt["model"]) and "centers.cls" in ckpt["model"]
    teacher = model.teacher.module["backbone"].state_dict()
    assert all(torch.equal(ckpt["encoder"][k], teacher[k]) for k in teacher)
    # timm's export and the refresh's teacher read the teacher's backbone
    exported = export_encoder(path)
    assert (exported / "model.safetensors").is_file()
    loaded = load_teacher(path, image_size=32)
    glob = images(3, 3, 32, 32, seed=13)
    with torch.no_grad():
        expected = model.encoder.eval().forward_features(glob)
        assert torch.allclose(loaded.model.forward_features(glob), expected, atol=1e-6)


def test_one_process_ddp_steps_update_the_centres_through_all_reduce(tmp_path):
    """Gloo with one rank: DDP finds a gradient for every student parameter (the mask token
    even without masks) and the centres' all-reduce runs."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = micro(seed=4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batches = fixed_batches(3)
        batches[1] = {**batches[1], "masks": torch.zeros_like(batches[1]["masks"])}
        optimizer = build_optimizer(model, 1e-3, 0.04, (0.9, 0.999))
        totals = train_one_epoch(
            ddp, optimizer, WarmupCosine(1e-3, 30, 0, 0.0), batches, epoch=1, step=3,
            device=CPU, clip_grad=3.0, family=IBOT, hooks=IBOT.hooks(ddp, optimizer),
            steps_per_epoch=3,
        )  # fmt: skip
        assert totals["steps"] == 3 and model.centers.cls.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_loader_fields_ask_for_multi_crop_views():
    from salient.pipeline.loader_config import MultiCrop

    online = IBOT.loader_fields({"strategy": "attmask_high"})["views"]
    assert online == MultiCrop(masks_online=True)
    stored = IBOT.loader_fields({"strategy": "attmask_high", "saliency_source": "store"})
    assert not stored["views"].masks_online
    block = IBOT.loader_fields({"strategy": "block", "local_crops": 6, "local_scale": [0.05, 0.4]})
    assert block["views"] == MultiCrop(local_crops=6, local_scale=(0.05, 0.4))


@pytest.mark.parametrize("strategy", ["attmask_hint", "block"])
def test_an_epoch_from_the_multi_crop_loader(demo_data, strategy):
    """The loader's views (online AttMask: no masks in the batch; block: the loader's) through
    ``train_one_epoch`` with the family's loader fields and hooks."""
    from salient.pipeline.loader import LoaderConfig, SalientLoader

    fields = IBOT.loader_fields({"strategy": strategy, "local_crops": 2, "local_size": 16})
    loader = SalientLoader(
        LoaderConfig(
            data=str(demo_data), image_size=32, patch_size=8, batch_size=16, strategy=strategy,
            mask_ratio=0.3, throw_ratio=0.0, strategy_options={"mask_prob": 0.5, "ratio_var": 0.2},
            num_workers=0, shuffle_buffer=16, chunk_size=8, crop_scale=(0.25, 1.0), **fields,
        )
    )  # fmt: skip
    model = micro(seed=5, strategy=strategy)
    optimizer = build_optimizer(model, 5e-4, 0.04, (0.9, 0.999))
    records = []
    totals = train_one_epoch(
        model, optimizer, WarmupCosine(5e-4, 2 * len(loader), len(loader), 1e-6),
        loader.epoch(0), epoch=0, step=0, device=CPU, clip_grad=3.0, family=IBOT,
        hooks=IBOT.hooks(model, optimizer), steps_per_epoch=len(loader),
        on_step=lambda record, merged: records.append(record),
    )  # fmt: skip
    assert totals["steps"] == len(loader) == 6 and totals["images"] == 96
    assert all(math.isfinite(r["loss"]) and 0 < r["masked"] < 0.5 for r in records)
