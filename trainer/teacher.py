"""Teacher saliency: per-image maps from one attention block of a timm ViT.

The teacher sees the whole image resized to S×S (:func:`preprocess`), so map cell (u, v)
covers image region (u·W/G, v·H/G) and crops of image and map stay aligned (docs/ARCHITECTURE.md,
"Saliency maps"). Kinds, all computed in one block ``b`` (default: the last):

- ``cls_attn`` — AMT eq. 3–4: the softmax row of the CLS query over all keys, prefix (CLS and
  register) columns dropped, heads reduced by ``mean`` (eq. 4), ``minmax_mean`` (each head
  min-max normalised, then averaged: AMT's official code) or one chosen head.
- ``gpa`` — GPA eq. 4–5: pre-softmax scaled logits ``q_i·k_m/√d`` summed over the query
  patches ``i ≠ m``; by default the last head (GPA Table 5), ``mean`` over heads available.
- ``heads`` — the per-head ``cls_attn`` maps ``[B, H, G, G]`` (AutoMAE's mask-generator input).

Fast path: timm's own blocks (fused SDPA) run up to ``b``; in ``b`` only ``norm1`` and the q / k
slices of ``attn.qkv`` run, for the rows needed; nothing after ``b`` runs. GPA needs no N×N
matrix: ``Σ_{i≠m} q_i·k_m = (Σ_i q_i − q_m)·k_m``.

Loading (:func:`load_teacher`: a salient training checkpoint's encoder or a timm ViT from a
local weights file; nothing is ever downloaded) lives in :mod:`salient.trainer.teacher_load`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn

from salient.errors import SalientError
from salient.trainer.specs import KINDS, REDUCES

__all__ = [
    "SaliencySpec",
    "TeacherError",
    "cls_attention",
    "preprocess",
    "saliency",
]

# The input of `blk.attn` for each supported timm block: pre-norm Block vs post-norm ResPostBlock.
_ATTN_INPUT: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    Block: lambda blk, x: blk.norm1(x),
    ResPostBlock: lambda blk, x: x,
}


class TeacherError(SalientError):
    """A teacher that cannot be loaded or asked for a map: bad file, spec, size or option."""


# --------------------------------------------------------------------------- what to compute


@dataclass(frozen=True)
class SaliencySpec:
    """Which map to compute: one ``head``, or all heads combined by ``reduce``.

    A ``head`` wins over ``reduce`` (so a CLI's default ``--reduce mean`` does not clash with
    ``--head 3``). Both ``None``: the kind's default, ``cls_attn`` → ``mean`` (AMT eq. 4),
    ``gpa`` → the last head (GPA Table 5). ``heads`` returns every head and ignores ``reduce``.
    Negative ``block`` / ``head`` count from the end.
    """

    kind: str = "cls_attn"
    block: int = -1
    head: int | None = None
    reduce: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TeacherError(f"unknown saliency kind {self.kind!r}; use one of {KINDS}")
        if self.reduce is not None and self.reduce not in REDUCES:
            raise TeacherError(f"unknown reduce {self.reduce!r}; use one of {REDUCES} or a head")
        if self.kind == "heads" and self.head is not None:
            raise TeacherError(f"kind 'heads' returns every head; drop head={self.head}")

    def resolve(self, model: VisionTransformer) -> SaliencySpec:
        """The map computed: absolute block / head indices, the kind's default filled in."""
        depth, num_heads = len(model.blocks), model.blocks[0].attn.num_heads
        block = _index(self.block, depth, "block")
        if self.kind == "heads":
            return SaliencySpec(self.kind, block)
        if self.head is not None:
            return SaliencySpec(self.kind, block, _index(self.head, num_heads, "head"))
        if self.reduce is not None:
            return SaliencySpec(self.kind, block, reduce=self.reduce)
        if self.kind == "gpa":
            return SaliencySpec(self.kind, block, num_heads - 1)  # GPA Table 5: the last head
        return SaliencySpec(self.kind, block, reduce="mean")  # AMT eq. 4

    def as_meta(self) -> dict:
        """The ``kind`` / ``block`` / ``head`` / ``reduce`` entries of the teacher metadata."""
        return {"kind": self.kind, "block": self.block, "head": self.head, "reduce": self.reduce}


