"""Trainer checkpoints: atomic, self-describing, and loadable as a teacher.

A checkpoint is one ``torch.save``d dict of plain values (tensors, dicts, lists, str, int,
float, bool, None), so ``torch.load(path, weights_only=True)`` reads it (docs/INTERFACES.md,
"Trainer checkpoint")::

    {"format": "salient-checkpoint/1", "config": {..., "model": "mae-tiny"},
     "encoder_kwargs": {...}, "encoder": encoder state_dict, "decoder_kwargs": {...},
     "model": full state_dict, "optimizer", "scheduler", "epoch", "step", "generation",
     "hooks": the family's step-hook state (a side optimiser's)}

``encoder_kwargs`` + ``encoder`` rebuild the timm ``VisionTransformer`` without importing the
trainer, so every checkpoint is a teacher for the next refresh. Writes go to
``path + ".partial"`` and are renamed into place (``os.replace``), so a killed writer never
leaves a torn checkpoint under the real name.

:func:`export_encoder` also writes a checkpoint's encoder the way timm shares weights, a folder
``encoder-EEEEE/`` with ``model.safetensors`` and timm's ``config.json`` (architecture, model
arguments, input normalisation), so any of these loads it, every key matched::

    timm.create_model("local-dir:RUN/encoder-00040", pretrained=True)
    timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                      pretrained_cfg_overlay=dict(file="RUN/encoder-00040/model.safetensors"))
    VisionTransformer(**cfg["model_args"]).load_state_dict(safetensors.torch.load_file(...))

:func:`prune_checkpoints` keeps the newest ones (README, Decisions, "Bounded disk").
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salient.errors import SalientError, brief

__all__ = [
    "ARCH_CONFIG_FIELDS",
    "FORMAT",
    "CheckpointError",
    "checkpoint_path",
    "encoder_dir",
    "export_encoder",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_problem",
    "read_tensors",
    "save_checkpoint",
    "timm_architecture",
    "unwrap_model",
]

FORMAT = "salient-checkpoint/1"
ARCH_CONFIG_FIELDS = ("model", "image_size", "patch_size")  # train-config keys fixing the shape
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_KEYS = (
    "format",
    "config",
    "encoder_kwargs",
    "encoder",
    "decoder_kwargs",
    "model",
    "epoch",
    "step",
)


class CheckpointError(SalientError):
    """A checkpoint that is missing, unreadable, or of another architecture than asked."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``DistributedDataParallel`` / ``torch.compile`` wrappers, any order."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """Where the checkpoint written after ``epoch`` lives: ``run_dir/checkpoint-00012.pt``."""
    return Path(run_dir) / f"checkpoint-{epoch:05d}.pt"


