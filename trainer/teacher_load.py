"""Teacher loading: a salient training checkpoint's encoder or a timm ViT, from local files.

:func:`load_teacher` rebuilds the model (a checkpoint's ``encoder_kwargs`` or a timm name),
loads the weights strictly through timm's ViT filter and returns it in eval mode as a
:class:`Teacher`, with the metadata a saliency generation records. Nothing is ever downloaded.

A full MAE pretraining checkpoint (the official ``mae_pretrain_vit_base.pth`` layout,
``{"model": {...}}`` with the encoder's keys plus ``decoder_*`` and ``mask_token``) loads as
``timm:vit_base_patch16_224 --weights FILE``: the encoder's keys are taken, strictly, and the
decoder's are left out and named in one log line (GPA and AutoMAE use a frozen pretrained MAE
as their teacher).
The maps themselves are computed in :mod:`salient.trainer.teacher`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from salient.errors import brief
from salient.trainer.checkpoint import read_problem, read_tensors
from salient.trainer.teacher import TeacherError

__all__ = ["Teacher", "load_teacher"]

RANDOM_SEED = 0  # random teachers (allow_random) are initialised from this seed
MAE_DECODER_KEYS = ("decoder_", "mask_token")  # MAE's models_mae.py: not part of the encoder
_log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Teacher:
    """A loaded teacher: the eval-mode ViT, its metadata, and the input it expects."""

    model: VisionTransformer
    meta: dict  # source, path, sha256, name, epoch, image_size, patch_size; kind/block/head/
    # reduce: the caller (trainer.provenance reads it back from a generation)
    patch_size: int
    grid: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_teacher(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    allow_random: bool = False,
    image_size: int = 224,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a teacher from a salient checkpoint path or ``"timm:NAME"`` (+ ``weights`` FILE).

    Checkpoints rebuild ``VisionTransformer(**ckpt["encoder_kwargs"])``; timm weights are a
    ``.safetensors`` or ``.pth`` state dict (read with ``weights_only=True``). Position
    embeddings are resampled to ``image_size`` by timm's own checkpoint filter. Random weights
    (``timm:NAME`` without a file) only with ``allow_random``, seeded. Nothing is downloaded.
    Raises :class:`TeacherError` for a missing/unreadable file, a file that is not a ViT
    checkpoint, an unknown timm name, or an image size not divisible by the patch size.
    """
    spec = os.fspath(spec)
    if spec.startswith("timm:"):
        model, meta = _timm_teacher(spec.removeprefix("timm:"), weights, allow_random, image_size)
    else:
        if weights is not None:
            raise TeacherError("weights= is for timm:NAME teachers; a checkpoint carries its own")
        model, meta = _checkpoint_teacher(spec, image_size)
    return _finish(model, meta, image_size, device)


def _timm_teacher(name, weights, allow_random, image_size) -> tuple[VisionTransformer, dict]:
    if not timm.is_model(name):
        raise TeacherError(f"unknown timm model {name!r}; list ViTs with timm.list_models('vit_*')")
    if weights is None and not allow_random:
        raise TeacherError(
            f"timm:{name} without weights would be a random teacher; pass --weights FILE "
            "(.safetensors or .pth), or --allow-random-teacher for a test run"
        )
    path = None if weights is None else _existing_file(weights, "weights file")
    model = _build(
        lambda: timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size),
        f"timm:{name}",
    )
    meta = {"source": "timm", "path": None, "sha256": "random", "name": name, "epoch": None}
    if path is not None:
        _load_into(model, _read_weights(path), path)
        meta.update(path=str(path), sha256=_sha256(path))
    return model, meta