def _index(i: int, n: int, what: str) -> int:
    if not -n <= i < n:
        raise TeacherError(
            f"{what} {i} out of range for a model with {n} {what}s; use -{n}..{n - 1}"
        )
    return i % n


# --------------------------------------------------------------------------- saliency maps


def saliency(
    model: VisionTransformer,
    images: Tensor,
    kind: str = "cls_attn",
    block: int = -1,
    head: int | None = None,
    reduce: str | None = None,
) -> Tensor:
    """Maps of normalised ``images [B,3,H,W]`` → ``[B,Gh,Gw]`` float32 (``heads``: ``[B,H,Gh,Gw]``).

    ``model`` is a timm ``VisionTransformer`` in eval mode; ``kind``, ``block``, ``head``,
    ``reduce`` as in :class:`SaliencySpec`. Raises :class:`TeacherError` for a bad option,
    a model it cannot read (training mode, no CLS token for ``cls_attn``, unknown block type)
    or images of the wrong shape.
    """
    _check_model(model)
    spec = SaliencySpec(kind, block, head, reduce).resolve(model)
    if spec.kind in ("cls_attn", "heads") and not model.has_class_token:
        raise TeacherError("this ViT has no CLS token, so no cls_attn map; use kind='gpa'")
    _check_images(model, images)
    with torch.inference_mode():
        x, grid = _embed(model, images)  # [B, T, C], T = prefix + N
        x = model.blocks[: spec.block](x)  # timm's blocks, fused SDPA
        blk = model.blocks[spec.block]
        x = _ATTN_INPUT[type(blk)](blk, x)
        with torch.autocast(x.device.type, enabled=False):  # the read block in fp32
            per_head = _READERS[spec.kind](blk.attn, x.float(), model.num_prefix_tokens)  # [B,H,N]
            maps = _reduce(per_head, spec)  # [B, N] or [B, H, N]
    return maps.unflatten(-1, grid).contiguous()


def cls_attention(block: nn.Module, x: Tensor, num_prefix: int = 1) -> Tensor:
    """The CLS row of ``block``'s attention over the patch keys, per head: ``[B, H, N]`` fp32.

    ``x [B, T, C]`` is the block's input (the tokens before its norm), so a model that runs
    its blocks anyway reads the map from the same forward: only the CLS query and the keys
    of this block are projected again (AMT eq. 3, as :func:`saliency` computes ``cls_attn``).
    ``block`` is a timm ``Block`` or ``ResPostBlock`` with the standard ``Attention``.
    """
    if type(block) not in _ATTN_INPUT or not isinstance(block.attn, Attention):
        raise TeacherError(f"cls_attention reads timm Block / ResPostBlock, not {type(block)}")
    x = _ATTN_INPUT[type(block)](block, x)
    with torch.autocast(x.device.type, enabled=False):  # the read block in fp32
        return _cls_attn_heads(block.attn, x.float(), num_prefix)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TeacherError(f"saliency needs a timm VisionTransformer, got {type(model).__name__}")
    if model.training:
        raise TeacherError("the teacher is in training mode (dropout on); call model.eval() first")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in _ATTN_INPUT or not isinstance(blk.attn, Attention):
            raise TeacherError(
                f"block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}; "
                "saliency reads timm Block / ResPostBlock with the standard Attention only"
            )


def _check_images(model: VisionTransformer, images: Tensor) -> None:
    if not (isinstance(images, Tensor) and images.ndim == 4 and images.is_floating_point()):
        raise TeacherError("images must be a float tensor [B,3,H,W]; run preprocess() first")
    h, w = images.shape[-2:]
    ph, pw = model.patch_embed.patch_size
    if images.shape[1] != 3 or h % ph or w % pw:
        raise TeacherError(
            f"images of shape {tuple(images.shape)}: need 3 channels and H, W divisible by the "
            f"patch size {ph}"
        )
    if not model.dynamic_img_size and (h, w) != tuple(model.patch_embed.img_size):
        raise TeacherError(
            f"images are {h}×{w} but the teacher was built for {model.patch_embed.img_size}; "
            "preprocess to the teacher's image_size"
        )


