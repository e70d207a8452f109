"""The arms of a comparison: a recipe or strategy name, and where its maps come from.

An arm is named by

- a **recipe** (``salient.jobs.train.recipes.RECIPES``: ``mae``, ``amt-mae``, ``attmask-mae``,
  ``gpa-mae``, …): every value of the paper's run — masks, their options and schedule, map
  kind, loss, optimiser betas and decay, crops — with the comparison's shared settings on top;
- a **strategy** (``pipeline.strategies.STRATEGY_NAMES``; ``attmask-high`` spells ``attmask_high``):
  MAE with that mask strategy at its paper's ratios, every other setting salient's default,
  so two strategy arms differ in their masks only;
- either of them with a **teacher suffix**: ``-self`` (maps refreshed from the arm's own
  checkpoints, AMT's way: the default of a strategy or recipe that reads maps and refreshes)
  or ``-label`` (the fixed maps of the label-aware teacher, refreshed once into its own store
  and never again, GPA's way; the default of a recipe that reads maps from a frozen teacher,
  such as ``gpa-mae``). ``amt-self``, ``amt-label``, ``attmask-high-label``, ``mae-label``
  (a recipe without maps takes none: refused). ``automae`` is ``automae-label``: its
  generator reads the label teacher's per-head maps (a ``heads`` refresh into their own
  store), never its own (``automae-self`` is refused). iBOT recipes (``attmask-ibot-high``)
  plan their masks online from the run's EMA teacher, as ``salient train`` runs them;
  ``attmask-ibot-high-self`` reads the EMA teacher's maps from the store instead, refreshed
  from the run's checkpoints (``--saliency-source store``), and ``-label`` the label
  teacher's.

The shared settings, the same for every arm (``CompareConfig.shared``): data, seed, epochs,
learning-rate schedule (peak from the shared ``blr`` and batch, warmup, cosine to 0), batch and
workers (no gradient accumulation), image and patch size, the encoder size (the arm's model
family at the shared size: ``mae-base`` → ``mae-tiny``), loader workers; every checkpoint and
generation kept (the probes read them). Self-teacher arms refresh at most every
``refresh_every`` epochs after at most ``warmup_epochs`` of random masking (a recipe's 40 and
40 of a 400-epoch run scale down to the comparison's; AttMask's every epoch stays every
epoch), waited for, so a run is deterministic and its time includes its refreshes. Label
arms mask by the teacher's maps from the first epoch (no warmup: the maps exist).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from salient.errors import SalientError
from salient.jobs.train.config import TrainConfig
from salient.jobs.train.recipes import RECIPES, fitted, resolve_recipe
from salient.pipeline.strategies import NEEDS_SALIENCY, STRATEGY_NAMES
from salient.trainer.specs import MODEL_FAMILIES

__all__ = ["TEACHERS", "Arm", "ArmError", "arm_config", "arm_names", "parse_arm", "scaled_model"]

TEACHERS = ("self", "label")  # where an arm's maps come from (module docstring)
_BASE_MODEL = "mae-tiny"  # a strategy arm's model before scaling: MAE


class ArmError(SalientError):
    """An arm name that is no recipe or strategy, or a teacher it cannot use."""


@dataclass(frozen=True)
class Arm:
    """One arm: its name as given, the recipe or strategy it comes from, its teacher (``self``,
    ``label`` or None: no maps), and its TrainConfig values before the shared settings."""

    name: str
    base: str
    teacher: str | None
    values: dict

    @property
    def reads_maps(self) -> bool:
        return self.teacher is not None


def arm_names() -> list[str]:
    """What ``--arms`` accepts, for messages and help: recipes, strategies, and the suffixes."""
    strategies = [s.replace("_", "-") for s in STRATEGY_NAMES]
    return sorted(RECIPES) + strategies + ["<name>-self", "<name>-label"]


def _base_values(base: str) -> dict | None:
    """The TrainConfig values of a recipe or a strategy name, or None when it is neither."""
    if base in RECIPES:
        return resolve_recipe(base)
    strategy = base.replace("-", "_")
    if strategy in STRATEGY_NAMES:
        return {"model": _BASE_MODEL, "strategy": strategy}
    return None


def parse_arm(name: str) -> Arm:
    """The arm named ``name`` (module docstring). Raises ArmError for a name that is no recipe
    or strategy, or a ``-self`` / ``-label`` arm whose masks read no maps."""
    values = _base_values(name)
    base, teacher = name, None
    if values is None:
        for suffix in TEACHERS:
            if name.endswith(f"-{suffix}") and _base_values(name[: -len(suffix) - 1]) is not None:
                base, teacher = name[: -len(suffix) - 1], suffix
                values = _base_values(base)
    if values is None:
        raise ArmError(
            f"unknown arm {name!r}; --arms takes recipe or strategy names, optionally with "
            f"-self or -label: {', '.join(arm_names())}"
        )
    # AutoMAE's generator reads a frozen teacher's per-head maps from the store (the recipe's
    # map_source "store"); its strategy is random, and it never refreshes from itself
    generator = values.get("map_source") == "store"
    reads = values.get("strategy", "amt") in NEEDS_SALIENCY or generator
    if generator and teacher == "self":
        raise ArmError(
            f"arm {name!r}: {base}'s generator reads a frozen teacher's maps; use {base} or "
            f"{base}-label"
        )
    if teacher is not None and not reads:
        raise ArmError(
            f"arm {name!r}: {base} masks without maps, so it has no teacher; drop -{teacher}"
        )
    if teacher is None and reads:  # a frozen teacher's recipe (GPA) gets the label teacher
        teacher = "self" if values.get("refresh_every", 1) else "label"
    return Arm(name, base, teacher, values)


def scaled_model(model: str, size: str) -> str:
    """The model of ``model``'s family at the encoder ``size``: ``mae-base``, tiny ->
    ``mae-tiny``. Raises ArmError when the family has no such size."""
    scaled = f"{model.rsplit('-', 1)[0]}-{size}"
    if scaled not in MODEL_FAMILIES:
        raise ArmError(f"model {model} has no {size} size; choose another --size")
    return scaled


def _scaled_unit(values: dict, patch_size: int) -> int | None:
    """A recipe's mask unit in patches (SimMIM: 32 px of 16 px patches = 2) at the shared
    patch size."""
    unit = values.get("mask_unit")
    if unit is None:
        return None
    return unit // values.get("patch_size", 16) * patch_size


def _scaled_local(values: dict, image_size: int, patch_size: int) -> dict:
    """A multi-crop recipe's local crop side at the shared crop size, in the recipe's
    proportion (iBOT: 96 of 224 px; at 64 px with 8 px patches, 24 px), a whole number of
    patches and at least one."""
    local = values.get("local_size")
    if local is None:
        return {}
    side = local * image_size / values.get("image_size", 224)
    return {"local_size": max(1, round(side / patch_size)) * patch_size}


def arm_config(arm: Arm, shared: dict, run_dir: str, store: str | None) -> TrainConfig:
    """The TrainConfig of one run of ``arm``: its values, then ``shared`` (the comparison's
    settings, see ``CompareConfig.shared``: TrainConfig fields plus ``size``, ``warmup_epochs``
    and ``refresh_every`` as caps), the run directory and the map store (the run's own for a
    self-teacher arm, the label teacher's for a label arm, None without maps or with maps
    planned online in the step)."""
    known = {f.name for f in fields(TrainConfig)}
    common = {k: v for k, v in shared.items() if k in known}
    common.pop("warmup_epochs", None)
    common.pop("refresh_every", None)
    momentum = common.pop("momentum_teacher", None)  # iBOT's alone; the recipe's unless given
    # a recipe's other schedule settings (iBOT's teacher-temperature warm-up) as their share
    # of the comparison's epochs, as `salient train --recipe` fits them
    values = fitted(arm.values, common) if "epochs" in arm.values else dict(arm.values)
    values = {k: v for k, v in values.items() if k in known}
    values.update(
        common,
        model=scaled_model(values.get("model", _BASE_MODEL), shared["size"]),
        mask_unit=_scaled_unit(arm.values, shared["patch_size"]),
        **_scaled_local(arm.values, shared["image_size"], shared["patch_size"]),
        lr=None,  # the peak from the shared blr and batch: one lr schedule for every arm
        min_lr=0.0,
        effective_batch=None,
        accum_iter=None,
        run_dir=run_dir,
        store=store,
        keep_checkpoints=0,  # every epoch's checkpoint: the probe curve and equal time read them
        keep_generations=0,  # every generation: their box lifts are reported
        save_every=1,
        resume=False,
    )
    values.update(_schedule(arm, shared))
    config = TrainConfig(**values)
    if momentum is not None and config.framework == "ibot":
        config = replace(config, momentum_teacher=momentum)
    if config.maps_from == "online":  # iBOT's masks from its EMA teacher: no store to read
        config = replace(config, store=None)
    return config


def _schedule(arm: Arm, shared: dict) -> dict:
    """The map schedule: none, the self-teacher's refreshes (capped by the shared ones), or the
    label teacher's fixed maps from the first epoch."""
    if arm.teacher is None:
        return {"warmup_epochs": 0, "refresh_every": 0}
    # An iBOT recipe plans its masks online from its EMA teacher; a suffix moves them to the
    # store: -label reads the label teacher's, -self the EMA teacher's refreshed from the
    # run's checkpoints (salient's way, the maps one refresh old).
    suffixed = arm.values.get("saliency_source") == "online" and arm.name != arm.base
    source = {"saliency_source": "store"} if suffixed else {}
    if arm.teacher == "label":
        return {"warmup_epochs": 0, "refresh_every": 0, **source}
    every = arm.values.get("refresh_every") or shared["refresh_every"]
    warmup = arm.values.get("warmup_epochs", shared["warmup_epochs"])
    return {
        "warmup_epochs": min(warmup, shared["warmup_epochs"]),
        "refresh_every": min(every, shared["refresh_every"]),
        "refresh_wait": True,  # deterministic generations; the arm's time includes them
        **source,
    }
