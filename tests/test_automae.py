"""AutoMAE (trainer/automae.py): learned masks, the adversarial pair, the loop, checkpoints.

Micro MAEs (depth 2, embed 32) on 32 px images with 4 px patches: an 8×8 grid (N = 64), a
generator of 6 heads (H → 3 → 1). Expected values come from independent computations: the
gradient formula of the stop-gradient trick, plain sorts, a separate forward.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from salient.pipeline.map_stats import head_map_fidelity, spearman
from salient.trainer.automae import (
    AutoMAE,
    AutoMAEHooks,
    Discriminator,
    MaskGenerator,
    automae_loader_fields,
    build_automae,
    learned_mask_plan,
    lsgan_loss,
    pseudo_masks,
    pseudo_rectangles,
    straight_through_topk,
)
from salient.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from salient.trainer.family import FAMILIES
from salient.trainer.loop import build_optimizer, train_one_epoch
from salient.trainer.models import build_model, gather_tokens
from salient.trainer.schedules import WarmupCosine
from salient.trainer.specs import ModelError
from salient.trainer.steps import Progress
from salient.trainer.teacher import saliency

SIZE, PATCH, GRID, HEADS = 32, 4, 8, 6
N = GRID * GRID
CPU = torch.device("cpu")


def _model(seed: int = 0, **kwargs) -> AutoMAE:
    torch.manual_seed(seed)
    return build_automae("mae-micro", SIZE, PATCH, **{"heads": HEADS, **kwargs})


def _batch(batch: int, seed: int = 0, has_map=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    has_map = torch.ones(batch, dtype=torch.bool) if has_map is None else has_map
    head_maps = torch.rand(batch, HEADS, GRID, GRID, generator=g).flatten(2).softmax(-1)
    return {
        "images": torch.randn(batch, 3, SIZE, SIZE, generator=g),
        "head_maps": head_maps.view(batch, HEADS, GRID, GRID) * has_map[:, None, None, None],
        "has_saliency": has_map,
        "ids": torch.arange(batch) + 100 * seed,
        "generation": "gen-000001",
    }


def _progress(step: int = 0) -> Progress:
    return Progress(step, 100, 10, 0)


# ---------------------------------------------------------------- the generator and its masks


def test_generator_is_two_convolutions_and_a_log_softmax_over_positions():
    torch.manual_seed(0)
    gen = MaskGenerator(12)
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (12, 6, (3, 3), (1, 1)),
        (6, 1, (3, 3), (1, 1)),
    ]
    x = torch.rand(3, 12, 14, 14)
    hidden = F.relu(F.conv2d(x, convs[0].weight, convs[0].bias, padding=1))
    scores = F.conv2d(hidden, convs[1].weight, convs[1].bias, padding=1).flatten(1)
    torch.testing.assert_close(gen(x), scores - scores.logsumexp(-1, keepdim=True))


@pytest.mark.parametrize("k", [1, 16, 49, 63])
def test_straight_through_mask_is_binary_forward_and_the_identity_backward(k):
    prob = torch.rand(5, N, generator=torch.Generator().manual_seed(k)).softmax(-1)
    prob.requires_grad_(True)
    mask = straight_through_topk(prob, k)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert (mask.detach().sum(-1) == k).all()
    top = prob.detach().argsort(-1, descending=True)[:, :k]  # the k highest, by a plain sort
    assert (mask.detach().gather(1, top) == 1).all()
    weights = torch.randn(5, N)
    (mask * weights).sum().backward()
    torch.testing.assert_close(prob.grad, weights)  # d mask / d prob = identity


def test_learned_plan_keeps_maes_counts_and_masks_the_raised_positions():
    prob = torch.rand(6, N, generator=torch.Generator().manual_seed(1)).softmax(-1)
    has_map = torch.tensor([True, True, True, True, False, False])
    keep = int(N * (1 - 0.75))  # MAE / AutoMAE: len_keep
    torch.manual_seed(0)
    plan, noise = learned_mask_plan(prob, has_map, 0.75, mask_factor=10.0)
    assert plan.visible_idx.shape == (6, keep) and plan.mask_idx.shape == (6, N - keep)
    assert plan.throw_idx.shape == (6, 0)
    for row in range(6):
        both = torch.cat([plan.visible_idx[row], plan.mask_idx[row]]).sort().values
        assert torch.equal(both, torch.arange(N))
    for row in range(6):
        top = set(prob[row].argsort(descending=True)[:keep].tolist())
        masked = set(plan.mask_idx[row].tolist())
        if has_map[row]:  # raised by 10 over U(0, 1): every top position is masked
            assert top <= masked
        else:  # no map, no raise: MAE's noise alone decides (this draw misses some)
            assert not top <= masked
    assert (noise[~has_map] < 1).all()


def test_reconstruction_gradient_reaches_the_generator_by_the_stop_gradient_trick():
    """d L_rec / d p_i = mask_factor · <x_i, d L / d x_i> (models_mae.py random_masking),
    checked against the gradient of a separate forward whose tokens are a leaf."""
    model = _model(mask_factor=0.5)
    batch = _batch(4, has_map=torch.tensor([True, True, True, False]))
    torch.manual_seed(3)
    out = model(batch["images"], batch["head_maps"], batch["has_saliency"])
    out.mask_prob.retain_grad()
    out.loss.backward()
    grads = {n: p.grad for n, p in model.generator.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())

    tokens = model._tokens(batch["images"]).detach().requires_grad_(True)  # [B, N, D]
    latent = model._encode(gather_tokens(tokens, out.plan.visible_idx))
    pred = model.forward_decoder(latent, out.plan.visible_idx, out.plan.mask_idx)
    model.forward_loss(batch["images"], pred, out.plan.mask_idx).backward()
    expected = 0.5 * (tokens.detach() * tokens.grad).sum(-1)  # [B, N]
    expected[~batch["has_saliency"]] = 0.0
    torch.testing.assert_close(out.mask_prob.grad, expected, rtol=1e-4, atol=1e-12)
    masked = torch.zeros(4, N, dtype=torch.bool).scatter_(1, out.plan.mask_idx, True)
    assert (out.mask_prob.grad[masked] == 0).all() and (expected[~masked].abs() > 0).any()


def test_the_encoder_starts_as_a_plain_maes_of_the_same_seed():
    """The generator and discriminator are built after the MAE, so eval's baseline (a plain
    MAE rebuilt from the run's seed) is the very initialisation of an AutoMAE run."""
    torch.manual_seed(4)
    plain = build_model("mae-micro", SIZE, PATCH)
    auto = _model(seed=4)
    for (key, a), b in zip(plain.state_dict().items(), auto.state_dict().values()):
        assert torch.equal(a, b), key
    assert auto.encoder is not None and auto.encoder.state_dict().keys() == (
        plain.encoder.state_dict().keys()
    )


