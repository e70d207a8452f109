"""AutoMAE's mask generator in ``salient inspect --generator CHECKPOINT``.

An AutoMAE run's checkpoint is rebuilt through its family (``trainer.family.FAMILIES``) and its
generator is run on the inspected generation's stored per-head maps, whole images (the maps
resampled to the model's grid when the store's differs, each head keeping its mass:
``crops.crop_head_maps`` with the whole-image box):

- ``p`` — the generator's mask probability ``[g, g]``, the softmax of its scores without
  Gumbel noise (``AutoMAE.mask_probability(gumbel=False)``), a distribution over the patches;
- one sampled AutoMAE mask (Gumbel noise and MAE's noise raised by ``mask_factor``, as in
  training: ``automae.learned_mask_plan``), seeded per sample id.

Statistics over every usable row of the generation, on demo datasets (object boxes; the cell
coverage of :func:`salient.jobs.inspect.stats.box_coverage` at the model's grid):
``mass_mean`` = mean of ``sum(p · cover)`` (``p`` as it is: it already sums to 1),
``area_mean``, ``lift_mean`` = mean of mass / area (1 = no more mask mass on the object than a
uniform ``p``: AutoMAE Sec. 2.2 argues more helps, up to a point), ``hit_share`` (mass > area),
and ``masked_box_share_mean`` = the share of the box's area the sampled mask covers, beside the
run's ``mask_ratio`` (what random masking covers on average).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from salient.jobs.inspect.config import InspectError
from salient.jobs.inspect.stats import box_coverage, sample_generator, usable
from salient.pipeline.crops import CropBox, crop_head_maps
from salient.trainer.automae import AutoMAE, learned_mask_plan
from salient.trainer.checkpoint import load_checkpoint
from salient.trainer.family import FAMILIES
from salient.trainer.specs import family_of

__all__ = ["GeneratorTally", "generator_view", "load_generator"]


def load_generator(path: str) -> AutoMAE:
    """The AutoMAE of a training checkpoint, in eval mode on the CPU.

    Raises:
        CheckpointError: a missing or damaged file. InspectError: a checkpoint of another
            family.
    """
    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    family = family_of(config.get("model"), config.get("family")) if config.get("model") else None
    if family != "automae":
        raise InspectError(
            f"--generator {path} is a checkpoint of {family or 'no salient run'}; give one of "
            "an AutoMAE run (salient train --family automae)"
        )
    run = SimpleNamespace(**config)  # the run's settings, as its family's builder reads them
    model = FAMILIES["automae"].build(**FAMILIES["automae"].settings(run))
    model.load_state_dict(ckpt["model"])  # built from its own config: the same architecture
    return model.eval()


def _on_model_grid(model: AutoMAE, head_maps: np.ndarray) -> torch.Tensor:
    """Stored whole-image heads ``[B, H, G, G]`` on the model's grid: ``[B, H, g, g]``."""
    maps = torch.as_tensor(np.asarray(head_maps, dtype=np.float32))
    cells = maps.shape[-1]
    if cells == model.grid:
        return maps
    whole = [CropBox(0, 0, cells, cells, False)] * len(maps)  # the map covers the image
    return crop_head_maps(maps, whole, [(cells, cells)] * len(maps), model.grid)


def generator_view(
    model: AutoMAE, head_maps: np.ndarray, seed: int, sample_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``p [B, g, g]`` float64 and one sampled mask per sample ``[B, g, g]`` int8 (1 masked,
    0 visible; the inspect panels' plan states), the sample ``sample_ids[b]``'s draws seeded
    by ``(seed, id)``."""
    g = model.grid
    maps = _on_model_grid(model, head_maps)
    states = np.zeros((len(maps), g * g), dtype=np.int8)
    with torch.no_grad():
        p = model.mask_probability(maps, gumbel=False)  # [B, N]
        for b, sample_id in enumerate(sample_ids):
            with torch.random.fork_rng(devices=[]):  # the run's draws, seeded per sample
                torch.manual_seed(sample_generator(seed, sample_id).initial_seed())
                sampled = model.mask_probability(maps[b : b + 1])
                plan, _ = learned_mask_plan(
                    sampled, torch.ones(1, dtype=torch.bool), model.mask_ratio, model.mask_factor
                )
            states[b, plan.mask_idx[0].numpy()] = 1
    return p.double().numpy().reshape(-1, g, g), states.reshape(-1, g, g)


@dataclass
class GeneratorTally:
    """The generator's box statistics over a generation, shard by shard (module docstring)."""

    model: AutoMAE
    seed: int = 0
    mass: list = field(default_factory=list)
    area: list = field(default_factory=list)
    masked: list = field(default_factory=list)

    def add(self, head_maps, valid, first_id: int, boxes, image_hw) -> None:
        """One shard's rows: ``head_maps [n, H, G, G]``, ``valid [n]``, ``boxes [n, 4]``."""
        if boxes is None:
            return
        ok = usable(head_maps, valid) & np.isfinite(boxes).all(axis=1)
        if not ok.any():
            return
        ids = (np.flatnonzero(ok) + first_id).tolist()
        p, states = generator_view(self.model, head_maps[ok], self.seed, ids)
        cover = box_coverage(boxes[ok], image_hw, self.model.grid)  # [n, g, g]
        self.mass.append((p * cover).sum(axis=(1, 2)))
        area = (boxes[ok, 2] - boxes[ok, 0]) * (boxes[ok, 3] - boxes[ok, 1])
        self.area.append(area / (image_hw[0] * image_hw[1]))
        self.masked.append((states * cover).sum(axis=(1, 2)) / cover.sum(axis=(1, 2)))

    def summary(self) -> dict | None:
        if not self.mass:
            return None
        mass, area, masked = (np.concatenate(x) for x in (self.mass, self.area, self.masked))
        return {
            "images": len(mass),
            "mass_mean": float(mass.mean()),
            "area_mean": float(area.mean()),
            "lift_mean": float((mass / area).mean()),
            "hit_share": float((mass > area).mean()),
            "masked_box_share_mean": float(masked.mean()),
            "mask_ratio": self.model.mask_ratio,
        }
