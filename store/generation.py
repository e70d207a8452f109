"""One generation of the saliency store: its arrays, its writer and its reader.

A generation is a zarr group ``gen-NNNNNN`` holding

- ``maps (N, G, G) float16``, fill NaN, one chunk per data shard ``(shard_size, G, G)``;
- ``valid (N,) uint8``, 1 = computed, 0 = missing / corrupt image, chunks ``(shard_size,)``;
- ``shards_done (num_shards,) uint8``, the resume markers, one chunk per marker;
- ``head_maps (N, H, G, G) float16`` when per-head maps were asked for.

No sharding codec anywhere: writers in different processes never share a key
(docs/LIBRARY-NOTES.md, "Two writers in one zarr shard lose updates").
:meth:`GenerationWriter.write_shard` writes whole chunks only: maps, head_maps and valid
together, then the marker, so a shard whose marker is set is complete, and a rewrite of a
shard is idempotent.

Every chunk carries a CRC-32C of its stored bytes (zarr v3's standard ``crc32c`` codec, last
in each array's codec chain), so plain zarr and tensorstore verify it on every read. A chunk
that fails its checksum or does not decode reads as "no map" for its rows (NaN, ``valid``
0) and is recorded in :attr:`GenerationReader.damaged` — never raised into a loader;
:func:`verify_generation` checks every chunk of a generation. Generations written before the
checksum read as they always did (a chunk that does not decode is still caught).

Publishing and abandoning change the root of the store, which only the driver writes; the
writer hands those to the :class:`~salient.store.store.SaliencyStore` that made it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

# zarr's own IO loop, the one its synchronous API runs on: AsyncArray calls must run there
# (remote stores keep loop-bound sessions). zarr 3.1 has no public name for it.
from zarr.core.sync import sync

from salient import urls
from salient.store.errors import GenerationStateError, IdRangeError, LayoutMismatchError
from salient.urls import on_storage

if TYPE_CHECKING:
    from salient.store.store import SaliencyStore

__all__ = [
    "DamagedChunk",
    "GenerationReader",
    "GenerationWriter",
    "Layout",
    "Verification",
    "check_arrays",
    "create_arrays",
    "verify_generation",
]

MAPS_DTYPE = np.dtype("float16")
# What zarr's codecs raise for a chunk whose bytes are wrong: ValueError (a CRC-32C mismatch,
# or decoded bytes that do not fill the chunk), RuntimeError (numcodecs' zstd: "Zstd
# decompression error"). Storage failures are OSError / client errors, never these.
DECODE_ERRORS = (ValueError, RuntimeError)


FLAG_DTYPE = np.dtype("uint8")
_ARRAY_DOC = {
    "maps": "raw teacher saliency per sample id (not normalised); NaN = not computed",
    "head_maps": "raw per-head teacher saliency per sample id; NaN = not computed",
    "valid": "1 = the map row was computed, 0 = missing or corrupt image",
    "shards_done": "resume markers: 1 = every row of that data shard is written",
}


@dataclass(frozen=True)
class Layout:
    """Sample ids ``0..num_samples-1`` in chunks of ``shard_size``; ``grid x grid`` maps.

    Data shard ``i`` is chunk ``i``. ``counts``: each shard's sample count when some shard but
    the last is short (an adopted dataset's shards keep their own sizes), None when every
    shard but the last is full; shard ``i`` then holds ids ``[i·shard_size, i·shard_size +
    counts[i])`` and the ids after it, up to the next chunk, are unused (NaN, valid 0).
    ``num_samples`` is the arrays' length: one past the last shard's last id.
    """

    num_samples: int
    shard_size: int
    grid: int
    counts: tuple[int, ...] | None = None

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def chunk_range(self, shard: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of chunk ``shard``: the shard's ids and the unused ones
        after them."""
        if not 0 <= shard < self.num_shards:
            raise IdRangeError(
                f"shard index {shard} is out of range: the dataset has shards "
                f"0..{self.num_shards - 1}"
            )
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The ids ``[start, stop)`` of data shard ``shard`` (= zarr chunk ``shard``)."""
        start, stop = self.chunk_range(shard)
        return start, stop if self.counts is None else start + self.counts[shard]

    def check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_samples:
            raise IdRangeError(
                f"id range [{start}, {stop}) is outside the dataset's ids 0..{self.num_samples - 1}"
            )


def _padded(rows: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """A short shard's rows filled up to its whole chunk: maps NaN, valid 0 (unused ids)."""
    out = {}
    for name, array in rows.items():
        fill = np.full((length - len(array), *array.shape[1:]), 0 if name == "valid" else np.nan)
        out[name] = np.concatenate([array, fill.astype(array.dtype)])
    return out


# ---------------------------------------------------------------- arrays


def _expected(layout: Layout, heads: int | None) -> dict[str, tuple[tuple, tuple, np.dtype]]:
    """name -> (shape, chunks, dtype) of every array of a generation."""
    n, s, g = layout.num_samples, layout.shard_size, layout.grid
    arrays = {
        "maps": ((n, g, g), (s, g, g), MAPS_DTYPE),
        "valid": ((n,), (s,), FLAG_DTYPE),
        "shards_done": ((layout.num_shards,), (1,), FLAG_DTYPE),  # one writer per marker key
    }
    if heads is not None:
        arrays["head_maps"] = ((n, heads, g, g), (s, heads, g, g), MAPS_DTYPE)
    return arrays


_DIMENSIONS = {
    "maps": ("id", "row", "col"),
    "head_maps": ("id", "head", "row", "col"),
    "valid": ("id",),
    "shards_done": ("shard",),
}


def _compressors(maps: bool) -> tuple:
    """Bytes-to-bytes codecs of an array: the CRC-32C of the stored bytes last, so a read
    verifies exactly what storage returned. Maps keep zarr's default compressor (zstd, level
    0, no zstd checksum); flags are a few hundred bytes a chunk: zstd saves nothing there and
    costs a thread hop per write (~0.25 ms of a shard's ~4 here)."""
    return (ZstdCodec(level=0, checksum=False), Crc32cCodec()) if maps else (Crc32cCodec(),)


def create_arrays(group: zarr.Group, layout: Layout, describe: dict, heads: int | None) -> None:
    """The empty arrays of a new generation; ``describe`` goes into every array's attrs."""
    for name, (shape, chunks, dtype) in _expected(layout, heads).items():
        maps = dtype == MAPS_DTYPE
        group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=np.nan if maps else 0,
            compressors=_compressors(maps),
            dimension_names=_DIMENSIONS[name],
            attributes={**describe, "array": name, "description": _ARRAY_DOC[name]},
        )


