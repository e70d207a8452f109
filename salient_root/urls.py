"""Where datasets and stores live: a local path or an fsspec URL, decided here and only here.

A string with a scheme (``s3://bucket/d``, ``gs://…``, ``http(s)://…``, ``memory://…``) is a URL
and is never taken for a local path; ``file://`` URLs and plain strings are local paths, made
absolute. Local paths use the standard library (renames are atomic there); every other URL goes
through fsspec with the standard credentials (``AWS_*`` / ``GOOGLE_*`` variables and config
files, ``AWS_ENDPOINT_URL`` for S3-compatible services) plus the process-wide storage options
(``--storage-option KEY=VALUE``, see :func:`set_storage_options`).

Object stores have no rename: a file is written locally first and uploaded once, under its
final key, when complete (:func:`staged`), so a reader never sees half of it (README,
Decisions). Every failure of the storage is one :class:`StorageError` naming the URL and the
cause. A cleanup on a failure path (the staged file's removal) never replaces the first error.

Finite patience (docs/ARCHITECTURE.md, "Failure semantics"): every remote client is built
with connect and read timeouts and a bounded number of retries (:func:`client_defaults`;
``--storage-option`` overrides any of them), so a request to a stalled endpoint fails within
the process's patience (:func:`patience`, 180 s by default) with one StorageError and the job
can be rerun. Uploads, which no client timeout covers once the endpoint stops reading, are
cancelled after ``patience + size / SLOWEST_UPLOAD_BPS``. While a call waits on storage,
:func:`on_wait` lets a job print a heartbeat (``waiting on s3://… for 60 s``). Importing this
module touches no disk and imports no fsspec client.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from salient.errors import SalientError, cleanup_after

__all__ = [
    "StorageError",
    "StorageOptions",
    "adopt",
    "as_storage_error",
    "carry",
    "check_writable",
    "client_defaults",
    "filesystem",
    "fsspec_options",
    "is_remote",
    "join",
    "list_names",
    "normalise",
    "on_storage",
    "on_wait",
    "open_read",
    "parse_storage_options",
    "patience",
    "read_bytes",
    "remove",
    "set_patience",
    "set_storage_options",
    "sizes",
    "staged",
    "storage_errors",
    "storage_options",
    "upload_limit_s",
    "write_bytes",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # scheme -> pip extra
READ_ONLY = frozenset({"http", "https"})
# Listings are read again every time: another process (a refresh) may have added a generation.
_DEFAULTS = {"use_listings_cache": False}

# Finite patience, per request. A connection must open within CONNECT_S and a reply must not
# pause for more than READ_S (a stall, not a slow transfer: large objects stream at any pace).
CONNECT_S, READ_S = 10, 15  # s3fs's own read timeout is 15 s; its connect timeout 5 s
# s3: botocore's "standard" retries (transient 5xx, throttling, timeouts) with 2 attempts, inside
# s3fs's own tries (2 here, 5 by default), which nest twice for a streamed read: a stalled
# endpoint fails a streamed read after 2 × 2 × 2 × 15 s plus backoff (124 s measured), a zarr
# read or a HEAD after half that (61 s); with the libraries' defaults, 5 × 5 × 15 s and more.
# gs: gcsfs tries 6 times, backing off 1, 2, 4, 8, 16 s: 6 × 15 s + 31 s. http(s): no retries.
# All within:
S3_ATTEMPTS = 2
S3FS_TRIES = 2
PATIENCE_S = 180.0
# An upload is cancelled after patience + size / this: a writer blocked on an endpoint that
# stopped reading waits in a socket write no client timeout covers (it never ended, measured).
SLOWEST_UPLOAD_BPS = 2**20


def client_defaults(scheme_name: str | None) -> dict:
    """The timeout options salient gives the client of a scheme (JSON-like where it can be)."""
    if scheme_name in ("s3", "s3a"):
        return {
            "config_kwargs": {  # botocore.config.Config
                "connect_timeout": CONNECT_S,
                "read_timeout": READ_S,
                "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
            }
        }
    if scheme_name in ("gs", "gcs", "http", "https"):
        import aiohttp  # gcsfs' and fsspec's http client; imported only for these URLs

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=READ_S)
        if scheme_name in ("gs", "gcs"):
            # per request: gcsfs passes it to every aiohttp request (its default, None, would
            # turn off even the session's timeouts)
            return {"requests_timeout": timeout}
        return {"client_kwargs": {"timeout": timeout}}
    return {}


class StorageError(SalientError):
    """A URL that cannot be used: unknown scheme, client not installed, not reachable, denied.

    ``stalled``: the endpoint stopped answering (a timeout), so a cleanup that would write
    there (a lease's release) would wait as long again and is skipped (``store.lease``)."""

    stalled = False


# ---------------------------------------------------------------- path or URL


def scheme(url: str) -> str | None:
    """The URL's scheme in lower case, or None for a local path."""
    match = _SCHEME.match(url)
    return match[1].lower() if match else None


def is_remote(url: str | os.PathLike) -> bool:
    """Whether ``url`` names something other than the local filesystem."""
    return scheme(os.fspath(url)) not in (None, "file")


def normalise(url: str | os.PathLike) -> str:
    """An absolute local path (``file://`` stripped), or the URL without a trailing ``/``.

    Raises StorageError for a scheme fsspec does not know or whose client is not installed.
    """
    url = os.fspath(url)
    if scheme(url) == "file":
        url = url[len(_SCHEME.match(url)[0]) :]
    if not is_remote(url):
        return str(Path(url).expanduser().resolve())
    _protocol_class(url)
    return url.rstrip("/")


def join(base: str, *names: str) -> str:
    """``base/name/…`` for a local path or a URL."""
    return os.path.join(base, *names) if not is_remote(base) else "/".join([base, *names])


def check_writable(url: str) -> None:
    """Raise StorageError for a URL that cannot be written (http and https are read-only)."""
    if scheme(url) in READ_ONLY:
        raise StorageError(f"{url} is read-only ({scheme(url)}); write to a path, s3:// or gs://")


# ---------------------------------------------------------------- storage options


class StorageOptions:
    """Storage options in transit to another process (Ray actor, train worker, DataLoader
    worker), with the sender's patience. They pickle with their values, so the receiver can
    :func:`adopt` them, but never print them: ``repr``, ``str`` and JSON (``default=str``)
    show the keys only."""

    def __init__(self, options: dict, patience_s: float = PATIENCE_S):
        self._options = dict(options)
        self.patience_s = patience_s

    def __repr__(self) -> str:
        return f"StorageOptions(keys={sorted(self._options)}, values redacted)"

    __str__ = __repr__

    def as_dict(self) -> dict:
        return dict(self._options)


_options: dict = {}


def set_storage_options(options: dict) -> None:
    """The fsspec options every remote URL of this process opens with (replaces earlier ones)."""
    global _options
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise StorageError("storage options must be a dict of str keys (KEY=VALUE)")
    _options = dict(options)


def storage_options() -> dict:
    """A copy of this process's storage options."""
    return dict(_options)


def parse_storage_options(pairs: list[str]) -> dict:
    """``["KEY=VALUE", …]`` → dict; a VALUE that parses as JSON (true, 3, {…}) is that value."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option takes KEY=VALUE (got {pair.split('=')[0]!r}…)")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def carry() -> StorageOptions:
    """This process's storage options, packed for another process (see StorageOptions)."""
    return StorageOptions(_options, _patience_s)


def adopt(carried: StorageOptions | None) -> None:
    """Make ``carried`` (from :func:`carry` in the sender) this process's storage options."""
    if carried is not None:
        set_storage_options(carried.as_dict())
        set_patience(carried.patience_s)


_patience_s = PATIENCE_S


def set_patience(seconds: float) -> None:
    """How long this process waits on one storage request that gets no answer before it fails
    (default 180 s; uploads get ``seconds + size / SLOWEST_UPLOAD_BPS``). The client timeouts
    (:func:`client_defaults`) are what end a stalled read; keep them within it."""
    global _patience_s
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise StorageError(
            f"the storage patience must be a positive number of seconds, got {seconds!r}"
        )
    _patience_s = float(seconds)


def patience() -> float:
    """This process's patience with storage, in seconds (:func:`set_patience`)."""
    return _patience_s


def upload_limit_s(nbytes: int) -> float:
    """The longest an upload of ``nbytes`` may take before it is taken for a stalled endpoint."""
    return _patience_s + nbytes / SLOWEST_UPLOAD_BPS


# ---------------------------------------------------------------- waiting on storage

WAIT_REPORT_S = 60.0  # the heartbeat's period: a line per minute while a call is blocked


class _Watch:
    """A thread that calls ``report(url, seconds)`` each time a storage call of this process
    has waited another ``every_s`` seconds (the outermost call of each thread)."""

    def __init__(self, report: Callable[[str, float], None], every_s: float) -> None:
        self.report, self.every_s = report, every_s
        self.waits: dict[int, list] = {}  # id -> [url, start, periods reported]
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="salient-storage-wait", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(min(1.0, self.every_s / 4)):
            now = time.monotonic()
            with self.lock:
                waits = list(self.waits.values())
            for wait in waits:
                periods = int((now - wait[1]) // self.every_s)
                if periods > wait[2]:
                    wait[2] = periods
                    with contextlib.suppress(Exception):  # a heartbeat never breaks the job
                        self.report(wait[0], periods * self.every_s)

    @contextlib.contextmanager
    def waiting(self, url: str) -> Iterator[None]:
        key = object()
        with self.lock:
            self.waits[id(key)] = [url, time.monotonic(), 0]
        try:
            yield
        finally:
            with self.lock:
                del self.waits[id(key)]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


_watch: _Watch | None = None
_inside = threading.local()  # .depth: storage calls of this thread inside one another


def _watch_in_child() -> None:
    """A forked child (a DataLoader worker) keeps the parent's report, with a watcher of its
    own: the parent's thread did not come along, and its lock may have been held at fork."""
    global _watch
    if _watch is not None:
        _watch = _Watch(_watch.report, _watch.every_s)


os.register_at_fork(after_in_child=_watch_in_child)


def on_wait(report: Callable[[str, float], None] | None, every_s: float = WAIT_REPORT_S) -> None:
    """While a storage call of this process has waited ``every_s``, ``2·every_s``, … seconds,
    call ``report(url, seconds)`` from a watcher thread (a job prints ``waiting on URL for 60
    s``). ``None`` stops reporting. Calls are the blocks of :func:`storage_errors` (every
    method marked :func:`on_storage`, every function of this module) and each read of a
    stream from :func:`open_read`; a stalled call ends within the :func:`patience` with a
    StorageError."""
    global _watch
    if _watch is not None:
        _watch.stop()
    _watch = None if report is None else _Watch(report, every_s)


@contextlib.contextmanager
def _waiting(url: str) -> Iterator[None]:
    """Register the outermost storage call of this thread with the watcher, if any."""
    watch, depth = _watch, getattr(_inside, "depth", 0)
    if watch is None or depth:
        yield
        return
    _inside.depth = 1
    try:
        with watch.waiting(url):
            yield
    finally:
        _inside.depth = 0


class _WatchedStream:
    """A binary stream whose reads are storage calls for :func:`on_wait`."""

    def __init__(self, stream, url: str) -> None:
        self._stream, self._url = stream, url

    def read(self, *args):
        with _waiting(self._url):
            return self._stream.read(*args)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()


# ---------------------------------------------------------------- errors


_STALLS = {"ReadTimeoutError", "ServerTimeoutError", "FSTimeoutError", "TimeoutError"}


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _cause(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    names = _names(exc)
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return (
            "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a "
            "profile in ~/.aws, GOOGLE_APPLICATION_CREDENTIALS for gs://), or pass "
            "--storage-option key=… --storage-option secret=…"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
        return f"the endpoint cannot be reached ({text}); check AWS_ENDPOINT_URL and the network"
    if names & _STALLS:
        return (
            f"the endpoint stopped answering ({text[:120]}); nothing half-written was "
            f"published: rerun when it answers (a request waits at most about {_patience_s:.0f}"
            " s: see --storage-option)"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full ({text}); free space or write elsewhere, then rerun"
    if isinstance(exc, PermissionError):
        return f"access denied ({text}); check the credentials and the bucket's permissions"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text}); check the bucket and the path"
    return f"{type(exc).__name__}: {text}"


def _rejected_option(exc: BaseException) -> str | None:
    """The storage option a client refused (``TypeError: … unexpected keyword argument 'x'``,
    raised when the client first connects), or None."""
    if not isinstance(exc, TypeError):
        return None
    match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    return match.group(1) if match and match.group(1) in _options else None


def as_storage_error(url: str, exc: BaseException) -> StorageError | None:
    """``exc`` as one StorageError naming ``url`` when it is a failure of the storage (OSError,
    botocore / aiohttp / google errors); None for anything else."""
    if isinstance(exc, SalientError):
        return None
    option = _rejected_option(exc)
    if option is not None:
        return StorageError(
            f"{url}: --storage-option {option} is not an option of the {scheme(url)}:// client "
            f"({str(exc).splitlines()[0][:200]}); see its filesystem's arguments "
            "(s3fs.S3FileSystem, gcsfs.GCSFileSystem; e.g. config_kwargs={...} for botocore)"
        )
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, OSError) or module in {"botocore", "aiobotocore", "aiohttp", "google"}:
        error = StorageError(f"{url}: {_cause(exc)}")
        error.stalled = bool(_names(exc) & _STALLS)
        return error
    return None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Storage failures inside the block become one StorageError naming ``url``; a heartbeat
    is reported while the block waits (:func:`on_wait`)."""
    with _converted(url), _waiting(url):
        yield


@contextlib.contextmanager
def _converted(url: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        error = as_storage_error(url, exc)
        if error is None:
            raise
        raise error from None


def on_storage(method):
    """Decorate a method of an object with a ``url``: storage failures inside it become one
    StorageError naming that URL."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with storage_errors(self.url):
            return method(self, *args, **kwargs)

    return guarded


# ---------------------------------------------------------------- filesystems


def _protocol_class(url: str):
    """The fsspec class of ``url``'s scheme; StorageError naming the extra when it is missing."""
    import fsspec

    name = scheme(url)
    try:
        return fsspec.get_filesystem_class(name)
    except ImportError as exc:
        extra = EXTRAS.get(name)
        hint = f"pip install 'salient[{extra}]'" if extra else str(exc)
        raise StorageError(f"{url}: no client for {name}:// is installed; {hint}") from None
    except ValueError:
        raise StorageError(
            f"{url}: unknown URL scheme {name!r}; use a local path, file://, s3://, gs:// "
            "or http(s)://"
        ) from None


# INFO lines on where the S3 client found its keys and endpoint, one per client per process
# (every Ray worker): kept out of the job's output; warnings still show.
_CHATTY = ("botocore.credentials", "aiobotocore.credentials", "botocore.configprovider")


def filesystem(url: str, asynchronous: bool = False):
    """``(fs, path)`` for a remote ``url``, opened with the storage options and salient's retry
    budget (``asynchronous``: a filesystem for an event loop, as zarr's FsspecStore takes)."""
    import fsspec

    _protocol_class(url)
    extra = {"asynchronous": True} if asynchronous else {}
    with storage_errors(url):
        fs, path = fsspec.core.url_to_fs(url, **fsspec_options(url), **extra)
    if "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        # s3fs wraps each call in `retries` tries (a class attribute, not an option), twice
        # over for a GET: its default 5 makes 25 tries of botocore's attempts (docs/
        # LIBRARY-NOTES.md, "Object storage clients retry inside each other").
        fs.retries = S3FS_TRIES
    return fs, path


def fsspec_options(url: str | None = None) -> dict:
    """The fsspec options of a remote filesystem (what zarr's FsspecStore is given too): the
    client's timeouts for ``url``'s scheme, then this process's storage options on top (a
    dict-valued option such as ``config_kwargs`` is merged key by key at every depth, so
    ``--storage-option config_kwargs='{"read_timeout": 60}'`` keeps the other defaults)."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    return _merged({**_DEFAULTS, **client_defaults(scheme(url) if url else None)}, _options)


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; dicts in both are merged key by key, at every depth."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        both = isinstance(below, dict) and isinstance(value, dict)
        out[key] = _merged(below, value) if both else copy.deepcopy(value)
    return out


# ---------------------------------------------------------------- reading


def open_read(url: str):
    """A binary file object to stream ``url`` from (read-ahead in large blocks when remote);
    its reads report to :func:`on_wait` when a watcher is on."""
    with storage_errors(url):
        if not is_remote(url):
            stream = open(url, "rb")  # noqa: SIM115 (the caller closes it)
        else:
            fs, path = filesystem(url)
            stream = fs.open(path, "rb", block_size=16 * 2**20, cache_type="readahead")
    return stream if _watch is None else _WatchedStream(stream, url)


def read_bytes(url: str) -> bytes | None:
    """The whole object at ``url``, or None when there is nothing there (or no bucket)."""
    with storage_errors(url):
        try:
            if not is_remote(url):
                return Path(url).read_bytes()
            fs, path = filesystem(url)
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None


def list_names(url: str) -> list[str]:
    """Names directly under ``url`` (files and folders), sorted; [] when there is nothing."""
    with storage_errors(url):
        if not is_remote(url):
            return sorted(os.listdir(url)) if os.path.isdir(url) else []
        fs, path = filesystem(url)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []


def sizes(root: str, names: list[str]) -> dict[str, int | None]:
    """Byte size of each ``root/name`` (None when missing): one listing on object storage,
    one HEAD per name over http(s), which cannot list."""
    with storage_errors(root):
        if not is_remote(root):
            paths = {n: os.path.join(root, n) for n in names}
            return {n: os.path.getsize(p) if os.path.isfile(p) else None for n, p in paths.items()}
        fs, path = filesystem(root)
        if scheme(root) in READ_ONLY:
            return {n: _http_size(fs, join(root, n)) for n in names}
        found = {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(path, detail=True)}
        return {n: found.get(n) for n in names}


def _http_size(fs, url: str) -> int | None:
    try:
        return fs.size(url)
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def staged(url: str) -> Iterator[str]:
    """A local file path to write ``url``'s content into; when the block ends without error the
    file becomes ``url`` in one step (a rename locally, one upload under the final key on
    object storage). On error nothing appears at ``url``: a failure to write the file (a full
    disk) is a StorageError naming ``url``, and a failure to remove it then is a note on it."""
    check_writable(url)
    if is_remote(url):
        handle, tmp = tempfile.mkstemp(prefix="salient-", suffix=".partial")
        os.close(handle)
    else:
        head, name = os.path.split(url)
        tmp = os.path.join(head, f".{name}.partial")
    try:
        with _converted(url):  # writing the staged file: its storage failures are url's
            yield tmp
        with storage_errors(url):
            if is_remote(url):
                _upload(tmp, url)
            else:
                os.replace(tmp, url)
    except BaseException as error:  # the first error propagates; a failed removal is a note
        cleanup_after(error, lambda: _discard(tmp), f"removing the staged file {tmp}")
        raise
    _discard(tmp)  # the upload's local copy (a rename left nothing)


def _upload(tmp: str, url: str) -> None:
    """``tmp`` uploaded as ``url``, cancelled after :func:`upload_limit_s` of its size."""
    fs, path = filesystem(url)
    size = os.path.getsize(tmp)
    if not getattr(fs, "async_impl", False):  # a blocking client: its own timeouts decide
        fs.put_file(tmp, path)
        return
    from fsspec.asyn import sync  # fsspec's loop runner: it cancels the upload on timeout

    try:
        sync(fs.loop, fs._put_file, tmp, path, timeout=upload_limit_s(size))
    except TimeoutError:  # fsspec's FSTimeoutError; the partial upload never became `url`
        error = StorageError(
            f"{url}: the endpoint stopped answering: an upload of {size} bytes did not finish "
            f"within {upload_limit_s(size):.0f} s; nothing was written under that name — "
            "rerun when it answers"
        )
        error.stalled = True
        raise error from None


def _discard(path: str) -> None:
    with storage_errors(path), contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` whole: a rename locally, one PUT on object storage."""
    with staged(url) as tmp:
        Path(tmp).write_bytes(data)


def remove(url: str) -> None:
    """Delete the file or object at ``url`` (nothing when it is absent)."""
    with storage_errors(url):
        if not is_remote(url):
            Path(url).unlink(missing_ok=True)
            return
        fs, path = filesystem(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
