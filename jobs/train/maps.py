"""Whose maps a training run reads, the lease that keeps them, and the refresh a run left behind.

Rank 0 decides, at each epoch start, which generation every rank reads (docs/ARCHITECTURE.md,
"Trainer", "Whose maps"):

- ``--maps own`` (the default of a run that refreshes its maps: AMT's premise is the model's
  own attention) binds the newest published generation made from one of *this* run's
  checkpoints (``trainer.provenance.made_by_run``), none before its first refresh publishes
  (the epoch masks at random, as during the warmup), however many other teachers' generations
  the store holds. Two runs sharing a store thus each read their own lineage.
- ``--maps any`` binds the store's current generation, whoever made it, and says so once per
  generation made by another teacher (a ``foreign_maps`` event the console prints).

Rank 0 holds a reader lease (``SaliencyStore.hold``) on the generation it bound, so ``salient
gc`` (and another run's collection) refuses it while the run reads it; the lease of the next
generation is taken before the previous one is released. If gc removed the chosen generation
before the lease was taken, rank 0 chooses again; a store whose root names a current generation
it does not hold (gc never removes current: damage) ends the run in one line.

After a restore (``--resume``, a restart after a lost worker) :func:`left_in_flight` finds the
run's unpublished generations: the refresh that was running when the run stopped. The newest
one whose teacher checkpoint still exists is resumed (its shards already written are kept),
the others abandoned; the worker logs ``refresh_resumed`` / ``refresh_abandoned``, and the
console prints one line for each. The teacher checkpoint of an unpublished generation of the
run is never pruned (:func:`unpublished_teachers`).

Importing this module touches no disk, GPU or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from salient.store import (
    GenerationNotFoundError,
    NotPublishedError,
    SaliencyStore,
    store_exists,
)
from salient.store.lease import lease_state
from salient.trainer.provenance import describe_teacher, made_by_run, provenance

__all__ = ["MapsBinding", "left_in_flight", "unpublished_teachers"]

_TRIES = 3  # choices in a row that gc may win before the run stops on its error


def open_store(url: str | None) -> SaliencyStore | None:
    """The store at ``url``, or None when it does not exist yet (the first refresh makes it)."""
    return SaliencyStore.open(url) if url and store_exists(url) else None


class MapsBinding:
    """Rank 0's choice of each epoch's generation, and its reader lease on it.

    ``choose()`` returns ``{"generation", "teacher", "own"}`` (``teacher``: the provenance
    record of the metrics contract; ``own``: made from this run's checkpoints) or None, holding
    the generation's lease until the next choice or :meth:`close`. ``tell(choice)`` logs the
    ``foreign_maps`` notice through ``event(record)``, once per generation of another teacher.
    """

    def __init__(self, config, event: Callable[[dict], None]) -> None:
        self.config, self._event = config, event
        self._holder = f"train run {config.run_dir}"
        self._lease, self._held, self._told = None, None, set()

    def choose(self) -> dict | None:
        store = open_store(self.config.store)
        for attempt in range(_TRIES):
            name, meta = self._pick(store) if store is not None else (None, None)
            if name is None:
                self.close()
                return None
            try:
                self._hold(store, name)
            except (NotPublishedError, GenerationNotFoundError):
                if self.config.maps == "any" or attempt == _TRIES - 1:
                    raise  # gc never removes current: a root naming a missing one is damage
                continue  # gc removed an older generation of the run since the listing
            own = made_by_run(meta, self.config.run_dir)
            return {"generation": name, "teacher": provenance(name, meta), "own": own,
                    "about": describe_teacher(meta)}  # fmt: skip
        self.close()
        return None

    def _pick(self, store: SaliencyStore) -> tuple[str | None, dict | None]:
        generations = store.generations()
        if self.config.maps == "any":
            name = store.current()
            meta = next((g.get("teacher") for g in generations if g["name"] == name), None)
            return name, meta
        own = [
            g
            for g in generations
            if g["status"] == "published" and made_by_run(g.get("teacher"), self.config.run_dir)
        ]
        if not own:
            return None, None
        newest = max(own, key=lambda g: (g.get("published") or "", g["name"]))
        return newest["name"], newest.get("teacher")

    def _hold(self, store: SaliencyStore, name: str) -> None:
        if name == self._held:
            return
        lease = store.hold(name, self._holder)  # the new one first, then the old one goes
        self.close()
        self._lease, self._held = lease, name

    def tell(self, choice: dict) -> None:
        """Log, once per generation, that an epoch reads another teacher's maps."""
        name = choice["generation"]
        if choice["own"] or name in self._told:
            return
        self._told.add(name)
        self._event(
            {"kind": "foreign_maps", **{k: choice[k] for k in ("generation", "teacher", "about")}}
        )

    def close(self) -> None:
        if self._lease is not None:
            self._lease.release()
        self._lease, self._held = None, None


def left_in_flight(store: SaliencyStore | None, run_dir: str) -> list[dict]:
    """The run's unpublished generations (made from its checkpoints), oldest first, each with
    ``teacher_exists``, ``live`` (a driver still writes it) and its ``shards_done``."""
    if store is None:
        return []
    found = []
    for info in store.generations():
        teacher = info.get("teacher") or {}
        if info["status"] != "writing" or not made_by_run(teacher, run_dir):
            continue
        found.append(
            {
                "generation": info["name"],
                "teacher": teacher.get("path"),
                "epochs_done": teacher.get("epoch"),
                "teacher_exists": Path(teacher["path"]).is_file(),
                "live": lease_state(info.get("writer")) == "live",
                "shards_done": info["shards_done"],
                "shards": store.num_shards,
            }
        )
    return found


def unpublished_teachers(store: SaliencyStore | None, run_dir: str) -> list[str]:
    """The checkpoints of ``run_dir`` an unpublished generation was begun from: a resumed
    refresh needs them, so they are never pruned."""
    return [g["teacher"] for g in left_in_flight(store, run_dir)]