def test_generator_inputs_of_another_head_count_are_refused():
    with pytest.raises(ModelError, match="takes 6 per-head maps"):
        _model().mask_probability(torch.rand(2, 3, GRID, GRID))


# ---------------------------------------------------------------- the discriminator


@pytest.mark.parametrize("grid", [8, 14])
def test_pseudo_objects_are_rectangles_of_the_official_sizes(grid):
    torch.manual_seed(0)
    rects = pseudo_rectangles(500, grid)
    scale = grid * grid / 196  # official counts are for 14×14
    side = max(1, round(4 * grid / 14))
    for rect in rects:
        rows, cols = rect.any(1).nonzero()[:, 0], rect.any(0).nonzero()[:, 0]
        height, width = len(rows), len(cols)
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        assert rect.sum() == height * width  # a filled rectangle
        assert side <= width <= max(side, grid - side)
        low, high = (min(grid, math.ceil(round(a * scale) / width)) for a in (40, 160))
        assert low <= height <= high  # height = min(grid, ceil(area / width))
    masks = pseudo_masks(64, grid)
    torch.testing.assert_close(masks.sum((1, 2, 3)), torch.ones(64))
    spread = masks.flatten(1).log()
    assert (spread.amax(1) - spread.amin(1) < 1.5).all()  # scores in [0, 1.5)


def test_discriminator_is_the_official_one_and_fits_small_grids():
    d = Discriminator(14)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 16, (4, 4), (2, 2)),
        (16, 32, (4, 4), (2, 2)),
        (32, 1, (3, 3), (1, 1)),
    ]
    assert all(c.bias is None and hasattr(c, "parametrizations") for c in convs)
    assert d(torch.rand(3, 1, 14, 14)).shape == (3, 1)
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in d.modules())  # use_sigmoid=False
    for grid in (4, 8, 10):
        assert Discriminator(grid)(torch.rand(2, 1, grid, grid)).shape[0] == 2


def test_lsgan_is_mse_to_one_and_zero_over_the_marked_rows():
    scores = torch.tensor([[0.5], [2.0], [-1.0]])
    assert lsgan_loss(scores, real=True).item() == pytest.approx((0.25 + 1.0 + 4.0) / 3)
    assert lsgan_loss(scores, real=False).item() == pytest.approx((0.25 + 4.0 + 1.0) / 3)
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert lsgan_loss(scores, real=True, weight=weight).item() == pytest.approx(2.125)
    assert lsgan_loss(scores, real=True, weight=torch.zeros(3)).item() == 0.0


