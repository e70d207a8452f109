"""iBOT (Zhou et al. 2022): a student ViT and its EMA teacher, distilled on [CLS] and patches.

The family ``"ibot"`` of ``salient.trainer.family`` (docs/ARCHITECTURE.md, "Trainer families",
iBOT). Written after iBOT's and AttMask's official code (``main_ibot.py``, ``main_attmask.py``,
``models/head.py``, ``models/vision_transformer.py``, ``utils.py``), which the comments cite:

- **Student**: a timm ``VisionTransformer`` (drop path 0.1) whose masked patch embeddings are
  replaced by a learned mask token before the CLS token and the position embeddings are
  added; every token is kept (iBOT's ``mask_model``). Local crops (96 px at 224) read the
  position table resampled to their grid. **Teacher**: an EMA copy of the student's backbone
  and head (timm's ``ModelEmaV3``), never trained, always in eval mode. ``encoder`` is the
  teacher's backbone: what checkpoints, eval, export and refresh read (AttMask evaluates the
  teacher: ``--checkpoint_key teacher``); the student stays in the state dict.
- **Head** (:class:`IBOTHead`): iBOT's MLP with a bottleneck and a weight-normalised last
  layer, shared by the [CLS] and the patch tokens.
- **Loss** (``salient.trainer.ibot_loss``): λ1·[CLS] distillation + λ2·masked patch
  distillation, teacher centring and temperature warm-up.
- **Masks**: from the batch (``masks [G, B, N]``: the loader's block / random masks, or
  AttMask's planned from stored maps), or, when the batch has none, planned inside the step
  from the teacher's last-block [CLS] attention over each unmasked global view, heads
  averaged, read in the same forward that feeds the loss (AttMask ``main_attmask.py``).
- **Step hooks**, the batch's forward, per-parameter clipping and the loader's fields:
  ``salient.trainer.ibot_step``.

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from salient.pipeline.masking import NEEDS_SALIENCY, check_options, plan_mask_flags
from salient.trainer.ibot_loss import (
    Centers,
    cls_distillation,
    masked_patch_distillation,
    student_log_probs,
    teacher_targets,
    teacher_temperature,
)
from salient.trainer.models import encoder_kwargs_for
from salient.trainer.specs import ENCODER_SIZES, IBOT_MODELS, IBOTSettings, ModelError, ModelSpec
from salient.trainer.teacher import cls_attention

__all__ = ["IBOT", "IBOTHead", "build_ibot"]

# Head sizes: iBOT models/head.py DINOHead defaults (nlayers=3, hidden_dim=2048,
# bottleneck_dim=256) and --out_dim 8192 (main_ibot.py default; AttMask's README commands).
# "micro" is for tests only.
_HEADS = {"micro": (3, 64, 16, 64)}  # nlayers, hidden, bottleneck, out_dim
_HEAD = (3, 2048, 256, 8192)


class IBOTHead(nn.Module):
    """iBOT's head (``models/head.py`` ``iBOTHead`` with ``shared_head``, i.e. ``DINOHead``):
    ``nlayers`` linear layers with GELU down to a bottleneck, L2-normalised, then a
    weight-normalised linear layer without bias to ``out_dim``; its norm ``g`` is fixed at 1
    with ``norm_last_layer``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], bottleneck_dim))
        self.mlp.apply(init_weights_vit_timm)  # DINOHead._init_weights: trunc normal .02, bias 0
        # Built after the init, as DINOHead does: torch's default Linear init for v.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0  # g [out_dim, 1]
        norm.data.fill_(1.0)
        norm.requires_grad_(not norm_last_layer)

    def project(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., bottleneck]``: the MLP's output, L2-normalised."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., out_dim]``."""
        return self.last_layer(self.project(x))


def _tokens(
    vit: VisionTransformer, images: Tensor, flags: Tensor | None = None, token: Tensor | None = None
) -> Tensor:
    """``images [B,3,H,W]`` -> the tokens entering the blocks, ``[B, 1+N, D]``: the patch
    embeddings (those where ``flags [B, N]`` is True replaced by ``token``: iBOT's
    ``mask_model``, before CLS and position are added), the CLS token, and the position table,
    resampled bicubic to another grid (DINO's ``interpolate_pos_encoding``: no antialiasing)."""
    x = vit.patch_embed(images)  # [B, N, D]
    if flags is not None:
        x = torch.where(flags.unsqueeze(-1), token.to(x.dtype), x)
    patch = vit.patch_embed.patch_size[0]
    grid = [images.shape[-2] // patch, images.shape[-1] // patch]
    pos = vit.pos_embed
    if grid != list(vit.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, grid, num_prefix_tokens=1, antialias=False)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + pos
    return vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))


