"""The Zarr v3 saliency store: generations of teacher maps, atomic publish, resumable writes.

See :mod:`salient.store.store` for the layout, the guarantees and the URLs it accepts.
Importing this package touches no disk.
"""

from salient.store.errors import (
    FingerprintMismatchError,
    GenerationBusyError,
    GenerationNotFoundError,
    GenerationStateError,
    IdRangeError,
    IncompleteGenerationError,
    LayoutMismatchError,
    NotPublishedError,
    StoreDamagedError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
)
from salient.store.generation import (
    DamagedChunk,
    GenerationReader,
    GenerationWriter,
    Layout,
    Verification,
)
from salient.store.lease import Lease
from salient.store.store import FORMAT, SaliencyStore, store_exists

__all__ = [
    "FORMAT",
    "DamagedChunk",
    "FingerprintMismatchError",
    "GenerationBusyError",
    "GenerationNotFoundError",
    "GenerationReader",
    "GenerationStateError",
    "GenerationWriter",
    "IdRangeError",
    "IncompleteGenerationError",
    "Layout",
    "LayoutMismatchError",
    "Lease",
    "NotPublishedError",
    "SaliencyStore",
    "StoreDamagedError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "Verification",
    "store_exists",
]