def test_discriminator_loss_falls_on_pseudo_masks_against_generator_masks():
    model = _model()
    optimizer = build_optimizer(model, 1e-3)
    optimizer.param_groups[0]["lr"] = 1e-3
    hooks = AutoMAEHooks(model, optimizer)
    untrained = copy.deepcopy(model.discriminator)
    batch = _batch(16)
    losses = []
    for step in range(20):
        hooks.before_step(optimizer, _progress(step))
        scalars = hooks.side_step(batch, sync=True, progress=_progress(step))
        losses.append(scalars["loss_d_real"] + scalars["loss_d_fake"])
    assert sum(losses[-3:]) < 0.97 * sum(losses[:3]), losses
    # an independent look: LSGAN's objective, written out, on fresh samples of both kinds
    real = pseudo_masks(256, GRID)
    with torch.no_grad():
        fake = model.mask_probability(_batch(64, seed=9)["head_maps"]).view(-1, 1, GRID, GRID)

    def objective(d: torch.nn.Module) -> float:
        with torch.no_grad():
            d.eval()
            return ((d(real) - 1) ** 2).mean().item() + (d(fake) ** 2).mean().item()

    assert objective(model.discriminator) < objective(untrained) - 0.02


# ---------------------------------------------------------------- the family in the loop


def _train(model, batches, accum_iter, lr=1e-3):
    optimizer = build_optimizer(model, lr)
    hooks = FAMILIES["automae"].hooks(model, optimizer)
    schedule = WarmupCosine(lr, 10, warmup_steps=2)
    records = []
    totals = train_one_epoch(
        model,
        optimizer,
        schedule,
        batches,
        epoch=0,
        step=0,
        device=CPU,
        accum_iter=accum_iter,
        family=FAMILIES["automae"],
        hooks=hooks,
        steps_per_epoch=len(batches) // accum_iter,
        on_step=lambda record, merged: records.append(record),
    )
    return optimizer, hooks, schedule, totals, records


def test_a_micro_automae_trains_through_the_loop_with_accumulation():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [_batch(4, seed=s) for s in range(5)]  # 2 steps of 2 batches, 1 dropped
    optimizer, hooks, schedule, totals, records = _train(model, batches, accum_iter=2)
    assert totals["steps"] == 2 and [r["images"] for r in records] == [8, 8]
    for record in records:
        assert {"loss_rec", "loss_g", "loss_d_real", "loss_d_fake"} <= record.keys()
        assert record["loss"] == pytest.approx(record["loss_rec"] + 0.2 * record["loss_g"])
    d_params = list(model.discriminator.parameters())
    main_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not main_params & {id(p) for p in d_params}  # its own optimiser only
    assert all(hooks.optimizer_d.state[p]["step"] == 2 for p in d_params)  # one per step
    assert hooks.optimizer_d.param_groups[0]["lr"] == pytest.approx(schedule(1))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("generator.") for n in changed)
    assert any(n.startswith("discriminator.") for n in changed)
    assert any(n.startswith("encoder.blocks") for n in changed)
    assert not any(p.requires_grad for p in d_params)  # frozen outside its own step


