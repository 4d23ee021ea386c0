"""fsspec helpers: one way to open, read ranges, hash and write any URI.

Local paths, ``file://`` and ``s3://`` (s3fs, configured by the usual AWS settings)
all go through :func:`resolve`. Credentials are never part of a URI we log.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from so8t_core.errors import InputChangedError, StorageAccessError, StorageError, UnsupportedError

T = TypeVar("T")

# The S3 client stack logs signed request headers (the access key id, the signature) at
# DEBUG: credentials must never reach a log, whatever level the root logger is set to.
WIRE_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs")
for _wire_logger in WIRE_LOGGERS:
    logging.getLogger(_wire_logger).setLevel(logging.INFO)

CHUNK = 8 << 20

# Object stores fail a share of requests (HTTP 500/503, dropped connections) as a matter of
# course. botocore's "standard" retry mode retries those with exponential backoff and jitter;
# 10 attempts make a request that fails one time in five come through all but once in 10^7.
# The timeouts bound a stalled connection. (docs/reliability.md measures this.)
S3_CLIENT_CONFIG = {"retries": {"max_attempts": 10, "mode": "standard"}, "connect_timeout": 10,
                    "read_timeout": 60}


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI → (filesystem, path). Local paths become absolute."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    else:
        refuse_credentials(uri)
    options = {"config_kwargs": S3_CLIENT_CONFIG} if uri.startswith(("s3://", "s3a://")) else {}
    try:
        return url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(uri, f"cannot open this location ({exc})",
                           "use a local path, file://, or s3:// with s3fs installed") from None


def redact_uri(uri: str) -> str:
    """``uri`` without credentials (``s3://key:secret@bucket/x`` → ``s3://bucket/x``) or query."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def refuse_credentials(uri: str) -> None:
    """A URI with credentials in it (``s3://key:secret@bucket/x``) is refused, and the error names
    it without them: credentials belong in the environment or a profile, never in a URI that
    logs, manifests and error messages repeat."""
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        raise UnsupportedError(redact_uri(uri), "credentials in the URI are not accepted",
                           "remove them; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead")


# --- Names that become paths ------------------------------------------------------------------

# A model name, a quant folder, a release's file or version: one path component that means the
# same on every store (no separators, no "." or "..", nothing hidden, nothing a shell or another
# OS reads differently), short enough for the suffixes added to it (``-Q4_K_M.validation.json``).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_RULE = "not a plain name: use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit"
_NAME_RE = re.compile(NAME_PATTERN)


def is_plain_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: object, where: str, hint: str = "it names a folder and files; e.g. my-model") -> str:
    """``name`` when it is a plain name (:data:`NAME_PATTERN`), else a one-line error naming
    ``where`` it came from: the rule every name that becomes a path follows, wherever it comes
    from (an option, a catalog, a source folder, a manifest, latest.json)."""
    if not is_plain_name(name):
        shown = name if isinstance(name, str) and len(name) <= 80 else repr(name)[:80]
        raise UnsupportedError(f"{where} {shown}".strip(), NAME_RULE, hint)
    return name  # type: ignore[return-value]


def same_but_case(names, name: str) -> str | None:
    """The entry of ``names`` that is ``name`` but for letter case (``Model`` for ``model``), or
    None: on case-insensitive storage (macOS, Windows, some NAS shares) both are one folder."""
    folded = name.casefold()
    return next((n for n in names if n != name and n.casefold() == folded), None)


def member(folder: str, name: str, hidden: bool = False) -> str:
    """The URI of ``name`` in ``folder``: a plain name (never a path; with ``hidden``, also a plain
    name after one leading '.', for our own staging and locks), and for a local folder one that
    resolves inside it (not through a symbolic link planted in it). What publishing writes and
    removes always goes through here."""
    check_name(name[1:] if hidden and name.startswith(".") else name, f"{redact_uri(folder)}: entry")
    uri = join(folder, name)
    if is_local(folder):
        root = os.path.realpath(local_path(folder))
        target = os.path.realpath(local_path(uri))
        if os.path.dirname(target) != root:
            raise StorageError(local_path(uri), "resolves outside its folder (a symbolic link)",
                               "remove the link; so8t-gguf writes only inside the release folder")
    return uri


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local filesystem path for a local URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _access_errors(uri):
        return fs.exists(path)


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    with _access_errors(uri):
        return fs.isfile(path)


def size(uri: str) -> int:
    fs, path = resolve(uri)
    try:
        with _access_errors(uri):
            return int(fs.size(path))
    except FileNotFoundError:
        raise StorageError(uri, "file not found") from None


CREDENTIALS_HINT = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and what "
                    "they may do")


