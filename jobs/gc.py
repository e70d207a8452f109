"""``salient gc``: list a store's generations and remove the old ones.

The rules are the store's own (:meth:`SaliencyStore.gc_plan`, README, Decisions, "Bounded
disk"): ``current`` and the ``keep`` newest published generations stay; an older published
generation goes once it was replaced ``grace_s`` ago (a reader may still be bound to it); an
abandoned one goes at once; an unpublished one goes once its driver has been gone (no renewed
lease) for ``grace_s``; one a live driver writes, or a live reader holds (a training run
bound to it), always stays. Training runs the same collection after each refresh
(``--keep-generations``). Each generation's line names the teacher that made its maps
(``trainer.provenance``), and the live readers are listed below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.settings import check_fields, ranged
from salient.store import SaliencyStore
from salient.store.lease import describe_writer, gone, lease_state
from salient.trainer.provenance import describe_teacher

__all__ = ["GcConfig", "run_gc"]


@dataclass(frozen=True)
class GcConfig:
    """One collection of a store's old generations."""

    store: str
    """Saliency store path or URL."""
    keep: int = field(default=3, metadata=ranged(ge=1))
    """Newest published generations kept (the current one always is)."""
    grace_s: float = field(default=3600.0, metadata=ranged(ge=0))
    """Seconds a replaced generation, or one whose driver stopped, is kept for readers still
    bound to it."""
    dry_run: bool = False
    """List what would be removed and why; remove nothing."""

    def __post_init__(self):
        if not isinstance(self.store, str) or not self.store:
            raise SalientError(f"gc needs --store URL (got {self.store!r})")
        check_fields(self, SalientError)  # types and ranges, declared with the fields


def run_gc(config: GcConfig) -> str:
    """Collect (or, ``dry_run``, only list) old generations; returns a table, one line each.

    Raises StoreNotFoundError, StoreDamagedError, StoreError.
    """

    store = SaliencyStore.open(config.store)
    teachers = {g["name"]: g.get("teacher") for g in store.generations()}
    records = store.readers()
    readers = [r for r in records if lease_state(r) in ("live", "mine")]
    stopped = [r for r in records if lease_state(r) not in ("live", "mine")]
    plan = store.gc_plan(config.keep, config.grace_s)
    removed = store.gc(config.keep, config.grace_s, dry_run=config.dry_run)
    width = max((len(p["status"]) for p in plan), default=0)
    lines = [
        f"{p['name']}  {p['status']:<{width}}  "
        f"{'remove' if p['name'] in removed else 'keep  '}  {p['reason']}; "
        f"teacher {describe_teacher(teachers.get(p['name']))}"
        for p in plan
    ]
    lines += [
        f"reader: {r.get('holder')} holds {r.get('generation')} ({describe_writer(r)})"
        for r in readers
    ]
    lines += [  # a reader that stopped (its run killed) holds nothing; gc drops its record
        f"reader: {r.get('holder')} held {r.get('generation')}; it is {gone(r)}"
        + (f" ({describe_writer(r)})" if "renewed" in r else "")
        + f": its record {'would go' if config.dry_run else 'removed'}"
        for r in stopped
    ]
    verb = "would remove" if config.dry_run else "removed"
    lines.append(
        f"{verb} {len(removed)} of {len(plan)} generations in {store.url}"
        + (" (dry run: nothing removed)" if config.dry_run else "")
    )
    return "\n".join(lines)
