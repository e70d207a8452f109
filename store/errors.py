"""Errors of the saliency store: each message says what was found, what was expected, what to do.

Every class derives from :class:`StoreError`, itself a :class:`salient.errors.SalientError`,
so the CLI prints them as one line and exits 2.
"""

from __future__ import annotations

from salient.errors import SalientError

__all__ = [
    "FingerprintMismatchError",
    "GenerationBusyError",
    "GenerationNotFoundError",
    "GenerationStateError",
    "IdRangeError",
    "IncompleteGenerationError",
    "LayoutMismatchError",
    "NotPublishedError",
    "StoreDamagedError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
]


class StoreError(SalientError):
    """Something about a saliency store the user can fix."""


class StoreNotFoundError(StoreError):
    """No saliency store at the URL."""


class StoreDamagedError(StoreError):
    """Parts of a store are there but a part every reader needs (the root) is missing."""


class StoreExistsError(StoreError):
    """``create`` was asked for a URL that already holds something."""


class FingerprintMismatchError(StoreError):
    """The store was made for another dataset (its fingerprint differs)."""


class LayoutMismatchError(StoreError):
    """A grid, shape, row count or dtype that does not fit the store."""


class IdRangeError(StoreError):
    """A sample id or shard index outside the dataset."""


class GenerationNotFoundError(StoreError):
    """No generation of that name in the store."""


class GenerationStateError(StoreError):
    """The generation is in the wrong state for the request (published, abandoned, …)."""


class NotPublishedError(GenerationStateError):
    """A reader asked for a generation that is not published (or for none when none is)."""


class IncompleteGenerationError(GenerationStateError):
    """Publish refused: some shards of the generation are not written yet."""


class GenerationBusyError(GenerationStateError):
    """Another live driver is writing the generation this one would resume."""
