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
cause. Importing this module touches no disk and imports no fsspec client.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from salient.errors import SalientError

__all__ = [
    "StorageError",
    "StorageOptions",
    "adopt",
    "as_storage_error",
    "carry",
    "check_writable",
    "filesystem",
    "fsspec_options",
    "is_remote",
    "join",
    "list_names",
    "normalise",
    "on_storage",
    "open_read",
    "parse_storage_options",
    "read_bytes",
    "remove",
    "set_storage_options",
    "sizes",
    "staged",
    "storage_errors",
    "storage_options",
    "write_bytes",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # scheme -> pip extra
READ_ONLY = frozenset({"http", "https"})
# Listings are read again every time: another process (a refresh) may have added a generation.
_DEFAULTS = {"use_listings_cache": False}


class StorageError(SalientError):
    """A URL that cannot be used: unknown scheme, client not installed, not reachable, denied."""


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
    worker). They pickle with their values, so the receiver can :func:`adopt` them, but never
    print them: ``repr``, ``str`` and JSON (``default=str``) show the keys only."""

    def __init__(self, options: dict):
        self._options = dict(options)

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
    return StorageOptions(_options)


def adopt(carried: StorageOptions | None) -> None:
    """Make ``carried`` (from :func:`carry` in the sender) this process's storage options."""
    if carried is not None:
        set_storage_options(carried.as_dict())


# ---------------------------------------------------------------- errors


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
        return StorageError(f"{url}: {_cause(exc)}")
    return None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Storage failures inside the block become one StorageError naming ``url``."""
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


def filesystem(url: str):
    """``(fs, path)`` for a remote ``url``, opened with the storage options."""
    import fsspec

    _protocol_class(url)
    with storage_errors(url):
        return fsspec.core.url_to_fs(url, **fsspec_options())


def fsspec_options() -> dict:
    """The fsspec options of a remote filesystem (what zarr's FsspecStore is given too)."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    return {**_DEFAULTS, **_options}


# ---------------------------------------------------------------- reading


def open_read(url: str):
    """A binary file object to stream ``url`` from (read-ahead in large blocks when remote)."""
    with storage_errors(url):
        if not is_remote(url):
            return open(url, "rb")  # the caller closes it
        fs, path = filesystem(url)
        return fs.open(path, "rb", block_size=16 * 2**20, cache_type="readahead")


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
    object storage). On error nothing appears at ``url``."""
    check_writable(url)
    if is_remote(url):
        handle, tmp = tempfile.mkstemp(prefix="salient-", suffix=".partial")
        os.close(handle)
    else:
        head, name = os.path.split(url)
        tmp = os.path.join(head, f".{name}.partial")
    try:
        yield tmp
        with storage_errors(url):
            if is_remote(url):
                fs, path = filesystem(url)
                fs.put_file(tmp, path)
            else:
                os.replace(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