def check_arrays(group: zarr.Group, layout: Layout, heads: int | None) -> dict[str, zarr.Array]:
    """The arrays of a generation, checked against the store's layout (LayoutMismatchError)."""
    arrays = {}
    for name, (shape, chunks, dtype) in _expected(layout, heads).items():
        try:
            array = group[name]
        except KeyError:
            raise LayoutMismatchError(
                f"generation {group.basename} has no {name!r} array; it "
                "is damaged — abandon it or let gc remove it"
            ) from None
        found = (array.shape, array.chunks, array.dtype)
        if found != (shape, chunks, dtype):
            raise LayoutMismatchError(
                f"{group.basename}/{name} has shape {array.shape}, chunks {array.chunks}, dtype "
                f"{array.dtype}; this store expects shape {shape}, chunks {chunks}, dtype "
                f"{dtype}; it was written by another tool — write a new generation"
            )
        arrays[name] = array
    return arrays


# ---------------------------------------------------------------- checking a shard's rows


def _as_maps(maps, shape: tuple, what: str) -> np.ndarray:
    """``maps`` cast to float16 after checking its shape and dtype (LayoutMismatchError)."""
    array = np.asarray(maps)
    if array.dtype.kind not in "fiu":
        raise LayoutMismatchError(
            f"{what} has dtype {array.dtype}; pass real numbers (float16 / float32 / float64)"
        )
    if array.shape != shape:
        raise LayoutMismatchError(
            f"{what} has shape {array.shape}, expected {shape} "
            "(rows of the shard, then the store's grid)"
        )
    with np.errstate(over="ignore"):  # overflow is reported below, with the value
        cast = array.astype(MAPS_DTYPE, copy=False)
    inf = np.isinf(cast) if cast is not array else None
    if inf is not None and inf.any():
        lost = array[inf][np.isfinite(array[inf])]  # finite values that became inf
        if lost.size:
            raise LayoutMismatchError(
                f"{what} holds values beyond the float16 range (largest magnitude "
                f"{np.abs(lost).max():.4g} > 65504); rescale the maps before storing"
            )
    return cast


