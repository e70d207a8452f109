"""AutoMAE: an MAE whose masks come from a learned, adversarially trained mask generator.

Chen et al. 2023, "Improving Masked Autoencoders by Learning Where to Mask"; every step below
follows the authors' code (``hyperea/automae``: ``models_mae.py``, ``engine_pretrain.py``,
``main_pretrain.py``), cited per function. docs/ARCHITECTURE.md, "Trainer families", says how
it sits in salient's loop; README, "Decisions", why it departs where it does.

- **Generator** (:class:`MaskGenerator`, ``ScorerBlock``): the frozen teacher's H per-head
  CLS-attention maps ``[B, H, g, g]`` → two 3×3 convolutions H → H/2 → 1 with a ReLU →
  log-softmax over the g² positions; a Gumbel-softmax (τ = 1) of these scores is the mask
  probability ``p [B, N]`` (``scorer_mask``).
- **Learned masks** (:func:`learned_mask_plan`, ``random_masking``): the top
  ``keep = int(N·(1 − r))`` positions of ``p`` form a straight-through binary mask ``b``
  (forward binary, backward the identity on ``p``); MAE's uniform noise is raised by
  ``mask_factor · b``, and the highest ``N − keep`` noises are masked.
- **Gradient into the generator** (:func:`carry_gradient`): the patch tokens become
  ``s·x + sg(1 − s)·x`` with ``s`` the noise: the same values, but the reconstruction loss's
  gradient reaches ``s``, hence ``b``, hence ``p``.
- **Discriminator** (:class:`Discriminator`): three spectrally normalised convolutions, LSGAN
  loss (:func:`lsgan_loss`); "real" samples are pseudo-masks (:func:`pseudo_masks`), "fake"
  ones the generator's ``p``. It is trained in :meth:`AutoMAEHooks.side_step` with its own
  Adam on every batch before the model's forward (``engine_pretrain.train_one_epoch``); the
  generator's loss is ``L_rec + loss_g_factor · L_adv`` with the discriminator frozen
  (:func:`automae_forward`).

The maps come from the loader's ``head_maps`` (``map_source="store"``: a ``heads`` generation
cropped with the image) or from a frozen teacher on each augmented batch, as the paper does
(``"online"``: :class:`AutoMAEHooks` runs it and adds ``head_maps`` to the batch).
``model.encoder`` stays the MAE's encoder, so checkpoints, eval, export and refresh read it.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.parametrizations import spectral_norm

from salient.pipeline.masking import MaskPlan
from salient.trainer.checkpoint import unwrap_model
from salient.trainer.models import MAE, gather_tokens, model_spec
from salient.trainer.specs import (
    LOSS_G_FACTOR,
    MAP_SOURCES,
    MASK_FACTOR,
    AutoMAESettings,
    ModelError,
)
from salient.trainer.steps import Progress, StepHooks, sync_if
from salient.trainer.teacher import saliency
from salient.trainer.teacher_load import Teacher, load_teacher

__all__ = [
    "AutoMAE",
    "AutoMAEHooks",
    "AutoMAEOutput",
    "Discriminator",
    "MaskGenerator",
    "automae_forward",
    "automae_loader_fields",
    "automae_settings",
    "build_automae",
    "carry_gradient",
    "generator_heads",
    "learned_mask_plan",
    "lsgan_loss",
    "pseudo_masks",
    "pseudo_rectangles",
    "straight_through_topk",
    "teacher_input",
]

MASK_RATIO = 0.75  # AutoMAE run_pretrain.sh: --mask_ratio 0.75
GUMBEL_TAU = 1.0  # models_mae.py scorer_mask: F.gumbel_softmax(mask, tau=1)
D_BETAS = (0.9, 0.95)  # main_pretrain.py: optimizer_d = torch.optim.Adam(..., betas=(0.9, 0.95))
PSEUDO_RAISE = 0.5  # engine_pretrain.py: random_rectangle_simple(0.5, ...) (paper Sec. 3.2)
PSEUDO_AREA = (40, 160)  # engine_pretrain.py random_rectangle_simple: randint(40, 160) patches
PSEUDO_MIN_SIDE = 4  # engine_pretrain.py random_rectangle_simple: l = randint(4, grid - 4)
OFFICIAL_GRID = 14  # the grid those counts are written for (ViT-B/16 at 224 px)


# ---------------------------------------------------------------- the mask generator


class MaskGenerator(nn.Module):
    """Per-head maps ``[B, H, g, g]`` → log-probabilities of each position ``[B, g²]``.

    ``models_mae.py`` ``ScorerBlock``: ``Conv2d(12, 6, 3, padding=1)``, ReLU,
    ``Conv2d(6, 1, 3, padding=1)``, flatten, ``LogSoftmax(-1)``; written for any H as
    H → H/2 → 1 (at least one hidden channel). PyTorch's default convolution init, as there
    (MAE's ``_init_weights`` touches only linear and norm layers).
    """

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)
        hidden = max(self.heads // 2, 1)
        self.net = nn.Sequential(
            nn.Conv2d(self.heads, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, kernel_size=3, padding=1),
            nn.Flatten(),
            nn.LogSoftmax(-1),
        )

    def forward(self, head_maps: torch.Tensor) -> torch.Tensor:
        return self.net(head_maps)  # [B, g²]


def straight_through_topk(prob: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, N]`` → a mask with exactly ``k`` ones per row at the ``k`` highest ``prob``:
    binary in the forward pass, the identity on ``prob`` in the backward pass
    (``models_mae.py`` ``random_masking``: ``bmask - mask.detach() + mask``)."""
    top = prob.topk(k, dim=-1).indices  # [B, k]
    hard = torch.zeros_like(prob).scatter_(-1, top, 1.0)
    return hard - prob.detach() + prob


def learned_mask_plan(
    prob: torch.Tensor, has_map: torch.Tensor, mask_ratio: float, mask_factor: float
) -> tuple[MaskPlan, torch.Tensor]:
    """AutoMAE's masks from the generator's probabilities ``prob [B, N]``: the plan and the
    noise ``[B, N]`` it sorts (which carries the gradient to ``prob``).

    ``models_mae.py`` ``random_masking``: ``keep = int(N·(1 − r))``; the straight-through top
    ``keep`` of ``prob`` raise MAE's uniform noise by ``mask_factor``; ascending noise is kept,
    the rest masked, so ``N − keep`` are masked. Rows whose ``has_map`` is False get no
    raise: MAE's random masking. Nothing is thrown.
    """
    batch, n = prob.shape
    keep = int(n * (1 - mask_ratio))  # models_mae.py random_masking: len_keep
    raised = straight_through_topk(prob, keep) * has_map[:, None].to(prob.dtype)  # [B, N]
    noise = torch.rand(batch, n, device=prob.device) + raised * mask_factor  # [B, N]
    order = noise.argsort(-1)  # ascending: small is keep, large is remove (MAE)
    return MaskPlan(order[:, :keep], order[:, keep:], order[:, :0]), noise


def carry_gradient(tokens: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, D]`` unchanged in value, but with ``d loss / d noise_i = x_i · g_i``:
    ``s·x + sg(1 − s)·x`` with ``s = noise`` (``models_mae.py`` ``random_masking``:
    ``x = sc * x + (1 - sc).detach() * x``; paper Sec. 3.3)."""
    scale = noise.unsqueeze(-1)  # [B, N, 1]
    return scale * tokens + (1 - scale).detach() * tokens


# ---------------------------------------------------------------- the discriminator


class Discriminator(nn.Module):
    """Mask images ``[B, 1, g, g]`` → scores ``[B, n]`` (n = 1 on a 14×14 grid).

    ``models_mae.py`` ``Discriminator(use_sigmoid=False)`` (as ``main_pretrain.py`` builds it):
    spectrally normalised ``Conv2d(1, 16, 4, 2, 1)``, LeakyReLU 0.2, ``Conv2d(16, 32, 4, 2,
    1)``, LeakyReLU 0.2, ``Conv2d(32, 1, 3)``, no biases (``bias=not use_spectral_norm``), no
    sigmoid. On grids below 12 the last convolution pads by what leaves one output (the
    official one needs g ≥ 12; salient's demo runs g = 8).
    """

    def __init__(self, grid: int) -> None:
        super().__init__()
        side = grid // 4  # after the two stride-2 convolutions
        pad = max(0, -(-(3 - side) // 2))  # ceil((3 - side) / 2): at least one output
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(1, 16, kernel_size=4, stride=2, padding=1, bias=False)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1, bias=False)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(32, 1, kernel_size=3, padding=pad, bias=False)),
            nn.Flatten(),
        )

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks)


def lsgan_loss(
    scores: torch.Tensor, real: bool, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """LSGAN (``models_mae.py`` ``AdversarialLoss(type='lsgan')``: MSE to the label 1.0 for
    real, 0.0 for fake) of ``scores [B, n]``; ``weight [B]`` averages over the rows it marks
    (zero when none is: the graph stays whole for DDP)."""
    target = 1.0 if real else 0.0
    per_row = (scores.float() - target).pow(2).flatten(1).mean(1)  # [B]
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1)


def pseudo_rectangles(batch: int, grid: int) -> torch.Tensor:
    """The pseudo-objects of :func:`pseudo_masks`: ``[B, g, g]`` bool, one rectangle per row
    (``engine_pretrain.py`` ``random_rectangle_simple``).

    Per row: area ``U{40..160}`` patches, width ``U{4..g−4}``, height ``min(g, ⌈area/width⌉)``,
    a uniform position. The counts are the official ones at g = 14 and scale with the grid
    elsewhere (area × N/196, side × g/14), so a small grid keeps the same shares.
    """
    n = grid * grid
    low, high = (max(1, round(a * n / OFFICIAL_GRID**2)) for a in PSEUDO_AREA)
    side = max(1, round(PSEUDO_MIN_SIDE * grid / OFFICIAL_GRID))
    area = torch.randint(low, high + 1, (batch,))
    width = torch.randint(side, max(side, grid - side) + 1, (batch,))  # official `l`: columns
    height = (area / width).ceil().long().clamp(max=grid)  # official `w`: rows
    left = (torch.rand(batch) * (grid - width + 1)).long()  # randint(0, grid - l)
    top = (torch.rand(batch) * (grid - height + 1)).long()  # randint(0, grid - w)
    cells = torch.arange(grid)
    cols = (cells >= left[:, None]) & (cells < (left + width)[:, None])  # [B, g]
    rows = (cells >= top[:, None]) & (cells < (top + height)[:, None])  # [B, g]
    return rows[:, :, None] & cols[:, None, :]


def pseudo_masks(batch: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The discriminator's "real" samples ``[B, 1, g, g]``: uniform noise raised by 0.5 on a
    random rectangle (:func:`pseudo_rectangles`), softmaxed over the positions
    (``engine_pretrain.py``: ``random_rectangle_simple(0.5, grid)``, then ``F.softmax``)."""
    scores = PSEUDO_RAISE * pseudo_rectangles(batch, grid) + torch.rand(batch, grid, grid)
    return scores.flatten(1).softmax(-1).view(batch, 1, grid, grid).to(device)


# ---------------------------------------------------------------- the model


class AutoMAEOutput(NamedTuple):
    """One forward: reconstruction loss, predicted masked pixels ``[B, M, p·p·3]``, the
    generator's mask probability ``[B, N]`` and the learned plan."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask_prob: torch.Tensor
    plan: MaskPlan


class AutoMAE(MAE):
    """MAE (``salient.trainer.models``) with AutoMAE's generator and discriminator.

    ``forward(images, head_maps, has_map)`` masks with the generator (module docstring) and
    returns :class:`AutoMAEOutput`. The discriminator is a submodule, so the checkpoint's
    ``model`` holds it, but its parameters are frozen (``requires_grad`` False) except inside
    :meth:`AutoMAEHooks.side_step`, and DDP ignores them: the model's optimiser and its
    all-reduce never see them. ``decoder_kwargs`` records the generator's heads, so a resume
    refuses a plain MAE checkpoint.
    """

    def __init__(
        self,
        name: str,
        encoder_kwargs: dict[str, Any],
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_ratio: float = MASK_RATIO,
        mask_factor: float = MASK_FACTOR,
        loss_g_factor: float = LOSS_G_FACTOR,
        heads: int | None = None,
        map_source: str = "store",
        teacher: str | None = None,
        teacher_weights: str | None = None,
    ) -> None:
        super().__init__(
            name,
            encoder_kwargs,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            mlp_ratio,
            norm_pix_loss,
        )  # first: the MAE's weights equal a plain MAE's of the same seed
        self.grid = self.encoder.patch_embed.grid_size[0]
        self.mask_ratio, self.mask_factor = float(mask_ratio), float(mask_factor)
        self.loss_g_factor = float(loss_g_factor)
        self.map_source, self.teacher, self.teacher_weights = map_source, teacher, teacher_weights
        self.generator = MaskGenerator(heads or encoder_kwargs["num_heads"])
        self.discriminator = Discriminator(self.grid).requires_grad_(False)
        ignored = [f"discriminator.{n}" for n, _ in self.discriminator.named_parameters()]
        ignored += [f"discriminator.{n}" for n, _ in self.discriminator.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)
        self.decoder_kwargs.update(generator_heads=self.generator.heads, discriminator="sn-conv3")

    def mask_probability(self, head_maps: torch.Tensor, gumbel: bool = True) -> torch.Tensor:
        """The generator's mask probability ``[B, N]`` of ``head_maps [B, H, g, g]``: a
        Gumbel-softmax sample (τ = 1, ``models_mae.py`` ``scorer_mask``), or with
        ``gumbel=False`` the softmax of its scores (what inspect shows). In float32 under
        any autocast: two tiny convolutions and a softmax over positions."""
        if head_maps.ndim != 4 or head_maps.shape[1] != self.generator.heads:
            raise ModelError(
                f"the mask generator takes {self.generator.heads} per-head maps [B, H, g, g], "
                f"got {tuple(head_maps.shape)}; refresh --kind heads with a teacher of "
                f"{self.generator.heads} heads, or build with heads={head_maps.shape[1]}"
            )
        with torch.autocast(head_maps.device.type, enabled=False):
            scores = self.generator(head_maps.float())  # [B, N] log-probabilities
            return F.gumbel_softmax(scores, tau=GUMBEL_TAU) if gumbel else scores.exp()

    def adversarial_loss(self, mask_prob: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The generator's LSGAN loss: the (frozen) discriminator should call ``mask_prob``
        real (``engine_pretrain.py``: ``criterion(discriminator(mask_prob), is_real=True)``),
        over the rows ``weight [B]`` marks; float32, as there (outside the autocast)."""
        with torch.autocast(mask_prob.device.type, enabled=False):
            scores = self.discriminator(mask_prob.float().view(-1, 1, self.grid, self.grid))
        return lsgan_loss(scores, real=True, weight=weight)

    def forward(
        self, images: torch.Tensor, head_maps: torch.Tensor, has_map: torch.Tensor
    ) -> AutoMAEOutput:
        """``images [B,3,S,S]``, ``head_maps [B,H,g,g]``, ``has_map [B]`` bool (rows without a
        map are masked at random) → :class:`AutoMAEOutput` (``models_mae.py`` ``forward``)."""
        prob = self.mask_probability(head_maps)  # [B, N]
        plan, noise = learned_mask_plan(prob, has_map, self.mask_ratio, self.mask_factor)
        tokens = carry_gradient(self._tokens(images), noise)  # [B, N, D]
        latent = self._encode(gather_tokens(tokens, plan.visible_idx))  # [B, 1+V, D]
        pred = self.forward_decoder(latent, plan.visible_idx, plan.mask_idx)  # [B, M, p*p*3]
        loss = self.forward_loss(images, pred, plan.mask_idx)
        return AutoMAEOutput(loss, pred, prob, plan)


def generator_heads(name: str, heads: int | None = None) -> int:
    """The generator's input channels: ``heads``, else the encoder's own head count (the
    official teacher, MAE-B, has as many heads as the MAE-B it trains)."""
    if heads is not None:
        return int(heads)
    spec, _ = model_spec(name, 224, 16)  # any valid sizes: only the head count is read
    return spec.num_heads


def build_automae(
    name: str = "mae-base",
    image_size: int = 224,
    patch_size: int = 16,
    norm_pix_loss: bool = False,
    mask_ratio: float = MASK_RATIO,
    mask_factor: float = MASK_FACTOR,
    loss_g_factor: float = LOSS_G_FACTOR,
    heads: int | None = None,
    map_source: str = "store",
    teacher: str | None = None,
    teacher_weights: str | None = None,
) -> AutoMAE:
    """An AutoMAE on a named MAE size (``models.MODELS``: ``mae-*``).

    ``heads``: the teacher's heads (the generator's input; default: the encoder's).
    ``map_source``: ``"store"`` (the loader's ``head_maps``) or ``"online"`` (``teacher``, a
    salient checkpoint or ``timm:NAME`` with ``teacher_weights``, recomputes them on every
    batch; loaded by :class:`AutoMAEHooks`). Raises :class:`ModelError` for a SimMIM size, a
    ratio that masks or keeps nothing, negative factors, an unknown source or an online
    source without a teacher.
    """
    spec, encoder_kwargs = model_spec(name, image_size, patch_size)
    n = encoder_kwargs["img_size"] // encoder_kwargs["patch_size"]
    _check_settings(spec.kind, n * n, mask_ratio, mask_factor, loss_g_factor, heads)
    if map_source not in MAP_SOURCES:
        raise ModelError(f"unknown map source {map_source!r}; use one of {MAP_SOURCES}")
    if map_source == "online" and not teacher:
        raise ModelError("the online map source needs a teacher (a checkpoint or timm:NAME)")
    return AutoMAE(
        name,
        encoder_kwargs,
        spec.decoder_dim,
        spec.decoder_depth,
        spec.decoder_heads,
        norm_pix_loss=norm_pix_loss,
        mask_ratio=mask_ratio,
        mask_factor=mask_factor,
        loss_g_factor=loss_g_factor,
        heads=generator_heads(name, heads),
        map_source=map_source,
        teacher=teacher,
        teacher_weights=teacher_weights,
    )


def _check_settings(kind, n, mask_ratio, mask_factor, loss_g_factor, heads) -> None:
    if kind != "mae":
        raise ModelError("AutoMAE trains an MAE (its decoder reconstructs); use an mae-* model")
    keep = int(n * (1 - mask_ratio))
    if not 0 < keep < n:
        raise ModelError(
            f"mask ratio {mask_ratio} keeps {keep} of {n} patches; AutoMAE needs some kept "
            "and some masked (its paper: 0.75)"
        )
    AutoMAESettings(mask_factor, loss_g_factor, heads)  # their types and ranges, declared there


# ---------------------------------------------------------------- the family


def automae_forward(
    model: nn.Module, batch: dict, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's generator and MAE loss: ``L_rec + loss_g_factor · L_adv``
    (``engine_pretrain.py``: ``loss = loss + args.loss_g_factor * loss_g``), with the
    discriminator frozen; ``loss_rec`` and ``loss_g`` as the step's scalars."""
    images = batch["images"].to(device, non_blocking=True)
    head_maps = _head_maps(batch).to(device, non_blocking=True)
    has_map = torch.as_tensor(batch["has_saliency"]).to(device, non_blocking=True)
    out = model(images, head_maps, has_map)  # the DDP forward: generator, masks, reconstruction
    base = unwrap_model(model)
    loss_g = base.adversarial_loss(out.mask_prob, has_map.float())
    loss = out.loss + base.loss_g_factor * loss_g
    return loss, {"loss_rec": out.loss.detach(), "loss_g": loss_g.detach()}


def _head_maps(batch: dict) -> torch.Tensor:
    if "head_maps" not in batch:
        raise ModelError(
            "the batch carries no head_maps; the store source needs a loader with head_maps=H "
            "(automae_loader_fields), the online source runs its hooks' side step first"
        )
    return batch["head_maps"]


def automae_settings(run: Any) -> dict:
    """:func:`build_automae`'s keywords from a run's settings (a ``TrainConfig``, or a
    checkpoint's config as attributes: ``Family.settings``). The teacher of the online source
    is ``map_teacher`` / ``map_teacher_weights``; ``generator_heads`` unset: the encoder's."""
    return {
        "name": run.model,
        "image_size": run.image_size,
        "patch_size": run.patch_size,
        "norm_pix_loss": getattr(run, "norm_pix_loss", False),
        "mask_ratio": getattr(run, "mask_ratio", MASK_RATIO),
        "mask_factor": getattr(run, "mask_factor", MASK_FACTOR),
        "loss_g_factor": getattr(run, "loss_g_factor", LOSS_G_FACTOR),
        "heads": getattr(run, "generator_heads", None),
        "map_source": getattr(run, "map_source", "store"),
        "teacher": getattr(run, "map_teacher", None),
        "teacher_weights": getattr(run, "map_teacher_weights", None),
    }


def automae_loader_fields(settings: Mapping[str, Any]) -> dict:
    """What an AutoMAE's batches need of the loader: the per-head maps of a ``heads``
    generation with the store source (``{"head_maps": H}``), nothing with the online one.
    ``settings``: :func:`build_automae`'s keyword arguments."""
    if settings.get("map_source", "store") != "store":
        return {}
    return {"head_maps": generator_heads(settings.get("name", "mae-base"), settings.get("heads"))}


@contextmanager
def _trainable(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters require gradients inside the block, and are frozen after."""
    module.requires_grad_(True)
    try:
        yield
    finally:
        module.requires_grad_(False)


def _distributed(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in its own DDP when a process group of more than one rank runs (the
    official code wraps its discriminator in DDP), else as it is."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return module
    with _trainable(module):  # DDP registers the parameters that require gradients
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )


class AutoMAEHooks(StepHooks):
    """The discriminator's training and, with the online source, the teacher's maps.

    Per batch, before the model's forward (``engine_pretrain.train_one_epoch``): the
    generator's probabilities without gradient and as many pseudo-masks; the LSGAN loss of
    real and fake; its gradient accumulated under DDP's ``no_sync`` until the batch that
    ends a step, where Adam steps (gradients averaged over the step's batches, as the
    official ``loss_d /= accum_iter``). The discriminator's lr follows the model's schedule
    (``adjust_learning_rate(optimizer_d, …)``). Its weights live in the model's state dict,
    its optimiser's state in :meth:`state_dict` (the checkpoint's ``"hooks"``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.base: AutoMAE = unwrap_model(model)
        self.device = next(self.base.parameters()).device
        self.optimizer_d = torch.optim.Adam(  # main_pretrain.py: Adam, no weight decay
            self.base.discriminator.parameters(), lr=optimizer.param_groups[0]["lr"], betas=D_BETAS
        )
        self.discriminator = _distributed(self.base.discriminator, self.device)
        self.teacher = self._online_teacher() if self.base.map_source == "online" else None
        self._batches = 0  # batches of the current step

    def _online_teacher(self) -> Teacher:
        size = self.base.encoder_kwargs["img_size"]
        teacher = load_teacher(
            self.base.teacher, self.base.teacher_weights, image_size=size, device=self.device
        )
        heads = teacher.model.blocks[-1].attn.num_heads
        if teacher.grid != self.base.grid or heads != self.base.generator.heads:
            raise ModelError(
                f"teacher {self.base.teacher} gives {heads} heads on a {teacher.grid}² grid; "
                f"the generator needs {self.base.generator.heads} on {self.base.grid}²: "
                "match --patch-size and heads to the teacher"
            )
        return teacher

    def online_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's per-head CLS attention of the augmented images ``[B, H, g, g]``
        (``engine_pretrain.py``: ``scorer.get_last_selfattention(samples)[:, :, 0, 1:]``):
        raw softmax rows of its last block, on the loader's normalised images."""
        maps = saliency(self.teacher.model, teacher_input(images, self.teacher), kind="heads")
        return maps.clone()  # out of inference mode: the generator saves it for backward

    def before_step(self, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        for group in self.optimizer_d.param_groups:  # engine_pretrain.py: the same schedule
            group["lr"] = optimizer.param_groups[0]["lr"]
        self.optimizer_d.zero_grad(set_to_none=True)  # a partial step's gradients are dropped
        self._batches = 0

    def side_step(self, batch: dict, sync: bool, progress: Progress) -> dict[str, float]:
        if self.teacher is not None:  # the paper's way: the teacher on every augmented batch
            batch["head_maps"] = self.online_maps(batch["images"].to(self.device))
            batch["has_saliency"] = torch.ones(len(batch["head_maps"]), dtype=torch.bool)
        head_maps = _head_maps(batch).to(self.device, non_blocking=True)
        has_map = torch.as_tensor(batch["has_saliency"]).to(self.device).float()
        grid = self.base.grid
        with torch.no_grad():  # engine_pretrain.py: mask_prob_d = model(attn_map, mode='mask')
            fake = self.base.mask_probability(head_maps).view(-1, 1, grid, grid)
        real = pseudo_masks(len(fake), grid, self.device)
        with _trainable(self.base.discriminator), sync_if(self.discriminator, sync):
            loss_real = lsgan_loss(self.discriminator(real), real=True)
            loss_fake = lsgan_loss(self.discriminator(fake), real=False, weight=has_map)
            (loss_real + loss_fake).backward()
        self._batches += 1
        if sync:
            self._step_discriminator()
        return {"loss_d_real": loss_real.item(), "loss_d_fake": loss_fake.item()}

    def _step_discriminator(self) -> None:
        for param in self.base.discriminator.parameters():
            if param.grad is not None:
                param.grad.div_(self._batches)
        self.optimizer_d.step()
        self.optimizer_d.zero_grad(set_to_none=True)
        self._batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_d": self.optimizer_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_d.load_state_dict(state["optimizer_d"])


def teacher_input(images: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """The loader's images (ImageNet mean / std, as timm's defaults) in the teacher's own
    normalisation, when it has another."""
    ours = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if (tuple(teacher.mean), tuple(teacher.std)) == ours:
        return images
    mean, std, t_mean, t_std = (
        torch.tensor(v, device=images.device).view(1, 3, 1, 1)
        for v in (*ours, teacher.mean, teacher.std)
    )
    return (images * std + mean - t_mean) / t_std