class IBOT(nn.Module):
    """iBOT's student, EMA teacher, mask token, head and centres (module docstring).

    ``forward(global_images [G,B,3,S,S], local_images [L,B,3,s,s] | None, masks [G,B,N] |
    None, mask_seed)`` returns ``(loss, {"loss_cls", "loss_patch", "masked"})``.
    """

    def __init__(
        self,
        name: str,
        encoder_kwargs: dict[str, Any],
        head: tuple[int, int, int, int],
        settings: IBOTSettings,
    ) -> None:
        super().__init__()
        nlayers, hidden, bottleneck, out_dim = head
        self.name, self.settings = name, settings
        self.encoder_kwargs = dict(encoder_kwargs)
        self.decoder_kwargs = {  # the head and the student's drop path, compared on resume
            "kind": "ibot",
            "out_dim": out_dim,
            "hidden_dim": hidden,
            "bottleneck_dim": bottleneck,
            "nlayers": nlayers,
            "shared_head": True,  # AttMask / iBOT README ViT-S: --shared_head True
            "norm_last_layer": settings.norm_last_layer,
            "drop_path": settings.drop_path,
        }
        backbone = VisionTransformer(**{**encoder_kwargs, "drop_path_rate": settings.drop_path})
        trunc_normal_(backbone.cls_token, std=0.02)  # iBOT's VisionTransformer init
        backbone.patch_embed.strict_img_size = False  # local crops: smaller images, same patches
        dim = backbone.embed_dim
        head_module = IBOTHead(dim, out_dim, hidden, bottleneck, nlayers, settings.norm_last_layer)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head_module})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # iBOT: masked_embed, zeros
        # main_ibot.py: "teacher and student start with the same weights", no gradients
        self.teacher = ModelEmaV3(self.student, decay=settings.momentum_teacher)
        self.teacher.requires_grad_(False)
        self.centers = Centers(out_dim, settings.center_momentum, settings.center_momentum)
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.num_patches = backbone.patch_embed.num_patches
        self.set_epoch(0)

    @property
    def encoder(self) -> VisionTransformer:
        """The EMA teacher's backbone: what eval, export and refresh read."""
        return self.teacher.module["backbone"]

    def train(self, mode: bool = True) -> IBOT:
        """The student trains; the teacher stays in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        """The teacher's [CLS] and patch temperatures of ``epoch`` (iBOT: indexed by epoch)."""
        s = self.settings
        self.temperatures = (
            teacher_temperature(
                epoch, s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_temp_epochs
            ),
            teacher_temperature(
                epoch,
                s.warmup_teacher_patch_temp,
                s.teacher_patch_temp,
                s.warmup_teacher_temp_epochs,
            ),
        )

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, every weight (iBOT's EMA update)."""
        self.teacher.decay = momentum
        self.teacher.update(self.student)

    # ------------------------------------------------------------ forward

    def forward(
        self,
        global_images: Tensor,
        local_images: Tensor | None = None,
        masks: Tensor | None = None,
        mask_seed: int = 0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        views = global_images.shape[0]
        images = global_images.flatten(0, 1)  # [G·B, 3, S, S] view-major, as iBOT concatenates
        online = masks is None and self.settings.strategy in NEEDS_SALIENCY
        with torch.no_grad():
            teacher_tokens, attention = self.forward_teacher(images, online)
        if masks is None:
            flags = self.plan_masks(attention, images, mask_seed)  # [G·B, N]
        else:
            flags = masks.flatten(0, 1)  # [G, B, N] -> [G·B, N]
        student = self.forward_student(images, flags)  # [G·B, 1+N, D]
        cls = [student[:, 0]]
        if local_images is not None and local_images.shape[0]:
            cls.append(self.forward_student(local_images.flatten(0, 1))[:, 0])  # [L·B, D]
        return self.forward_loss(teacher_tokens, student, torch.cat(cls), flags, views)

    def forward_student(self, images: Tensor, flags: Tensor | None = None) -> Tensor:
        """The student's tokens after the final norm, ``[B, 1+N, D]``; masked where ``flags``."""
        vit = self.student["backbone"]
        x = _tokens(vit, images, flags, self.mask_token)
        return vit.norm(vit.blocks(x))

    def forward_teacher(self, images: Tensor, read_attention: bool) -> tuple[Tensor, Tensor | None]:
        """The teacher's tokens ``[B, 1+N, D]`` on unmasked global views, and (when asked) its
        last block's [CLS] attention over the patches, heads averaged, ``[B, N]``, read from
        the same forward (AttMask: ``teacher_attention[:, :, 0, 1:].mean(1)``)."""
        vit = self.encoder
        x = vit.blocks[:-1](_tokens(vit, images))
        attention = cls_attention(vit.blocks[-1], x).mean(1) if read_attention else None
        return vit.norm(vit.blocks[-1](x)), attention

    def plan_masks(self, attention: Tensor | None, images: Tensor, seed: int) -> Tensor:
        """Masks planned in the step, bool ``[G·B, N]``: ``strategy`` on the teacher's
        attention (ones for block / random), one ratio for the batch (AttMask)."""
        s = self.settings
        weights = attention
        if weights is None:
            weights = images.new_ones((len(images), self.num_patches), dtype=torch.float32)
        generator = torch.Generator(device=weights.device).manual_seed(int(seed))
        return plan_mask_flags(
            s.strategy, weights.float(), s.mask_ratio, generator=generator, **s.mask_options()
        )

    def forward_loss(
        self,
        teacher_tokens: Tensor,
        student: Tensor,
        student_cls: Tensor,
        flags: Tensor,
        views: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """iBOT's loss (``salient.trainer.ibot_loss``); updates the centres afterwards."""
        s, rows_total = self.settings, len(flags)
        rows, cols = flags.nonzero(as_tuple=True)  # the R masked tokens
        with torch.no_grad():
            head = self.teacher.module["head"]
            z = head.project(teacher_tokens)  # [G·B, 1+N, d]
            teacher_cls = head.last_layer(z[:, 0])  # [G·B, K]
            teacher_patch = head.last_layer(z[rows, 1 + cols])  # [R, K]
            # The centre's patch mean: the last layer is linear without bias, so the mean of
            # its outputs over all patches (iBOT's teacher_patch.mean(1)) is its output of
            # the mean, without a [G·B, N, K] tensor.
            patch_mean = head.last_layer(z[:, 1:].mean(1))  # [G·B, K]
            tau_cls, tau_patch = self.temperatures
            target_cls = teacher_targets(teacher_cls, self.centers.cls, tau_cls)
            target_patch = teacher_targets(teacher_patch, self.centers.patch, tau_patch)
        out = self.student["head"](torch.cat([student_cls, student[rows, 1 + cols]]))
        out_cls, out_patch = out[: len(student_cls)], out[len(student_cls) :]
        batch = rows_total // views
        loss_cls = cls_distillation(
            target_cls.view(views, batch, -1),
            student_log_probs(out_cls, s.student_temp).view(-1, batch, out.shape[-1]),
        )
        loss_patch = masked_patch_distillation(
            target_patch, student_log_probs(out_patch, s.student_temp), rows, rows_total
        )
        self.centers.update(teacher_cls, patch_mean)  # after the loss, as iBOT
        loss = s.lambda1 * loss_cls + s.lambda2 * loss_patch
        metrics = {"loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach()}
        return loss, {**metrics, "masked": flags.float().mean()}


def build_ibot(
    name: str = "ibot-small", image_size: int = 224, patch_size: int = 16, **settings: Any
) -> IBOT:
    """Build a named iBOT (``ibot-micro`` for tests, ``ibot-tiny|small|base``; ViT-S/16 is
    ``ibot-small``); ``settings`` are :class:`IBOTSettings` fields. Raises ModelError for an
    unknown name or setting, sizes that do not fit; MaskError for mask settings
    ``plan_mask_flags`` refuses (``masking.check_options(flags=True)``)."""
    size = name.removeprefix("ibot-")
    if name not in IBOT_MODELS:
        raise ModelError(f"unknown iBOT model {name!r}; choose one of {', '.join(IBOT_MODELS)}")
    if patch_size <= 0 or image_size < patch_size or image_size % patch_size:
        raise ModelError(
            f"image size {image_size} is not a multiple of patch size {patch_size}; change one"
        )
    try:
        config = IBOTSettings(**settings)
    except TypeError as exc:
        raise ModelError(f"bad iBOT setting: {exc}") from None
    spec = ModelSpec("ibot", *ENCODER_SIZES[size])
    nlayers, hidden, bottleneck, out_dim = _HEADS.get(size, _HEAD)
    head = (nlayers, hidden, bottleneck, config.out_dim or out_dim)
    check_options(  # the mask settings' own checks, once, before any model is built
        config.strategy,
        config.mask_options(),
        (image_size // patch_size) ** 2,
        config.mask_ratio,
        flags=True,
    )
    return IBOT(name, encoder_kwargs_for(spec, image_size, patch_size), head, config)