def _in_the_way(path: str) -> str | None:
    """The file that stands where local folder ``path`` or a folder above it must be, if any."""
    while not os.path.isdir(path):
        if os.path.lexists(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None


@contextmanager
def _access_errors(uri: str, writing: bool = False) -> Iterator[None]:
    """Storage refusing ``uri`` for a reason that retrying cannot change becomes one line naming
    it, a StorageAccessError, which tasks do not retry: no permission or bad credentials, a file
    where a folder must be, a read-only or full file system, (``writing`` to an object store) a
    missing bucket. Other failures pass through: they may be transient."""
    try:
        yield
    except PermissionError as e:
        if is_local(uri) and writing:
            raise StorageAccessError(local_path(uri), f"cannot write there ({e.strerror or 'permission denied'})",
                                     "choose a location you can write to") from None
        if is_local(uri):
            raise StorageAccessError(local_path(uri), "permission denied", "check the file's permissions") from None
        raise StorageAccessError(redact_uri(uri), f"access denied ({_first_line(e)})", CREDENTIALS_HINT) from None
    except (NotADirectoryError, FileExistsError):
        blocker = _in_the_way(os.path.dirname(local_path(uri))) if is_local(uri) else None
        if blocker is None:
            raise
        raise StorageAccessError(blocker, "is a file, not a folder", "choose another location, or move the file "
                                                                     "away") from None
    except FileNotFoundError as e:
        if not writing or is_local(uri):
            raise
        bucket = urlsplit(uri).netloc
        raise StorageAccessError(redact_uri(uri), f"cannot write there ({_first_line(e)})",
                                 f"check that the bucket {bucket} exists and the URI is right") from None
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageAccessError(local_path(uri) if is_local(uri) else redact_uri(uri),
                                 f"cannot write there ({e.strerror})", "choose another location") from None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text[:160]


def check_writable(uri: str) -> None:
    """Refuse, before any work, a destination that cannot be written: a probe object is created
    under it and removed. Locally the nearest folder that exists (``uri`` itself, or a folder
    above it, so that nothing is left behind) takes the probe, and no file may stand where a
    folder must be; on an object store the bucket must exist and the credentials must allow
    writing and deleting. A StorageAccessError (one line) otherwise."""
    if is_local(uri):
        path = local_path(uri)
        blocker = _in_the_way(path)
        if blocker is not None:
            raise StorageAccessError(blocker, "is a file, not a folder", "choose a folder to publish into")
        folder = path
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        with _access_errors(folder, writing=True):
            fd, probe = tempfile.mkstemp(prefix=".so8t-probe-", dir=folder)
            os.close(fd)
            os.remove(probe)
        return
    fs, path = resolve(uri)
    probe = posixpath.join(path.rstrip("/"), f".so8t-probe-{uuid.uuid4().hex[:12]}")
    with _access_errors(uri, writing=True):
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        finally:
            fs.invalidate_cache(path)


@contextmanager
def _file_errors(uri: str) -> Iterator[None]:
    """A file that is missing, a folder, or not ours to read: one-line errors naming it."""
    try:
        with _access_errors(uri):
            yield
    except FileNotFoundError:
        raise StorageError(uri, "file not found") from None
    except (IsADirectoryError, NotADirectoryError):
        raise StorageError(uri, "is a folder, not a file", "check the path") from None


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, path = resolve(uri)
    with _file_errors(uri):
        data = fs.cat_file(path, start=start, end=end)
    if start is not None and end is not None and len(data) != end - start:
        raise StorageError(uri, f"short read: wanted bytes {start}..{end}, got {len(data)}",
                           "the file changed or is truncated")
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def identity(uri: str) -> str | None:
    """What identifies this version of a file without reading it (size plus mtime/inode, or the
    object store's ETag), or None when the store says nothing usable."""
    fs, path = resolve(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    marks = [str(info.get(k)) for k in ("size", "ETag", "etag", "LastModified", "mtime", "ino") if info.get(k)]
    return "|".join(marks) if len(marks) >= 2 else None


def sha256_of(uri: str) -> str:
    fs, path = resolve(uri)
    h = hashlib.sha256()
    with _file_errors(uri), fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def list_names(uri: str) -> list[str]:
    """The names of the entries (files and folders) directly in the folder ``uri``; [] when absent."""
    fs, path = resolve(uri)
    fs.invalidate_cache(path)
    try:
        with _access_errors(uri):
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    with _access_errors(uri, writing=True):
        fs.makedirs(path, exist_ok=True)


@contextmanager
def local_atomic_file(path: str) -> Iterator[str]:
    """Yield a temp path next to ``path``; rename it into place only on success."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique: threads of one process too
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see the old content or the new, never half."""
    with _access_errors(uri, writing=True):
        if is_local(uri):
            with local_atomic_file(local_path(uri)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
            return
        fs, path = resolve(uri)
        fs.pipe_file(path, data)  # object stores replace whole objects atomically


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write a whole object only if none is there: True when this call created it, False when one
    existed (ours or another writer's; read it to tell). Exclusive on local folders (a hard link,
    which fails if the name exists) and on S3 (a conditional PUT, ``If-None-Match: *``)."""
    with _access_errors(uri, writing=True):
        return _create_exclusive(uri, data)


def _create_exclusive(uri: str, data: bytes) -> bool:
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:  # complete content before the name appears
                f.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    fs, path = resolve(uri)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:  # 412 Precondition Failed: an object was there (maybe ours, if a retry)
        return False
    except OSError:
        fs.invalidate_cache(path)
        if fs.exists(path):  # s3fs versions that map 412 to a plain OSError
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


def upload_file(local: str, uri: str) -> None:
    """Copy a local file to ``uri`` (atomically for local destinations)."""
    with _access_errors(uri, writing=True):
        if is_local(uri):
            with local_atomic_file(local_path(uri)) as tmp:
                shutil.copyfile(local, tmp)
            return
        fs, path = resolve(uri)
        fs.put_file(local, path)


def download_file(uri: str, local: str) -> None:
    """Copy the file at ``uri`` to the local path ``local``, as it comes: callers download to a
    temporary name and rename it into place once they have checked it."""
    fs, path = resolve(uri)
    with _file_errors(redact_uri(uri)):
        fs.get_file(path, local)


def copy(src: str, dst: str) -> None:
    """Copy a file within one store: a hard link locally (files here are replaced by renames,
    never written in place, so a link is a copy), else a copy; a server-side copy on object stores."""
    with _access_errors(dst, writing=True):
        if is_local(src) and is_local(dst):
            with local_atomic_file(local_path(dst)) as tmp:
                try:
                    os.link(local_path(src), tmp)
                except OSError:  # links not supported here (or another device): copy the bytes
                    shutil.copyfile(local_path(src), tmp)
            return
        fs, src_path = resolve(src)
        _, dst_path = resolve(dst)
        fs.copy(src_path, dst_path)


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        with _access_errors(uri):
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        with _access_errors(uri):
            if fs.exists(path):
                fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def move(src: str, dst: str) -> None:
    """Move a file within one store (a rename locally, copy-then-delete on object stores)."""
    with _access_errors(dst):
        if is_local(src) and is_local(dst):
            os.makedirs(os.path.dirname(local_path(dst)), exist_ok=True)
            os.replace(local_path(src), local_path(dst))
            return
        fs, src_path = resolve(src)
        _, dst_path = resolve(dst)
        fs.mv(src_path, dst_path)


def new_folder(uri: str, force: bool = False) -> None:
    """Make ready a folder a command fills from scratch (a checkpoint it writes): one that exists
    must be empty, so that a typo cannot mix new files into another model's folder, unless
    ``force``, which empties it first; a file where the folder must be, or a location that
    cannot be written, is a one-line error."""
    check_writable(uri)
    if is_local(uri) and not os.path.isdir(local_path(uri)):
        return
    names = [n for n in list_names(uri) if not n.startswith(".so8t-probe-")]
    if not names:
        return
    if not force:
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        raise UnsupportedError(local_path(uri) if is_local(uri) else redact_uri(uri),
                               f"is not empty ({len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown})",
                               "choose a new folder, or pass --force to replace what is in it")
    for name in names:
        remove_tree(join(uri, name))


def default_cache_dir() -> str:
    """Where so8t-gguf caches what it can compute again (work files, converted shards, demo)."""
    return os.environ.get("SO8T_GGUF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "so8t-gguf"))


def local_output_file(uri: str, suffix: str, what: str) -> str:
    """The local path a command writes one file to (``--output NAME<suffix>``), checked before
    any work: a local path or ``file://`` URL whose name ends in ``suffix``, not a folder, in a
    folder that exists or can be made, and can be written (a probe is created and removed).
    ``what``: the file, for messages ("the ONNX file")."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path:
        raise UnsupportedError(uri, f"{what} is written to a local path only",
                               "write it locally, then copy it (e.g. with the aws CLI)")
    if not path.endswith(suffix):
        raise UnsupportedError(uri, f"the output file name must end in {suffix}", f"e.g. --output model{suffix}")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise StorageError(path, "is a folder", f"give a file name ending in {suffix}")
    folder = os.path.dirname(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise StorageError(folder, "is a file, not a folder", "choose a folder for --output")
    try:  # before the work, which can take minutes: can a file be written there?
        os.makedirs(folder, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".so8t-probe-", dir=folder))
    except OSError as e:
        raise StorageError(folder, f"cannot write there ({e.strerror or type(e).__name__})",
                           "choose a writable folder for --output") from None
    return path


class Pinned(Generic[T]):
    """``load`` (URI → an object with a ``sha256``) cached per process and pinned to the sha256
    the flow saw when it checked the file: tasks each need part of the same file (an imatrix's
    entries, an adapter's pairs) and read it once; a file that changed since is an error, not
    silently another file. ``what``: the file, for the message ("the imatrix file").

    Pickled (to a Dask worker) as its recipe, so each process gets its own cache."""

    def __init__(self, load: Callable[[str], T], what: str, maxsize: int = 4) -> None:
        self.load, self.what, self.maxsize = load, what, maxsize
        self._cached = functools.lru_cache(maxsize=maxsize)(self._load)

    def _load(self, uri: str, sha256: str) -> T:
        loaded = self.load(uri)
        if loaded.sha256 != sha256:
            raise InputChangedError(redact_uri(uri), f"{self.what} changed during the run", "run the conversion again")
        return loaded

    def __call__(self, uri: str, sha256: str) -> T:
        return self._cached(uri, sha256)

    def __reduce__(self):
        return (Pinned, (self.load, self.what, self.maxsize))
