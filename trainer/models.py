"""MAE and SimMIM with thrown tokens: the models the trainer pretrains.

Both take ``images [B,3,H,W]`` and a mask plan (``salient.pipeline.masking.MaskPlan``, or
anything with ``visible_idx [B,V]`` and ``mask_idx [B,M]`` int64 attributes). Thrown patches
(AMT, the ``throw_idx`` of the plan) are in neither index set, so the models never read them:
they are not encoded, not decoded and carry no loss.

The encoder **is** a timm ``VisionTransformer`` (class token, no head) stored as
``model.encoder``; ``model.encoder_kwargs`` rebuilds it, so every trainer checkpoint is a
teacher for the next refresh (docs/ARCHITECTURE.md, "Trainer"). Position embeddings are fixed 2-D
sin-cos, as in MAE (He et al. 2022, and AMT's "absolute position embedding is used in all
experiments"), for the decoder too; the class token's position is zero. They are frozen
``pos_embed`` parameters of the timm encoder, so a plain ``VisionTransformer`` loads them.

Stage names follow MAE's code: ``patchify``, ``forward_encoder``, ``forward_decoder``,
``forward_loss``; ``forward`` returns ``(loss, pred)`` with ``pred [B,M,p*p*3]`` the
predicted pixels of the masked patches in ``mask_idx`` order.

GPA's second loss (GPA Sec. 3.3, eq. 7–8, "GPA as a feature"): with ``gpa_loss_weight > 0``
the MAE decoder also predicts each masked patch's GPA value (one more linear output on the
decoder's last features), regressed with MSE on the masked patches of the samples that have
a target; ``loss = L_RGB + weight · L_GPA`` (eq. 8: weight 1). GPA's code runs a second
decoder stack for it; one extra output of the shared decoder is our choice (README,
"Decisions"). With weight 0 no head is built and the loss is the plain one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import nn

from salient.trainer.specs import MODELS, ModelError, ModelSpec

if TYPE_CHECKING:
    from salient.pipeline.masking import MaskPlan

__all__ = [
    "MAE",
    "SimMIM",
    "build_model",
    "encoder_kwargs_for",
    "gather_tokens",
    "model_spec",
    "sincos_pos_embed",
]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample: ``x [B|1, N, D]``, ``idx [B, K]`` -> ``[B, K, D]``."""
    x = x.expand(idx.shape[0], -1, -1)  # a shared [1, N, D] table (pos embed) is not copied
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table with a zero row for the class token: ``[1, 1+G*G, dim]``.

    MAE's ``get_2d_sincos_pos_embed(..., cls_token=True)``, built with timm's implementation.
    """
    table = build_sincos2d_pos_embed([grid, grid], dim=dim)  # [G*G, dim], row-major like patchify
    return torch.cat([table.new_zeros(1, dim), table]).unsqueeze(0)


def _vit_encoder(encoder_kwargs: dict[str, Any]) -> VisionTransformer:
    """The timm ViT encoder with its position table replaced by fixed sin-cos (MAE)."""
    encoder = VisionTransformer(**encoder_kwargs)
    grid = encoder.patch_embed.grid_size[0]
    encoder.pos_embed.data.copy_(sincos_pos_embed(grid, encoder.embed_dim))
    encoder.pos_embed.requires_grad_(False)
    return encoder


class _MaskedImageModel(nn.Module):
    """What MAE and SimMIM share: the timm encoder, its self-description, ``patchify``.

    Subclasses set ``decoder_kwargs`` (a dict of plain values) describing their decoder.
    """

    def __init__(self, name: str, encoder_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.encoder_kwargs = dict(encoder_kwargs)
        self.encoder = _vit_encoder(self.encoder_kwargs)
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.num_patches = self.encoder.patch_embed.num_patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, N, p*p*3]`` in the encoder's (row-major) patch order."""
        p = self.patch_size
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus position of every patch: ``[B, N, D]``."""
        return self.encoder.patch_embed(images) + self.encoder.pos_embed[:, 1:]

    def _embed(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus position for the patches in ``idx [B, K]`` -> ``[B, K, D]``."""
        return gather_tokens(self._tokens(images), idx)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend CLS (+ its position) and run the timm blocks and final norm."""
        cls = self.encoder.cls_token + self.encoder.pos_embed[:, :1]  # [1, 1, D]
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.encoder.norm(self.encoder.blocks(x))

    def _masked_target(self, images: torch.Tensor, mask_idx: torch.Tensor) -> torch.Tensor:
        """Pixels of the masked patches ``[B, M, p*p*3]``; refuses a plan with nothing masked."""
        if mask_idx.shape[1] == 0:
            raise ModelError("the mask plan masks no patch, so there is no loss; raise mask_ratio")
        return gather_tokens(self.patchify(images), mask_idx)


class MAE(_MaskedImageModel):
    """Masked autoencoder (He et al. 2022) with AMT's thrown tokens.

    Encoder: CLS + visible tokens only (sequence ``1+V``). Decoder (timm ``Block``s): the
    encoded visible tokens plus a shared mask token at the masked positions only (sequence
    ``1+V+M``, thrown positions absent: AMT). Loss: MSE on the masked patches, per-patch
    normalised pixels when ``norm_pix_loss`` (the setting of MAE's best results).
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
        gpa_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(name, encoder_kwargs)
        self.norm_pix_loss = norm_pix_loss
        self.gpa_loss_weight = float(gpa_loss_weight)
        self.decoder_kwargs = {  # recorded in checkpoints, compared on resume
            "kind": "mae",
            "embed_dim": decoder_dim,
            "depth": decoder_depth,
            "num_heads": decoder_heads,
            "mlp_ratio": mlp_ratio,
        }
        grid = self.encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(self.encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(grid, decoder_dim), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self._init_decoder()
        self.decoder_gpa_pred = None
        if self.gpa_loss_weight > 0:  # built last: the other weights equal a plain MAE's
            self.decoder_gpa_pred = nn.Linear(decoder_dim, 1)
            init_weights_vit_timm(self.decoder_gpa_pred)
            self.decoder_kwargs["gpa_head"] = True

    def _init_decoder(self) -> None:
        # MAE: mask token ~ N(0, 0.02); linear layers as timm initialises its ViT blocks.
        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            part.apply(init_weights_vit_timm)

    def forward_encoder(self, images: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """``images [B,3,H,W]``, ``visible_idx [B,V]`` -> latent ``[B, 1+V, D]`` (CLS first)."""
        return self._encode(self._embed(images, visible_idx))

    def forward_decoder(
        self, latent: torch.Tensor, visible_idx: torch.Tensor, mask_idx: torch.Tensor
    ) -> torch.Tensor:
        """Latent ``[B,1+V,D]`` -> predicted pixels of the masked patches ``[B, M, p*p*3]``."""
        return self.decoder_pred(self._decode(latent, visible_idx, mask_idx))

    def _decode(
        self, latent: torch.Tensor, visible_idx: torch.Tensor, mask_idx: torch.Tensor
    ) -> torch.Tensor:
        """The decoder's normalised features at the masked positions ``[B, M, Dd]``."""
        x = self.decoder_embed(latent)  # [B, 1+V, Dd]
        pos = self.decoder_pos_embed
        cls = x[:, :1] + pos[:, :1]  # [B, 1, Dd]
        visible = x[:, 1:] + gather_tokens(pos[:, 1:], visible_idx)  # [B, V, Dd]
        masked = self.mask_token + gather_tokens(pos[:, 1:], mask_idx)  # [B, M, Dd]
        x = self.decoder_blocks(torch.cat([cls, visible, masked], dim=1))  # [B, 1+V+M, Dd]
        return self.decoder_norm(x[:, 1 + visible_idx.shape[1] :])

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask_idx: torch.Tensor
    ) -> torch.Tensor:
        """MSE between ``pred [B,M,p*p*3]`` and the masked patches of ``images``: a scalar."""
        target = self._masked_target(images, mask_idx)  # [B, M, p*p*3]
        if self.norm_pix_loss:  # MAE: normalise each target patch by its own mean / variance
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return (pred.float() - target).pow(2).mean()

    def forward_gpa_loss(
        self,
        features: torch.Tensor,
        mask_idx: torch.Tensor,
        gpa_target: torch.Tensor | None,
        gpa_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """GPA eq. 7: MSE between the predicted and the target GPA of the masked patches, over
        the samples with a target (``gpa_valid [B]``); ``gpa_target [B, N]`` per patch. No
        target (the warmup epochs): zero, with the head still in the graph (DDP needs every
        parameter to get a gradient)."""
        pred = self.decoder_gpa_pred(features).squeeze(-1).float()  # [B, M]
        if gpa_target is None:
            return pred.sum() * 0.0
        target = gpa_target.float().gather(1, mask_idx)  # [B, M]
        valid = torch.ones_like(target[:, :1]) if gpa_valid is None else gpa_valid[:, None]
        error = torch.where(valid.bool(), (pred - target).pow(2), 0.0)  # [B, M]
        return error.sum() / (valid.sum() * mask_idx.shape[1]).clamp_min(1)

    def forward(
        self,
        images: torch.Tensor,
        plan: MaskPlan,
        gpa_target: torch.Tensor | None = None,
        gpa_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.forward_encoder(images, plan.visible_idx)
        features = self._decode(latent, plan.visible_idx, plan.mask_idx)  # [B, M, Dd]
        pred = self.decoder_pred(features)
        loss = self.forward_loss(images, pred, plan.mask_idx)
        if self.decoder_gpa_pred is not None:  # GPA eq. 8: L_RGB + weight · L_GPA
            gpa = self.forward_gpa_loss(features, plan.mask_idx, gpa_target, gpa_valid)
            loss = loss + self.gpa_loss_weight * gpa
        return loss, pred


class SimMIM(_MaskedImageModel):
    """SimMIM (Xie et al. 2022) with AMT's thrown tokens.

    Encoder: CLS + visible tokens + a learned mask token at each masked position (sequence
    ``1+V+M = 1+N-T``; thrown positions removed: AMT). A linear head maps each masked token to
    its patch's pixels; loss: L1 on the masked patches.
    """

    def __init__(self, name: str, encoder_kwargs: dict[str, Any]) -> None:
        super().__init__(name, encoder_kwargs)
        self.decoder_kwargs = {"kind": "simmim", "head": "linear"}
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, self.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        init_weights_vit_timm(self.head)

    def forward_encoder(
        self, images: torch.Tensor, visible_idx: torch.Tensor, mask_idx: torch.Tensor
    ) -> torch.Tensor:
        """-> latent ``[B, 1+V+M, D]``: CLS, the visible tokens, then the masked positions."""
        pos = self.encoder.pos_embed[:, 1:]  # [1, N, D]
        visible = self._embed(images, visible_idx)  # [B, V, D]
        masked = self.mask_token + gather_tokens(pos, mask_idx)  # [B, M, D]
        return self._encode(torch.cat([visible, masked], dim=1))

    def forward_decoder(self, latent: torch.Tensor, num_masked: int) -> torch.Tensor:
        """The linear head over the last ``num_masked`` tokens -> ``[B, M, p*p*3]``."""
        return self.head(latent[:, latent.shape[1] - num_masked :])

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask_idx: torch.Tensor
    ) -> torch.Tensor:
        """L1 between ``pred [B,M,p*p*3]`` and the masked patches of ``images``: a scalar."""
        return (pred.float() - self._masked_target(images, mask_idx)).abs().mean()

    def forward(
        self, images: torch.Tensor, plan: MaskPlan, **unused
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``unused``: targets of MAE-only losses (GPA's), ignored here."""
        latent = self.forward_encoder(images, plan.visible_idx, plan.mask_idx)
        pred = self.forward_decoder(latent, plan.mask_idx.shape[1])
        loss = self.forward_loss(images, pred, plan.mask_idx)
        return loss, pred


# ---- registry and factory --------------------------------------------------------------------


def encoder_kwargs_for(spec: ModelSpec, image_size: int, patch_size: int) -> dict[str, Any]:
    """The timm ``VisionTransformer`` keyword arguments of a spec (plain values only)."""
    return {
        "img_size": image_size,
        "patch_size": patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
        "num_classes": 0,
    }


def model_spec(name: str, image_size: int, patch_size: int) -> tuple[ModelSpec, dict[str, Any]]:
    """A named size (``MODELS``) and its encoder's keyword arguments at this image / patch size.

    Raises :class:`ModelError` for an unknown name or an image size that is not a multiple of
    the patch size.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    if patch_size <= 0 or image_size < patch_size or image_size % patch_size:
        raise ModelError(
            f"image size {image_size} is not a multiple of patch size {patch_size}; change one"
        )
    spec = MODELS[name]
    return spec, encoder_kwargs_for(spec, image_size, patch_size)


def build_model(
    name: str,
    image_size: int = 224,
    patch_size: int = 16,
    norm_pix_loss: bool = False,
    gpa_loss_weight: float = 0.0,
) -> MAE | SimMIM:
    """Build a named model (``MODELS``): ``mae-tiny`` … ``simmim-base``, ``*-micro`` for tests.

    ``gpa_loss_weight > 0`` adds GPA's second loss to an MAE (GPA eq. 7–8).
    Raises :class:`ModelError` for an unknown name, an image size that is not a multiple of
    the patch size, or ``norm_pix_loss`` / ``gpa_loss_weight`` on SimMIM.
    """
    spec, encoder_kwargs = model_spec(name, image_size, patch_size)
    if spec.kind == "simmim":
        if norm_pix_loss:
            raise ModelError("norm_pix_loss is an MAE option; SimMIM regresses raw pixels (L1)")
        if gpa_loss_weight:
            raise ModelError("GPA's target loss needs MAE's decoder (GPA Sec. 3.3); use mae-*")
        return SimMIM(name, encoder_kwargs)
    return MAE(
        name,
        encoder_kwargs,
        spec.decoder_dim,
        spec.decoder_depth,
        spec.decoder_heads,
        norm_pix_loss=norm_pix_loss,
        gpa_loss_weight=gpa_loss_weight,
    )