def _checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint in ``run_dir``, oldest first (``.partial`` ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((int(m[1]), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest epoch in ``run_dir`` (``.partial`` files ignored), or None."""
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def encoder_dir(checkpoint: str | os.PathLike) -> Path:
    """Where :func:`export_encoder` puts a checkpoint's encoder: ``RUN/encoder-00012/``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem.replace("checkpoint-", "encoder-"))


def prune_checkpoints(
    run_dir: str | os.PathLike, keep: int, protect: Collection[str | os.PathLike] = ()
) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (and their exported encoders) of
    ``run_dir``, sparing ``protect`` (e.g. the teacher of a refresh still running); returns
    the checkpoints removed. ``keep`` 0 keeps everything."""
    if keep <= 0:
        return []
    spared = {Path(p).resolve() for p in protect}
    removed = []
    for _, path in _checkpoints(run_dir)[:-keep]:
        if path.resolve() in spared:
            continue
        shutil.rmtree(encoder_dir(path), ignore_errors=True)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _plain_config(config: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The train config as plain JSON values, with ``model`` set to the model's name."""
    if config.get("model", model_name) != model_name:
        raise CheckpointError(
            f"config says model {config['model']!r} but the model is {model_name!r}; "
            "pass the config the model was built from"
        )
    try:
        plain = json.loads(json.dumps(config))
    except TypeError as exc:
        raise CheckpointError(
            f"checkpoint config must hold plain JSON values ({exc}); convert paths to str"
        ) from exc
    return {**plain, "model": model_name}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    step: int,
    generation: str | None,
    config: dict[str, Any],
    hooks: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (``.partial`` then ``os.replace``); returns ``path``.

    ``hooks`` is what the family's step hooks keep (``StepHooks.state_dict``: a side
    optimiser's state), restored on resume.

    ``model`` may be wrapped in DDP or ``torch.compile``; it must carry ``name``,
    ``encoder_kwargs``, ``decoder_kwargs`` and ``encoder`` (``salient.trainer.models``).
    Call it on one rank only. Raises :class:`CheckpointError` for a config that is not plain
    JSON or names another model.
    """
    base = unwrap_model(model)
    payload = {
        "format": FORMAT,
        "config": _plain_config(config, base.name),
        "encoder_kwargs": dict(base.encoder_kwargs),
        "encoder": base.encoder.state_dict(),  # shares storage with "model": saved once
        "decoder_kwargs": dict(base.decoder_kwargs),
        "model": base.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "generation": generation,
        "hooks": hooks or {},
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # the rename below must not publish bytes still in the page cache
    os.replace(partial, path)
    return path


def _read(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with clear errors for missing / corrupt / foreign files."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path or the run directory")
    try:
        ckpt = read_tensors(path)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, … here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated, or no checkpoint ({read_problem(exc)}); "
            "delete it and resume from an earlier one"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a salient checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete")
    return ckpt


def read_tensors(path: str | os.PathLike, read: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (or ``read(path)``, e.g. timm's
    reader, which calls it), without torch's warnings about the pickle protocol of a file
    that is no checkpoint: the error that follows says what the file is (``read_problem``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        if read is not None:
            return read(path)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_problem(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong with a file, in a few words: never
    torch's paragraph that suggests ``weights_only=False`` (salient loads tensors only)."""
    cause = exc.__cause__  # timm's reader re-raises torch's refusal as its own RuntimeError
    if isinstance(cause, pickle.UnpicklingError):
        exc = cause
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return f"it pickles Python objects ({found.group(1)}), not only tensors"
        if "Unsupported operand" in text:  # the first byte is no pickle opcode
            return "not a file torch.save wrote"
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"no checkpoint of tensors ({brief(reason.group(1) if reason else text, 80)})"
    if isinstance(exc, KeyError | EOFError | pickle.UnpicklingError):
        return f"not a file torch.save wrote: {type(exc).__name__}: {brief(text, 60)}"
    return f"{type(exc).__name__}: {brief(text, 120)}"


def _differences(prefix: str, saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: checkpoint X, now Y`` for every key whose value differs."""
    return [
        f"{prefix}{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key) != current.get(key)
    ]


def _check_architecture(path: Path, ckpt: dict[str, Any], model: nn.Module) -> None:
    """Refuse a model whose name, encoder or decoder differs from the checkpoint's."""
    differ = _differences("", {"model": ckpt["config"].get("model")}, {"model": model.name})
    differ += _differences("encoder_kwargs.", ckpt["encoder_kwargs"], model.encoder_kwargs)
    differ += _differences("decoder_kwargs.", ckpt["decoder_kwargs"], model.decoder_kwargs)
    if differ:
        raise CheckpointError(
            f"checkpoint {path} is another architecture ({'; '.join(differ)}); "
            "resume with the checkpoint's model settings or start a new run directory"
        )


def _check_config(path: Path, ckpt: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a train config whose architecture fields (``ARCH_CONFIG_FIELDS``) differ."""
    saved = ckpt["config"]
    shared = [k for k in ARCH_CONFIG_FIELDS if k in saved and k in config]
    differ = _differences("config.", {k: saved[k] for k in shared}, {k: config[k] for k in shared})
    if differ:
        raise CheckpointError(
            f"cannot resume from {path}: {'; '.join(differ)}; "
            "use the checkpoint's settings or start a new run directory"
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a checkpoint and restore what is given; returns the checkpoint dict (on CPU).

    Raises :class:`CheckpointError` when the file is missing, corrupt or not a salient
    checkpoint, when ``config``'s ``model`` / ``image_size`` / ``patch_size`` differ from the
    saved config, or when ``model`` (DDP-wrapped or not) is another architecture; the
    message names every field that differs. Checks run before anything is restored.
    """
    path = Path(path)
    ckpt = _read(path)
    if config is not None:
        _check_config(path, ckpt, config)
    if model is not None:
        base = unwrap_model(model)
        _check_architecture(path, ckpt, base)
        base.load_state_dict(ckpt["model"])
    if optimizer is not None:
        if ckpt.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state to resume from")
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        if ckpt.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {path} holds no scheduler state to resume from")
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


# ---------------------------------------------------------------- the encoder for timm

# timm's ViT names by width; the patch size, depth and every other argument are overridden by
# ``model_args``, so any width works (the test-only micro model uses ViT-Ti's name).
_TIMM_NAMES = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}


def timm_architecture(encoder_kwargs: dict[str, Any]) -> str:
    """The timm model name an exported encoder is built as (with its ``model_args``)."""
    return _TIMM_NAMES.get(encoder_kwargs.get("embed_dim"), "vit_tiny_patch16_224")


def export_encoder(checkpoint: str | os.PathLike) -> Path:
    """Write the encoder of ``checkpoint`` as timm's local model folder; returns the folder.

    ``model.safetensors`` holds the state dict of timm's ``VisionTransformer`` built from
    ``encoder_kwargs`` (loaded strictly: every key matched), ``config.json`` the architecture,
    model arguments and the input normalisation (ImageNet mean / std, what the trainer feeds).
    Written beside as ``.partial`` and renamed into place.
    """
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import save_for_hf  # timm's own exporter

    path = Path(checkpoint)
    ckpt = _read(path)
    kwargs = dict(ckpt["encoder_kwargs"])
    norm = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    overlay = {**norm, "tag": "salient", "license": None}
    model = timm.create_model(
        timm_architecture(kwargs), pretrained=False, pretrained_cfg_overlay=overlay, **kwargs
    )
    model.load_state_dict(ckpt["encoder"])  # strict: raises on any missing / unexpected key
    out = encoder_dir(path)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_for_hf(model, str(partial), model_args=kwargs, safe_serialization=True, data_config=norm)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out