def test_checkpoint_round_trip_keeps_the_discriminator_and_its_optimiser(tmp_path):
    model = _model()
    optimizer, hooks, schedule, _, _ = _train(model, [_batch(4, seed=s) for s in range(2)], 1)
    path = save_checkpoint(
        tmp_path / "checkpoint-00001.pt",
        model,
        optimizer,
        schedule,
        1,
        2,
        "gen-000001",
        {"model": "mae-micro"},
        hooks=hooks.state_dict(),
    )
    raw = torch.load(path, weights_only=True)
    assert any(k.startswith("discriminator.") for k in raw["model"])
    teacher = VisionTransformer(**raw["encoder_kwargs"])  # the encoder is the MAE's
    teacher.load_state_dict(raw["encoder"], strict=True)

    fresh = _model(seed=7)
    fresh_opt = build_optimizer(fresh, 1e-3)
    fresh_hooks = FAMILIES["automae"].hooks(fresh, fresh_opt)
    ckpt = load_checkpoint(path, fresh, fresh_opt, WarmupCosine(1, 1))
    fresh_hooks.load_state_dict(ckpt["hooks"])
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # generator, discriminator, its spectral-norm vectors
    for p, q in zip(model.discriminator.parameters(), fresh.discriminator.parameters()):
        old, new = hooks.optimizer_d.state[p], fresh_hooks.optimizer_d.state[q]
        assert torch.equal(old["exp_avg"], new["exp_avg"]) and old["step"] == new["step"]
    # one more step from each gives the same weights
    for m, o, h in ((model, optimizer, hooks), (fresh, fresh_opt, fresh_hooks)):
        torch.manual_seed(11)
        train_one_epoch(
            m, o, WarmupCosine(1e-3, 10), [_batch(4, seed=5)], epoch=1, step=2, device=CPU,
            family=FAMILIES["automae"], hooks=h,
        )  # fmt: skip
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(path, build_automae("mae-micro", SIZE, PATCH, heads=4))


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of the two-rank test: 2 steps of 2 accumulated batches, different data."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(_model())
        torch.manual_seed(100 + rank)  # per-rank noise (the train worker's job)
        batches = [_batch(4, seed=10 * rank + s) for s in range(4)]
        _, hooks, _, _, records = _train(model, batches, accum_iter=2)
        flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
        state = [
            hooks.optimizer_d.state[p]["step"] for p in model.module.discriminator.parameters()
        ]
        torch.save({"params": flat, "d_steps": state, "records": records}, f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_identical_with_the_discriminator_in_its_own_ddp(tmp_path):
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # generator and D included
    assert ranks[0]["d_steps"] == ranks[1]["d_steps"] == [2, 2, 2]
    assert ranks[0]["records"][0]["loss_rec"] != ranks[1]["records"][0]["loss_rec"]


# ---------------------------------------------------------------- sources and settings


def test_online_source_recomputes_the_teachers_heads_on_each_batch(tmp_path):
    torch.manual_seed(1)
    teacher_model = build_automae("mae-micro", SIZE, PATCH)  # any salient checkpoint teaches
    path = save_checkpoint(tmp_path / "t.pt", teacher_model, None, None, 0, 0, None, {})
    model = _model(map_source="online", teacher=str(path), heads=2)
    hooks = AutoMAEHooks(model, build_optimizer(model, 1e-3))
    batch = _batch(3)
    del batch["head_maps"]
    batch["has_saliency"] = torch.zeros(3, dtype=torch.bool)
    hooks.side_step(batch, sync=True, progress=_progress())
    teacher = VisionTransformer(**teacher_model.encoder_kwargs)
    teacher.load_state_dict(teacher_model.encoder.state_dict())
    expected = saliency(teacher.eval(), batch["images"], kind="heads")
    torch.testing.assert_close(batch["head_maps"], expected)
    assert batch["has_saliency"].all()
    loss, scalars = FAMILIES["automae"].forward(model, batch, CPU)
    loss.backward()
    assert torch.isfinite(loss) and scalars["loss_g"] > 0
    assert automae_loader_fields({"name": "mae-micro", "map_source": "online"}) == {}


def test_store_source_asks_the_loader_for_the_teachers_heads():
    assert automae_loader_fields({"name": "mae-micro"}) == {"head_maps": 2}  # its own heads
    assert automae_loader_fields({"name": "mae-base", "heads": 12}) == {"head_maps": 12}
    with pytest.raises(ModelError, match="no head_maps"):
        FAMILIES["automae"].forward(_model(), {"images": torch.zeros(1, 3, SIZE, SIZE)}, CPU)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"name": "simmim-micro"}, "use an mae-\\* model"),
        ({"mask_ratio": 0.999}, "keeps 0 of 64"),
        ({"mask_factor": -1.0}, "must be >= 0"),
        ({"map_source": "disk"}, "unknown map source"),
        ({"map_source": "online"}, "needs a teacher"),
        ({"loss_g_factor": -0.5}, "AutoMAE loss_g_factor must be >= 0"),
        ({"heads": 0}, "AutoMAE heads must be a positive integer"),
        ({"heads": True}, "AutoMAE heads must be an integer"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, words):
    with pytest.raises(ModelError, match=words):
        build_automae(**{"name": "mae-micro", "image_size": SIZE, "patch_size": PATCH, **settings})


# ---------------------------------------------------------------- fidelity of stored maps


def test_fidelity_is_the_mean_spearman_over_samples_and_heads():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    stored = torch.rand(4, 3, GRID, GRID, generator=g)
    noisy = stored + 0.3 * torch.rand(4, 3, GRID, GRID, generator=g)
    rows = [
        spearmanr(stored[b, h].flatten(), noisy[b, h].flatten())[0]
        for b in range(4)
        for h in range(3)
    ]
    assert head_map_fidelity(stored, noisy) == pytest.approx(sum(rows) / len(rows))
    assert head_map_fidelity(stored, stored.exp()) == pytest.approx(1.0)  # ranks only
    assert head_map_fidelity(stored, -stored) == pytest.approx(-1.0)
    flat = stored.clone()
    flat[0, 0] = 1.0  # a constant map has no ranking: left out
    assert head_map_fidelity(flat, stored) == pytest.approx(1.0)
    assert math.isnan(spearman(torch.ones(1, 5).numpy(), torch.rand(1, 5).numpy())[0])
    with pytest.raises(ValueError, match="same"):
        head_map_fidelity(stored, stored[:, :2])