def _as_valid(valid, count: int) -> np.ndarray:
    array = np.asarray(valid)
    if array.shape != (count,) or array.dtype.kind not in "biu":
        raise LayoutMismatchError(
            f"valid has shape {array.shape} and dtype {array.dtype}; "
            f"expected ({count},) of 0 / 1 (uint8 or bool)"
        )
    if ((array != 0) & (array != 1)).any():
        raise LayoutMismatchError(
            f"valid holds values other than 0 and 1: {sorted(set(array.tolist()) - {0, 1})[:5]}"
        )
    return array.astype(FLAG_DTYPE)


# ---------------------------------------------------------------- damaged chunks


@dataclass(frozen=True)
class DamagedChunk:
    """A chunk of a generation whose stored bytes fail their checksum, do not decode, or are
    missing; it holds the rows (ids, or for ``shards_done`` the shard) ``[start, stop)``."""

    generation: str
    array: str
    chunk: int
    start: int
    stop: int
    reason: str

    def __str__(self) -> str:
        rows = (
            f"the marker of shard {self.start}"
            if self.array == "shards_done"
            else f"ids {self.start}..{self.stop - 1}"
        )
        return f"{self.generation}: chunk {self.chunk} of {self.array} ({rows}) {self.reason}"


def _reason(error: Exception) -> str:
    text = (str(error).splitlines() or [""])[0]
    if "checksum" in text:  # zarr's crc32c codec: "Stored and computed checksum do not match"
        return "fails its CRC-32C checksum"
    return f"does not decode ({type(error).__name__}: {text[:120]})"


def _chunk_rows(array: zarr.Array, chunk: int) -> tuple[int, int]:
    size = array.chunks[0]
    return chunk * size, min((chunk + 1) * size, array.shape[0])