def _embed(model: VisionTransformer, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """timm's own stem, as in ``forward_features``: tokens ``[B, T, C]`` and the patch grid."""
    x = model.patch_embed(images)  # [B, N, C], or [B, Gh, Gw, C] with dynamic_img_size
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(model.patch_embed.grid_size)
    x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
    return x, grid


def _project(attn: Attention, x: Tensor, part: int) -> Tensor:
    """Only the q (part 0) or k (part 1) slice of ``attn.qkv``, normed as timm does → ``[B,H,T,d]``.

    Slicing the fused weight skips v (and, for ``cls_attn``, every query row but CLS).
    """
    d = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias
    y = F.linear(
        x,
        attn.qkv.weight[part * d : (part + 1) * d].float(),
        None if bias is None else bias[part * d : (part + 1) * d].float(),
    )
    y = y.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)
    return attn.q_norm(y) if part == 0 else attn.k_norm(y)


def _cls_attn_heads(attn: Attention, x: Tensor, num_prefix: int) -> Tensor:
    """AMT eq. 3: softmax(q_cls·kᵀ/√d) over all keys, prefix columns dropped → ``[B, H, N]``."""
    q = _project(attn, x[:, :1], 0) * attn.scale  # [B, H, 1, d]: the CLS query only
    k = _project(attn, x, 1)  # [B, H, T, d]
    return (q @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, num_prefix:]


def _gpa_heads(attn: Attention, x: Tensor, num_prefix: int) -> Tensor:
    """GPA eq. 4–5: Σ_{i≠m} q_i·k_m/√d over patch queries i → ``[B, H, N]``.

    Computed as (Σ_i q_i − q_m)·k_m, so no N×N matrix is formed.
    """
    patches = x[:, num_prefix:]  # [B, N, C]
    q, k = _project(attn, patches, 0), _project(attn, patches, 1)  # [B, H, N, d]
    return ((q.sum(2, keepdim=True) - q) * k).sum(-1) * attn.scale


_READERS = {"cls_attn": _cls_attn_heads, "heads": _cls_attn_heads, "gpa": _gpa_heads}


def _reduce(per_head: Tensor, spec: SaliencySpec) -> Tensor:
    """``[B, H, N]`` → one head, the head mean, or the mean of min-max normalised heads."""
    if spec.kind == "heads":
        return per_head
    if spec.head is not None:
        return per_head[:, spec.head]
    if spec.reduce == "minmax_mean":  # AMT's official code: normalise each head, then average
        low = per_head.amin(-1, keepdim=True)
        span = (per_head.amax(-1, keepdim=True) - low).clamp_min(torch.finfo(per_head.dtype).tiny)
        per_head = (per_head - low) / span
    return per_head.mean(1)


# --------------------------------------------------------------------------- input


def preprocess(
    images: Tensor | Sequence[Tensor],
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Tensor:
    """Whole images → ``[B, 3, S, S]`` float32, normalised, on the images' device.

    ``images``: uint8 (0–255) or float (0–1), ``[B,3,H,W]``, ``[3,H,W]`` or a list of ``[3,H,W]``
    of any sizes. Each image is resized whole to S×S (aspect squashed, antialiased bilinear),
    so the teacher's G×G map covers the image linearly (docs/ARCHITECTURE.md, "Saliency maps").
    Works on CPU and CUDA.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise TeacherError("preprocess got an empty list of images")
        return torch.cat([preprocess(im, image_size, mean, std) for im in images])
    x = images[None] if isinstance(images, Tensor) and images.ndim == 3 else images
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise TeacherError(f"images must be RGB tensors [B,3,H,W] or [3,H,W], got {_shape(images)}")
    # uint8 -> a new float tensor, divided in place: one float copy of a full-size image
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _shape(obj: object) -> str:
    return str(tuple(obj.shape)) if isinstance(obj, Tensor) else type(obj).__name__