def _checkpoint_teacher(spec: str, image_size: int) -> tuple[VisionTransformer, dict]:
    if not Path(spec).expanduser().exists() and timm.is_model(spec):
        raise TeacherError(
            f"teacher {spec} is no file but a timm model name; did you mean timm:{spec} "
            "(with --weights FILE, its weights on this machine)?"
        )
    path = _existing_file(spec, "teacher checkpoint")
    try:
        ckpt = read_tensors(path)
    except Exception as e:
        raise TeacherError(f"cannot read teacher checkpoint {path}: {read_problem(e)}") from e
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("encoder_kwargs"), dict)):
        raise TeacherError(
            f"{path} is not a salient training checkpoint (no 'encoder_kwargs' / 'encoder'); "
            "for a timm ViT weights file or a full MAE checkpoint use --teacher timm:NAME "
            "--weights FILE (e.g. timm:vit_base_patch16_224 for MAE's ViT-B/16)"
        )
    kwargs = {**ckpt["encoder_kwargs"], "img_size": image_size}
    model = _build(lambda: VisionTransformer(**kwargs), str(path))
    _load_into(model, ckpt.get("encoder"), path)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    meta = {
        "source": "checkpoint",
        "path": str(path),
        "sha256": _sha256(path),
        "name": config.get("model", path.stem),
        "epoch": ckpt.get("epoch"),
    }
    return model, meta


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise TeacherError(f"{what} {path} does not exist; give the path of a local file")
    return path


def _build(make: Callable[[], nn.Module], source: str) -> VisionTransformer:
    """Build the model from a fixed seed: random teachers reproduce, the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        try:
            model = make()
        except (TypeError, ValueError, AssertionError) as e:
            raise TeacherError(f"cannot build {source} as a timm VisionTransformer: {e}") from e
    if not isinstance(model, VisionTransformer):
        raise TeacherError(f"{source} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def _read_weights(path: Path) -> dict:
    """timm's reader: safetensors, else torch.load(weights_only=True); unwraps 'model' etc."""
    try:
        return read_tensors(str(path), load_state_dict)
    except Exception as e:
        raise TeacherError(f"cannot read weights file {path}: {read_problem(e)}") from e


def _load_into(model: VisionTransformer, state: object, path: Path) -> None:
    """Strict load through timm's ViT filter (resamples pos_embed to this image size)."""
    if not (
        isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())
    ):
        raise TeacherError(f"{path} holds no state dict of tensors; is it a ViT checkpoint?")
    if isinstance(model.head, nn.Identity):  # the teacher needs no classifier
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = _encoder_of_mae(state, path)
    try:
        result = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:  # torch lists every tensor
        raise TeacherError(
            f"{path} does not fit this ViT: {brief(e)}; check the model name or the file"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise TeacherError(
            f"{path} is not a checkpoint of this ViT: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]} (of {len(result.missing_keys)} / "
            f"{len(result.unexpected_keys)}); check the model name or the file"
        )


def _encoder_of_mae(state: dict, path: Path) -> dict:
    """The encoder's keys of a full MAE checkpoint (the others named in a log line)."""
    dropped = sorted(k for k in state if k.startswith(MAE_DECODER_KEYS))
    if not dropped:
        return state
    _log.warning(
        "%s is a full MAE checkpoint: took its encoder, left out %d decoder keys (%s)",
        path,
        len(dropped),
        ", ".join(dropped),
    )
    return {k: v for k, v in state.items() if not k.startswith(MAE_DECODER_KEYS)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finish(model: VisionTransformer, meta: dict, image_size: int, device) -> Teacher:
    patch = model.patch_embed.patch_size[0]
    if image_size <= 0 or image_size % patch or model.patch_embed.patch_size[1] != patch:
        raise TeacherError(
            f"image size {image_size} is not a multiple of the teacher's patch size "
            f"{model.patch_embed.patch_size}; use e.g. {max(1, image_size // patch) * patch}"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {**meta, "kind": None, "block": None, "head": None, "reduce": None}
    meta.update(image_size=image_size, patch_size=patch)
    return Teacher(
        model=model.to(device).eval().requires_grad_(False),
        meta=meta,
        patch_size=patch,
        grid=image_size // patch,
        image_size=image_size,
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
    )