def _by_chunk(array: zarr.Array, rows: slice | np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
    """``rows`` (a slice, or sorted unique ids) cut at ``array``'s chunk borders."""
    size = array.chunks[0]
    if isinstance(rows, slice):
        first, last = rows.start // size, (rows.stop - 1) // size
        return [
            (k, slice(max(rows.start, k * size), min(rows.stop, (k + 1) * size)))
            for k in range(first, last + 1)
        ]
    chunks = rows // size
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    return [(int(part[0] // size), part) for part in np.split(rows, cuts)]


def _select(array: zarr.Array, rows: slice | np.ndarray) -> np.ndarray:
    return array[rows] if isinstance(rows, slice) else array.oindex[rows]


def guarded_rows(array: zarr.Array, rows: slice | np.ndarray, damaged: Callable) -> np.ndarray:
    """``array``'s ``rows`` (a non-empty slice, or sorted unique ids) in one read; when a chunk
    does not verify or decode, read chunk by chunk: a damaged chunk's rows are the fill value
    (NaN maps, 0 flags) and ``damaged(chunk, error)`` is told."""
    try:
        return _select(array, rows)
    except DECODE_ERRORS:
        pass  # some chunk is damaged: find which
    parts = []
    for chunk, part in _by_chunk(array, rows):
        try:
            parts.append(_select(array, part))
        except DECODE_ERRORS as error:
            damaged(chunk, error)
            count = part.stop - part.start if isinstance(part, slice) else len(part)
            parts.append(np.full((count, *array.shape[1:]), array.fill_value, array.dtype))
    return np.concatenate(parts)


def read_markers(array: zarr.Array) -> np.ndarray:
    """The resume markers ``shards_done`` (uint8 [num_shards]); a damaged marker reads 0, so
    its shard is written again."""
    return guarded_rows(array, slice(0, array.shape[0]), lambda chunk, error: None)


# ---------------------------------------------------------------- writer


class GenerationWriter:
    """Writes the shards of one unpublished generation; any number of processes may hold one.

    Made by :meth:`SaliencyStore.begin_generation` / ``resume_generation``; ``publish`` and
    ``abandon`` belong to the driver only.
    """

    def __init__(
        self, owner: SaliencyStore, group: zarr.Group, layout: Layout, holder: dict | None = None
    ):
        self.name = group.basename
        self.attrs = dict(group.attrs)
        self.holder = holder  # the driver's lease record (None in actors: they hold none)
        self._owner = owner
        self._layout = layout
        # Every write is a whole chunk of real rows: skip zarr's "is this chunk all fill
        # value?" scan (a NaN-aware compare of each maps chunk, ~0.5 ms of ~2 a write here).
        arrays = check_arrays(group, layout, self.attrs.get("heads"))
        whole = {"write_empty_chunks": True}
        self._arrays = {name: array.with_config(whole) for name, array in arrays.items()}
        self._closed: str | None = None

    def __repr__(self) -> str:
        return f"GenerationWriter({self.url!r}, {self.name!r})"

    @property
    def store(self) -> SaliencyStore:
        """The store this generation belongs to."""
        return self._owner

    @property
    def url(self) -> str:
        return self._owner.url

    @on_storage
    def missing_shards(self) -> list[int]:
        """Indices of the shards whose resume marker is not set, ascending."""
        return np.flatnonzero(read_markers(self._arrays["shards_done"]) == 0).tolist()

    @on_storage
    def write_shard(self, shard_index: int, maps, valid, head_maps=None) -> None:
        """Write every row of data shard ``shard_index``, then set its resume marker.

        ``maps [n,G,G]`` (any real dtype, stored as float16), ``valid [n]`` 0/1, and
        ``head_maps [n,H,G,G]`` exactly when the generation was begun with ``heads``;
        ``n`` is the shard's sample count. Everything is checked before the first byte is
        written. Rewriting a shard writes the same bytes (idempotent, safe to retry).

        Raises:
            IdRangeError: no such shard. LayoutMismatchError: wrong shape, dtype, row count,
                valid values, or head maps missing / unexpected. GenerationStateError: this
                writer already published or abandoned the generation.
        """
        self._check_open()
        start, stop = self._layout.shard_range(int(shard_index))
        rows = self._checked_rows(stop - start, maps, valid, head_maps)
        start, stop = self._layout.chunk_range(int(shard_index))
        if stop - start > len(rows["valid"]):  # a short shard: its chunk is written whole
            rows = _padded(rows, stop - start)
        write = self._write(rows, slice(start, stop), int(shard_index))
        if urls.is_remote(self.url):  # an endpoint that stops reading blocks a write for good
            write = asyncio.wait_for(
                write, urls.upload_limit_s(sum(r.nbytes for r in rows.values()))
            )
        sync(write)

    async def _write(self, rows: dict[str, np.ndarray], ids: slice, shard_index: int) -> None:
        # The data chunks concurrently, then the marker, in one trip to zarr's IO loop (the
        # synchronous API makes one per array; zarr's per-call overhead, not bytes, bounds
        # a shard's write: ~3 ms for 392 KB here, ``salient bench store``).
        arrays = self._arrays
        await asyncio.gather(*(arrays[name].async_array.setitem(ids, rows[name]) for name in rows))
        await arrays["shards_done"].async_array.setitem(shard_index, 1)  # the marker last

    def _checked_rows(self, count: int, maps, valid, head_maps) -> dict[str, np.ndarray]:
        grid, heads = self._layout.grid, self.attrs.get("heads")
        rows = {
            "maps": _as_maps(maps, (count, grid, grid), "maps"),
            "valid": _as_valid(valid, count),
        }
        if (head_maps is None) != (heads is None):
            raise LayoutMismatchError(
                f"generation {self.name} was begun with heads={heads}; pass head_maps "
                f"[n, heads, G, G] exactly when heads is set (got "
                f"{'none' if head_maps is None else np.shape(head_maps)})"
            )
        if head_maps is not None:
            rows["head_maps"] = _as_maps(head_maps, (count, heads, grid, grid), "head_maps")
        return rows

    def publish(self) -> None:
        """Make this generation ``current`` (one root metadata write).

        Raises:
            IncompleteGenerationError: a shard's marker is not set; nothing changes.
            GenerationStateError: already published or abandoned.
        """
        self._check_open()
        self._owner._publish(self)
        self._closed = "published"

    def abandon(self) -> None:
        """Delete this unpublished generation (run no writer of it any more)."""
        self._check_open()
        self._owner._abandon(self.name)
        self._closed = "abandoned"

    def _check_open(self) -> None:
        if self._closed is not None:
            raise GenerationStateError(
                f"generation {self.name} is {self._closed}; begin a new "
                "generation to write maps again"
            )


# ---------------------------------------------------------------- reader


class GenerationReader:
    """Reads one published (immutable) generation; binding it keeps an epoch consistent.

    ``attrs``: the generation's metadata (teacher, kind, image_size, patch_size, grid, epoch,
    created, published, …). Every read returns ``(maps float16 [n,G,G], valid uint8 [n])``;
    :meth:`read_head_maps` reads the per-head maps of a generation begun with ``heads``.
    The rows of a chunk that fails its checksum or does not decode (of ``maps`` or ``valid``)
    read as "no map" (NaN, ``valid`` 0); :attr:`damaged` lists those chunks.
    """

    def __init__(self, group: zarr.Group, layout: Layout, url: str = ""):
        self.name = group.basename
        self.attrs = dict(group.attrs)
        self.layout = layout
        self.url = url  # the store's, for error messages
        arrays = check_arrays(group, layout, self.attrs.get("heads"))
        self._maps, self._valid = arrays["maps"], arrays["valid"]
        self._head_maps = arrays.get("head_maps")
        self._damaged: dict[tuple[str, int], DamagedChunk] = {}

    def __repr__(self) -> str:
        return f"GenerationReader({self.name!r})"

    @property
    def heads(self) -> int | None:
        """How many per-head maps each row holds (``None``: the generation has none)."""
        return self.attrs.get("heads")

    @on_storage
    def read_head_maps(self, start: int, stop: int) -> np.ndarray:
        """Per-head rows of ids ``[start, stop)``: ``float16 [n, H, G, G]``, raw (one read);
        the rows of a damaged chunk read as NaN and the chunk joins :attr:`damaged`.

        Raises IdRangeError outside ``0..num_samples``; LayoutMismatchError when the
        generation holds no per-head maps (it was not refreshed with ``--kind heads``)."""
        if self._head_maps is None:
            raise LayoutMismatchError(
                f"generation {self.name} of {self.url or 'the store'} holds no per-head maps "
                f"(kind {self.attrs.get('kind')}); refresh with --kind heads"
            )
        self.layout.check_range(start, stop)
        if start == stop:
            return self._head_maps[0:0]
        record = self._recorder("head_maps", self._head_maps)  # a damaged chunk: NaN rows
        return guarded_rows(self._head_maps, slice(start, stop), record)

    @property
    def damaged(self) -> list[DamagedChunk]:
        """Every damaged chunk this reader has met, in the order met."""
        return list(self._damaged.values())

    def damaged_between(self, start: int, stop: int) -> list[DamagedChunk]:
        """The damaged chunks met so far that hold any of the ids ``[start, stop)``."""
        return [d for d in self._damaged.values() if d.start < stop and start < d.stop]

    @on_storage
    def read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ids ``[start, stop)``: one read per array (a shard's ids share one chunk).

        Raises IdRangeError outside ``0..num_samples``."""
        self.layout.check_range(start, stop)
        if start == stop:
            return self._maps[0:0], self._valid[0:0]
        return self._rows(slice(start, stop), np.arange(start, stop))

    def read_shard(self, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row of data shard ``shard_index`` (one zarr chunk per array)."""
        return self.read_range(*self.layout.shard_range(shard_index))

    @on_storage
    def read_ids(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Rows of arbitrary ``ids`` (any order, repeats allowed), in the order given.

        Each chunk touched is read once. Raises IdRangeError for ids outside the dataset or
        non-integer ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise IdRangeError(
                f"ids must be a 1-D list of integers, got shape {ids.shape} and dtype {ids.dtype}"
            )
        if ids.size and not (ids.min() >= 0 and ids.max() < self.layout.num_samples):
            bad = ids[(ids < 0) | (ids >= self.layout.num_samples)]
            raise IdRangeError(
                f"ids {bad[:5].tolist()} are outside the dataset's ids "
                f"0..{self.layout.num_samples - 1}"
            )
        if not ids.size:
            return self._maps[0:0], self._valid[0:0]
        unique, inverse = np.unique(ids.astype(np.int64), return_inverse=True)
        maps, valid = self._rows(unique, unique)
        return maps[inverse], valid[inverse]

    def _rows(self, rows: slice | np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps and flags of ``rows`` (sorted ``ids``); rows of a damaged chunk of either
        array read as no map."""
        maps = guarded_rows(self._maps, rows, self._recorder("maps", self._maps))
        valid = guarded_rows(self._valid, rows, self._recorder("valid", self._valid))
        for chunk in self.damaged_between(int(ids[0]), int(ids[-1]) + 1):
            bad = (ids >= chunk.start) & (ids < chunk.stop)
            maps[bad], valid[bad] = np.nan, 0
        return maps, valid

    def _recorder(self, name: str, array: zarr.Array) -> Callable[[int, Exception], None]:
        def record(chunk: int, error: Exception) -> None:
            start, stop = _chunk_rows(array, chunk)
            self._damaged.setdefault(
                (name, chunk), DamagedChunk(self.name, name, chunk, start, stop, _reason(error))
            )

        return record


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_generation` found: ``chunks`` checked, the ``damaged`` ones, and
    whether the generation carries checksums at all (older ones do not: only chunks that fail
    to decode are caught there)."""

    generation: str
    checksummed: bool
    chunks: int
    damaged: tuple[DamagedChunk, ...]

    @property
    def ok(self) -> bool:
        return not self.damaged


_VERIFY_CONCURRENCY = 16  # chunk reads in flight: enough to hide object-storage latency


def verify_generation(
    group: zarr.Group, layout: Layout, published: bool, concurrency: int = _VERIFY_CONCURRENCY
) -> Verification:
    """Read every chunk of the generation ``group`` and report the damaged ones.

    A published generation must hold every chunk of every array; an unpublished one, the
    chunks of the shards whose marker is set. A chunk that is missing where it must be, fails
    its CRC-32C or does not decode is damaged. Storage failures raise (they are not damage).
    """
    arrays = check_arrays(group, layout, dict(group.attrs).get("heads"))
    markers = arrays.pop("shards_done")
    done = range(layout.num_shards) if published else np.flatnonzero(read_markers(markers))
    # (array, chunk, must exist): an unpublished generation's unset markers are not written
    wanted = [(markers, k, published) for k in range(layout.num_shards)]
    wanted += [(array, int(k), True) for array in arrays.values() for k in done]
    found = []
    for (array, chunk, _), problem in zip(wanted, sync(_check_chunks(wanted, concurrency))):
        if problem is not None:
            start, stop = _chunk_rows(array, chunk)
            found.append(DamagedChunk(group.basename, array.basename, chunk, start, stop, problem))
    checksummed = all(
        any(isinstance(codec, Crc32cCodec) for codec in array.metadata.codecs)
        for array in (markers, *arrays.values())
    )
    return Verification(group.basename, checksummed, len(wanted), tuple(found))


def _chunk_key(array: zarr.Array, chunk: int) -> str:
    """The store key of chunk ``chunk`` along the first axis (the others are whole)."""
    coords = (chunk,) + (0,) * (array.ndim - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


async def _check_chunks(wanted: list[tuple[zarr.Array, int, bool]], concurrency: int) -> list:
    """For each ``(array, chunk, must exist)``: None (whole or rightly absent) or why it is
    damaged. One listing per array, then the chunks read ``concurrency`` at a time."""
    stored = {}
    for array in {id(a): a for a, _, _ in wanted}.values():
        path = array.store_path
        stored[id(array)] = {key async for key in path.store.list_prefix(f"{path.path}/")}
    gate = asyncio.Semaphore(concurrency)

    async def check(array: zarr.Array, chunk: int, required: bool) -> str | None:
        if _chunk_key(array, chunk) not in stored[id(array)]:
            return "is missing" if required else None
        async with gate:
            try:
                await array.async_array.getitem(slice(*_chunk_rows(array, chunk)))
            except DECODE_ERRORS as error:
                return _reason(error)
        return None

    return await asyncio.gather(*(check(*item) for item in wanted))
