"""The Zarr v3 saliency store: generations of teacher maps, atomic publish, resumable writes.

Layout, guarantees (publish is one root write; readers never tear; writers never share a key;
gc never removes what is current, kept, held or recent; damaged chunks read as no map),
leases and URLs: docs/ARCHITECTURE.md, "The saliency store". Every array opens with plain
``zarr.open_array(f"{url}/{gen}/maps")``. Importing this module touches no disk.

Use::

    store = SaliencyStore.create(url, dataset, grid=14)  # or SaliencyStore.open(url, dataset)
    w = store.open_or_resume(teacher, kind, image_size=224, patch_size=16)
    for shard in w.missing_shards():                     # any process, any order
        w.write_shard(shard, maps, valid)                # maps [n,G,G], valid [n]
    w.publish()                                          # refuses unless every shard is done
    r = store.bind()                                     # reader of `current`, for one epoch
    maps, valid = r.read_shard(i)                        # or read_range / read_ids
    r.damaged                                            # chunks that read as no map
    with store.hold(r.name, "train run runs/amt"): ...   # gc keeps what a live reader holds
    store.verify(name)                                   # every chunk read: the damaged ones
    store.gc(keep=3, grace_s=3600)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import zarr
from zarr.errors import ContainsGroupError

from salient import urls
from salient.store.errors import (
    FingerprintMismatchError,
    GenerationBusyError,
    GenerationNotFoundError,
    GenerationStateError,
    IncompleteGenerationError,
    LayoutMismatchError,
    NotPublishedError,
    StoreDamagedError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
)
from salient.store.generation import (
    GenerationReader,
    GenerationWriter,
    Layout,
    Verification,
    create_arrays,
    read_markers,
    verify_generation,
)
from salient.store.lease import Lease, describe_writer, gone, holder, lease_state
from salient.store.paths import (
    GENERATION,
    age_s,
    dataset_layout,
    generation_name,
    json_value,
    normalise,
    now,
    occupied,
    open_root,
    orphan_generations,
    positive_int,
    same_maps,
    store_exists,
    store_like,
)
from salient.urls import on_storage

__all__ = ["FORMAT", "READERS", "SaliencyStore", "store_exists"]  # store_exists: from paths

FORMAT = "salient-store/1"
READERS = "readers"  # the group of readers' lease records, one child group per reader


# ---------------------------------------------------------------- the store


def _busy(name: str, message: str) -> GenerationBusyError:
    error = GenerationBusyError(message)
    error.generation = name  # kept through pickling (Ray): exceptions pickle their __dict__
    return error


class SaliencyStore:
    """A saliency store at ``url``; make one with :meth:`create` or :meth:`open`."""

    def __init__(self, url: str, attrs: dict):
        self.url = url
        counts = attrs.get("shard_counts")  # only when a shard but the last is short
        self.layout = Layout(
            attrs["num_samples"],
            attrs["shard_size"],
            attrs["grid"],
            None if counts is None else tuple(counts),
        )
        self.fingerprint: str = attrs["fingerprint"]
        self._unheld = False  # warned once: the store refused a reader lease's write

    def __repr__(self) -> str:
        return f"SaliencyStore({self.url!r}, grid={self.grid}, num_samples={self.num_samples})"

    @property
    def grid(self) -> int:
        return self.layout.grid

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    @property
    def shard_size(self) -> int:
        return self.layout.shard_size

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(cls, url: str | os.PathLike, dataset, grid: int = 14) -> SaliencyStore:
        """A new, empty store for ``dataset`` (a ``salient.pipeline.manifest.Dataset``).

        Raises:
            StoreExistsError: something already lives at ``url``.
            StoreError: a grid that is not a positive integer, or a dataset without
                contiguous shards / fingerprint.
        """
        url = normalise(url)
        layout = dataset_layout(dataset, grid)
        with urls.storage_errors(url):
            return cls._create(url, layout, dataset, grid)

    @classmethod
    def _create(cls, url: str, layout: Layout, dataset, grid: int) -> SaliencyStore:
        if occupied(url):
            raise StoreExistsError(
                f"{url} already holds something (a store, or other files); open the store "
                "there or choose a new store path"
            )
        attrs = {
            "format": FORMAT,
            "fingerprint": dataset.fingerprint,
            "grid": grid,
            "num_samples": layout.num_samples,
            "shard_size": layout.shard_size,
            "num_shards": layout.num_shards,
            **({} if layout.counts is None else {"shard_counts": list(layout.counts)}),
            "current": None,
            "published": {},
            "replaced": {},
        }
        try:
            zarr.create_group(**store_like(url), zarr_format=3, attributes=attrs)
        except ContainsGroupError:  # created by another driver since the check above
            raise StoreExistsError(f"{url} was created meanwhile by another driver") from None
        return cls(url, attrs)

    @classmethod
    def open_or_create(cls, url: str | os.PathLike, dataset, grid: int = 14) -> SaliencyStore:
        """The store at ``url`` checked against ``dataset``, created first when missing.

        Two drivers that create one store at the same moment both end up opening it (the
        loser of the race opens what the winner made; both write the same root).
        """
        if not store_exists(url):
            try:
                return cls.create(url, dataset, grid)
            except StoreExistsError:
                if not store_exists(url):  # something else than a store lives there
                    raise
        return cls.open(url, dataset)

    @classmethod
    def open(cls, url: str | os.PathLike, dataset=None) -> SaliencyStore:
        """The store at ``url``; with ``dataset``, check it was made for that dataset.

        Reads only; writes nothing. Raises StoreNotFoundError (nothing there), StoreError
        (not a salient store), FingerprintMismatchError (made for another dataset).
        """
        url = normalise(url)
        with urls.storage_errors(url):
            try:
                attrs = dict(open_root(url).attrs)
            except FileNotFoundError:
                orphans = orphan_generations(url)
                if orphans:
                    raise StoreDamagedError(
                        f"the store at {url} is damaged: its root zarr.json is missing but it "
                        f"holds generations {', '.join(orphans)}; restore zarr.json from a "
                        "copy, or move the folder aside and refresh into a new store"
                    ) from None
                raise StoreNotFoundError(
                    f"no saliency store at {url}; `salient refresh` creates one, or check the path"
                ) from None
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{url} is a zarr group but not a salient saliency store (format "
                f"{attrs.get('format')!r}, expected {FORMAT!r}); use another path"
            )
        store = cls(url, attrs)
        if dataset is not None:
            store.check_dataset(dataset)
        return store

    def check_dataset(self, dataset) -> None:
        """Raise FingerprintMismatchError unless the store was made for ``dataset``."""
        if dataset.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"the store at {self.url} was made for another dataset: its fingerprint is "
                f"{self.fingerprint[:12]}… ({self.num_samples} samples) but the dataset at "
                f"{dataset.root} has {dataset.fingerprint[:12]}… ({dataset.num_samples} "
                "samples); use a new store path for this dataset, or the dataset the store "
                "was made for"
            )

    # ------------------------------------------------------------ the root

    def _root(self, mode: str = "r") -> zarr.Group:
        return open_root(self.url, mode)  # re-opened every time: an open Group keeps old attrs

    def _update_root(
        self, change: Callable[[dict], dict], done: Callable[[dict], bool], tries: int = 5
    ) -> None:
        """One atomic write of the root attrs, computed from their newest version; read back
        and redone while ``done`` says another driver's write replaced it (zarr has no locks)."""
        for _ in range(tries):
            root = self._root("r+")
            root.update_attributes(change(dict(root.attrs)))
            if done(dict(self._root().attrs)):
                return
        raise StoreError(
            f"the root attributes of {self.url} kept changing under this driver ({tries} "
            "tries); other drivers are writing the store — retry when they are done"
        )

    @on_storage
    def current(self) -> str | None:
        """The name of the current (last published) generation, read from the store now."""
        return self._root().attrs.get("current")

    @staticmethod
    def _names(root: zarr.Group) -> list[str]:
        return sorted(
            (k for k in root.group_keys() if GENERATION.match(k)),
            key=lambda k: int(GENERATION.match(k)[1]),
        )

    @staticmethod
    def _status(name: str, gen_attrs: dict, root_attrs: dict) -> str:
        """published | writing | creating | abandoned; the root alone decides "published"."""
        if name in root_attrs.get("published", {}):
            return "published"
        status = gen_attrs.get("status")
        return status if status in ("creating", "abandoned") else "writing"

    def _group(self, root: zarr.Group, name: str) -> zarr.Group:
        if not isinstance(name, str) or not GENERATION.match(name) or name not in root:
            raise GenerationNotFoundError(
                f"no generation {name!r} in the store at {self.url}; it holds "
                f"{', '.join(self._names(root)) or 'none'}"
            )
        return root[name]

    @on_storage
    def generations(self) -> list[dict]:
        """Every generation, oldest first: its attrs plus ``name``, ``status``, ``current``,
        ``published`` and ``replaced_at`` (times, ISO 8601 UTC) and ``shards_done`` (count)."""
        root = self._root()
        root_attrs = dict(root.attrs)
        return [self._info(name, root[name], root_attrs) for name in self._names(root)]

    def _info(self, name: str, group: zarr.Group, root_attrs: dict) -> dict:
        status = self._status(name, dict(group.attrs), root_attrs)
        if status == "published":
            done = self.num_shards
        else:  # a generation whose creation was interrupted may lack its arrays
            done = int(read_markers(group["shards_done"]).sum()) if "shards_done" in group else 0
        return {
            **group.attrs,
            "name": name,
            "status": status,
            "current": name == root_attrs.get("current"),
            "published": root_attrs["published"].get(name),
            "replaced_at": root_attrs["replaced"].get(name),
            "shards_done": done,
        }

    # ------------------------------------------------------------ writing

    def _describe(
        self,
        teacher: dict,
        kind: str,
        image_size: int,
        patch_size: int,
        epoch: int | None,
        heads: int | None,
    ) -> dict:
        """The checked metadata of a generation (LayoutMismatchError on a grid mismatch)."""
        if not isinstance(teacher, dict):
            raise StoreError(f"teacher must be a dict of teacher metadata, got {type(teacher)}")
        if not isinstance(kind, str) or not kind:
            raise StoreError(f"kind must name the map kind (e.g. 'cls_attn'), got {kind!r}")
        positive_int(image_size, "image_size")
        positive_int(patch_size, "patch_size")
        if heads is not None:
            positive_int(heads, "heads")
        if image_size % patch_size or image_size // patch_size != self.grid:
            raise LayoutMismatchError(
                f"image_size {image_size} / patch_size {patch_size} does not give the "
                f"{self.grid}x{self.grid} grid of the store at {self.url}; use image size "
                f"{self.grid * patch_size}, or a new store for this grid"
            )
        return {
            "teacher": json_value(teacher, "teacher"),
            "kind": kind,
            "image_size": image_size,
            "patch_size": patch_size,
            "grid": self.grid,
            "epoch": json_value(epoch, "epoch"),
            "heads": heads,
        }

    @on_storage
    def begin_generation(
        self,
        teacher: dict,
        kind: str,
        image_size: int,
        patch_size: int,
        epoch: int | None = None,
        heads: int | None = None,
    ) -> GenerationWriter:
        """A new, empty generation (never current until published); returns its writer.

        ``teacher``: the teacher metadata dict (path, sha256, name, epoch, …). ``heads``:
        also store per-head maps ``[N, heads, G, G]``. Raises LayoutMismatchError when
        ``image_size / patch_size`` is not the store's grid.
        """
        describe = self._describe(teacher, kind, image_size, patch_size, epoch, heads)
        record = holder()
        group = self._new_group({**describe, "writer": record})
        create_arrays(group, self.layout, {"generation": group.basename, **describe}, heads)
        group.update_attributes({"status": "writing"})  # arrays exist: resumable from now on
        return GenerationWriter(self, group, self.layout, holder=record)

    def _new_group(self, attrs: dict, tries: int = 20) -> zarr.Group:
        """The group of a new generation under the next free name (``status: creating``).

        Another driver may take a name at the same moment: zarr refuses to create a group
        that exists, and the group is read back, so each driver ends with its own name.
        """
        for _ in range(tries):
            root = self._root("r+")
            root_attrs = dict(root.attrs)
            taken = [
                int(GENERATION.match(n)[1])
                for n in [*self._names(root), *root_attrs["published"], *root_attrs["replaced"]]
            ]
            name = generation_name(max(taken, default=0) + 1)
            stamp = {**attrs, "status": "creating", "created": now(), "published": None}
            try:
                group = root.create_group(name, attributes=stamp)
            except ContainsGroupError:
                continue
            mine = attrs["writer"]["token"]
            if (self._root()[name].attrs.get("writer") or {}).get("token") == mine:
                return group
        raise StoreError(
            f"could not claim a new generation name in {self.url} after {tries} tries; other "
            "drivers are creating generations — retry when they are done"
        )

    @on_storage
    def resume_generation(self, name: str | None = None) -> GenerationWriter | None:
        """A writer of the unpublished generation ``name``; without a name, of the newest
        unpublished one, or None when there is none.

        Raises GenerationNotFoundError (no such name), GenerationStateError (published or
        abandoned), LayoutMismatchError (its arrays do not fit the store).
        """
        root = self._root("r+")
        root_attrs = dict(root.attrs)
        if name is None:
            writing = [
                n
                for n in self._names(root)
                if self._status(n, dict(root[n].attrs), root_attrs) == "writing"
            ]
            if not writing:
                return None
            name = writing[-1]
        group = self._group(root, name)
        status = self._status(name, dict(group.attrs), root_attrs)
        if status != "writing":
            raise GenerationStateError(
                f"generation {name} is {status}; only an unpublished "
                "generation can be written — begin a new one"
            )
        return GenerationWriter(self, group, self.layout)

    @on_storage
    def open_or_resume(
        self,
        teacher: dict,
        kind: str,
        image_size: int,
        patch_size: int,
        epoch: int | None = None,
        heads: int | None = None,
    ) -> GenerationWriter:
        """Resume the newest unpublished generation begun with the same maps (teacher weights
        sha256, block / head / reduce, kind, image and patch size, heads), taking its lease;
        else begin a new one. A teacher without a real sha256 (random weights) never resumes.

        Raises GenerationBusyError when a live driver holds that generation's lease (its
        name and driver are in the message).
        """
        describe = self._describe(teacher, kind, image_size, patch_size, epoch, heads)
        root = self._root()
        root_attrs = dict(root.attrs)
        for name in reversed(self._names(root)):  # the newest unpublished one with these maps
            attrs = dict(root[name].attrs)
            if self._status(name, attrs, root_attrs) == "writing" and same_maps(attrs, describe):
                return self._claim(name, attrs)
        return self.begin_generation(teacher, kind, image_size, patch_size, epoch, heads)

    def _claim(self, name: str, attrs: dict) -> GenerationWriter:
        """Take the lease of the unpublished generation ``name`` unless a live driver holds it."""
        writer = attrs.get("writer")
        if lease_state(writer) == "live":
            raise _busy(
                name,
                f"generation {name} of the store at {self.url} is being written by another "
                f"refresh ({describe_writer(writer)}) with the same teacher; let it finish "
                "(its maps are the ones this run would write) or stop it, then rerun to resume",
            )
        record = holder()
        self._set_writer(name, record)
        claimed = self._root()[name].attrs.get("writer") or {}
        if claimed.get("token") != record["token"]:  # another driver claimed it meanwhile
            raise _busy(
                name,
                f"generation {name} of the store at {self.url} was just claimed by another "
                f"refresh ({describe_writer(claimed)}); let it finish or stop it, then rerun",
            )
        writer = self.resume_generation(name)
        writer.holder = record
        return writer

    def _set_writer(self, name: str, record: dict | None) -> None:
        """Write (or clear, ``None``) the lease attr of generation ``name``: drivers only."""
        self._group(self._root("r+"), name).update_attributes({"writer": record})

    def keep_alive(self, writer: GenerationWriter) -> Lease:
        """Renew ``writer``'s lease in a thread until the returned :class:`Lease` stops."""
        if writer.holder is None:
            raise GenerationStateError(
                f"this writer of {writer.name} holds no lease; get one from open_or_resume "
                "or begin_generation"
            )
        return Lease(
            writer.holder,
            write=lambda record: self._set_writer(writer.name, record),
            clear=lambda: self._set_writer(writer.name, None),
            name=f"the writer lease of {writer.name}",
        )

    def writer_state(self, name: str) -> tuple[str, dict | None]:
        """``(lease_state, writer attr)`` of generation ``name`` read now."""
        writer = self._group(self._root(), name).attrs.get("writer")
        return lease_state(writer), writer

    @on_storage
    def _publish(self, writer: GenerationWriter) -> None:
        """Mark ``writer``'s generation published, then flip ``current`` in one root write."""
        missing = writer.missing_shards()
        if missing:
            raise IncompleteGenerationError(
                f"generation {writer.name} cannot be published: {len(missing)} of "
                f"{self.num_shards} shards are not written (first: {missing[:10]}); write them "
                "(`salient refresh` resumes) and publish again"
            )
        root = self._root("r+")
        group = self._group(root, writer.name)
        if self._status(writer.name, dict(group.attrs), dict(root.attrs)) != "writing":
            raise GenerationStateError(
                f"generation {writer.name} is no longer being written "
                "(published or abandoned elsewhere)"
            )
        stamp = now()
        group.update_attributes({"status": "published", "published": stamp, "writer": None})

        def flip(attrs: dict) -> dict:
            replaced = {**attrs["replaced"]}
            if attrs.get("current") is not None:
                replaced[attrs["current"]] = stamp  # gc's grace period starts now
            return {
                "current": writer.name,
                "published": {**attrs["published"], writer.name: stamp},
                "replaced": replaced,
            }

        # the publish: one key, replaced atomically
        self._update_root(flip, done=lambda attrs: writer.name in attrs["published"])

    @on_storage
    def _abandon(self, name: str) -> None:
        root = self._root("r+")
        group = self._group(root, name)
        if self._status(name, dict(group.attrs), dict(root.attrs)) == "published":
            raise GenerationStateError(
                f"generation {name} is published; gc removes it once it is old enough"
            )
        group.update_attributes({"status": "abandoned"})  # gc finishes an interrupted delete
        del root[name]

    # ------------------------------------------------------------ reading

    @on_storage
    def bind(self, name: str | None = None) -> GenerationReader:
        """A reader of the published generation ``name`` (default: ``current`` now).

        Raises NotPublishedError (no current generation yet, or ``name`` not published),
        GenerationNotFoundError, LayoutMismatchError (arrays of another shape or dtype).
        """
        root = self._root()
        root_attrs = dict(root.attrs)
        if name is None:
            name = root_attrs.get("current")
            if name is None:
                raise NotPublishedError(
                    f"the store at {self.url} has no published generation "
                    "yet; run `salient refresh` to compute maps"
                )
        group = self._group(root, name)
        status = self._status(name, dict(group.attrs), root_attrs)
        if status != "published":
            published = ", ".join(root_attrs["published"]) or "none"
            raise NotPublishedError(
                f"generation {name} is {status}, not published; bind a published one ({published})"
            )
        return GenerationReader(group, self.layout, self.url)

    # ------------------------------------------------------------ readers' leases

    @on_storage
    def hold(self, name: str, holder_name: str) -> Lease:
        """A reader's lease on the published generation ``name``: ``gc`` keeps ``name`` while
        the lease is live and names ``holder_name`` (who reads, e.g. ``"train run
        runs/amt"``) when it refuses.

        The lease is renewed from a thread every ``RENEW_S`` seconds and goes stale like a
        writer's (``STALE_S`` without renewal, or at once when its process is gone on this
        host). Release it with ``release()`` or by leaving ``with store.hold(...):``. A reader
        that binds another generation holds the new one first, then releases the old one.

        Raises NotPublishedError / GenerationNotFoundError as :meth:`bind` does, also when
        ``gc`` removed the generation while the lease was being taken.
        """
        self.bind(name)  # a reader holds only what it can read
        record = holder(generation=name, holder=str(holder_name))
        self._root("r+").require_group(READERS)  # the parent of every reader's own record
        group = zarr.open_group(**self._reader_node(record["token"]), mode="w", attributes=record)
        lease = Lease(
            record,
            write=group.update_attributes,
            clear=lambda: self._drop_readers([record["token"]]),
            name=f"the reader lease on {name}",
        )
        if name not in self._root().attrs["published"]:  # gc removed it meanwhile
            lease.release()
            self.bind(name)  # raises, naming what the store holds now
        return lease

    def hold_if_writable(self, name: str, holder_name: str, stacklevel: int = 2) -> Lease | None:
        """:meth:`hold`, or None when the store refuses the lease record's write (a store this
        process may read but not write: read-only credentials or disk), after one warning per
        store object (``stacklevel`` as :func:`warnings.warn` counts it from the caller)
        that gc may then remove the generation under the reader. A stalled endpoint raises."""
        try:
            return self.hold(name, holder_name)
        except urls.StorageError as error:
            if error.stalled:
                raise
            if not self._unheld:
                self._unheld = True
                warnings.warn(
                    "read without a reader lease, so salient gc may remove a generation while "
                    f"it is read: {error}",
                    stacklevel=stacklevel + 1,
                )
            return None

    def readers(self) -> list[dict]:
        """Every reader's lease record (``generation``, ``holder``, ``host``, ``pid``, ``token``,
        ``renewed``), live or stale, read now."""
        root = self._root()
        if READERS not in root:
            return []
        return [dict(group.attrs) for _, group in root[READERS].groups()]

    def _reader_node(self, token: str) -> dict:
        return {
            **store_like(self.url),
            "path": f"{READERS}/{token}",
            "zarr_format": 3,
            "use_consolidated": False,
        }

    def _drop_readers(self, tokens: list[str]) -> None:
        readers = self._root("r+")[READERS]
        for token in tokens:
            if token in readers:
                del readers[token]

    # ------------------------------------------------------------ verification

    @on_storage
    def verify(self, name: str) -> Verification:
        """Read every chunk of generation ``name`` and list the damaged ones (missing where a
        chunk must be, failing its CRC-32C, or not decoding): :class:`Verification`.

        Reads only. Raises GenerationNotFoundError; storage failures raise StorageError.
        """
        root = self._root()
        group = self._group(root, name)
        published = self._status(name, dict(group.attrs), dict(root.attrs)) == "published"
        return verify_generation(group, self.layout, published)

    # ------------------------------------------------------------ garbage collection

    @on_storage
    def gc(self, keep: int = 3, grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove old generations; returns the names removed (or, ``dry_run``, that would be).

        Kept: ``current``; the ``keep`` newest published; every generation a live reader
        holds (:meth:`hold`); every published generation replaced less than ``grace_s``
        seconds ago (a reader that holds no lease may still be bound to it); every generation
        a live driver is writing. Removed: older published ones, abandoned ones, and
        unpublished ones whose driver stopped (no renewed lease) more than ``grace_s`` ago;
        also the lease records of readers that stopped. :meth:`gc_plan` says why for each
        generation.
        """
        plan = self.gc_plan(keep, grace_s)
        victims = [p["name"] for p in plan if p["remove"]]
        if dry_run:
            return victims
        gone_readers = [
            r["token"]
            for r in self.readers()
            if lease_state(r) not in ("live", "mine") or r.get("generation") in victims
        ]
        if gone_readers:  # the records of readers that stopped: nothing holds them any more
            self._drop_readers(gone_readers)
        if not victims:
            return victims
        root = self._root("r+")
        for name in victims:
            if name in root:
                del root[name]
        self._update_root(
            lambda attrs: {
                key: {n: t for n, t in attrs[key].items() if n not in victims}
                for key in ("published", "replaced")
            },
            done=lambda attrs: not set(victims) & set(attrs["published"]),
        )
        return victims

    def gc_plan(self, keep: int = 3, grace_s: float = 3600.0) -> list[dict]:
        """What :meth:`gc` would do, oldest first: ``name``, ``status``, ``remove`` and
        ``reason`` for every generation. Reads only."""
        positive_int(keep, "keep")
        if not isinstance(grace_s, int | float) or isinstance(grace_s, bool) or grace_s < 0:
            raise StoreError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        root = self._root()
        root_attrs = dict(root.attrs)
        published = root_attrs["published"]
        kept = set(sorted(published, key=lambda n: (published[n], n))[-keep:])
        bound: dict[str, dict] = {}  # generation -> a live reader's lease
        for record in self.readers():
            if lease_state(record) in ("live", "mine"):
                bound.setdefault(record.get("generation"), record)
        plan = []
        for name in self._names(root):
            attrs = dict(root[name].attrs)
            status = self._status(name, attrs, root_attrs)
            remove, reason = self._verdict(
                name, status, attrs, root_attrs, kept, bound.get(name), grace_s
            )
            plan.append({"name": name, "status": status, "remove": remove, "reason": reason})
        return plan

    def _verdict(
        self,
        name: str,
        status: str,
        attrs: dict,
        root_attrs: dict,
        kept: set,
        reader: dict | None,
        grace_s: float,
    ) -> tuple[bool, str]:
        if name == root_attrs.get("current"):
            return False, "current"
        if name in kept:
            return False, f"among the {len(kept)} newest published"
        if reader is not None:
            return False, f"held by a reader: {reader.get('holder')} ({describe_writer(reader)})"
        if status == "published":
            replaced = root_attrs["replaced"].get(name)
            if replaced is None or age_s(replaced) < grace_s:
                return False, f"replaced less than {grace_s:g} s ago (readers may be bound)"
            return True, f"replaced {age_s(replaced):.0f} s ago"
        if status == "abandoned":
            return True, "abandoned"
        return self._unpublished_verdict(status, attrs, grace_s)

    @staticmethod
    def _unpublished_verdict(status: str, attrs: dict, grace_s: float) -> tuple[bool, str]:
        """A generation being written is kept; one whose driver is gone (dead, silent, or
        none holds it) is kept ``grace_s`` after the driver's last renewal, for resuming."""
        writer = attrs.get("writer")
        if lease_state(writer) in ("live", "mine"):
            return False, f"being written ({describe_writer(writer)})"
        driver = {
            "dead": f"its driver (pid {(writer or {}).get('pid')}) is dead",
            "silent": f"its driver (pid {(writer or {}).get('pid')} on host "
            f"{(writer or {}).get('host')}) stopped renewing its lease",
            "none": "no driver holds it",
        }[gone(writer)]
        last = (writer or {}).get("renewed") or attrs.get("created")
        if last is None or age_s(last) < grace_s:
            return False, (
                f"{status}, {driver}; kept for a resuming refresh until {grace_s:g} s after "
                "its last renewal"
            )
        return True, f"{status}, {driver}, last renewed {age_s(last):.0f} s ago"
