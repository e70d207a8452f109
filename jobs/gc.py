"""``salient gc``: list a store's generations and remove the old ones.

The rules are the store's own (:meth:`SaliencyStore.gc_plan`, README, Decisions, "Bounded
disk"): ``current`` and the ``keep`` newest published generations stay; an older published
generation goes once it was replaced ``grace_s`` ago (a reader may still be bound to it); an
abandoned one goes at once; an unpublished one goes once its driver has been gone (no renewed
lease) for ``grace_s``; one a live driver writes always stays. Training runs the same
collection after each refresh (``--keep-generations``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salient.errors import SalientError
from salient.settings import check_fields, ranged
from salient.store import SaliencyStore

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
    plan = store.gc_plan(config.keep, config.grace_s)
    removed = store.gc(config.keep, config.grace_s, dry_run=config.dry_run)
    width = max((len(p["status"]) for p in plan), default=0)
    lines = [
        f"{p['name']}  {p['status']:<{width}}  "
        f"{'remove' if p['name'] in removed else 'keep  '}  {p['reason']}"
        for p in plan
    ]
    verb = "would remove" if config.dry_run else "removed"
    lines.append(
        f"{verb} {len(removed)} of {len(plan)} generations in {store.url}"
        + (" (dry run: nothing removed)" if config.dry_run else "")
    )
    return "\n".join(lines)
