"""fsspec helpers: one way to open, read ranges, hash and write any URI.

Local paths, ``file://`` and ``s3://`` (s3fs, configured by the usual AWS settings)
all go through :func:`resolve`. Credentials are never part of a URI we log.
"""

from __future__ import annotations

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
from typing import Callable, Iterator, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from so8t_core.errors import InputChangedError, StorageError, UnsupportedError

T = TypeVar("T")

# The S3 client stack logs signed request headers (the access key id, the signature) at
# DEBUG: credentials must never reach a log, whatever level the root logger is set to.
for _wire_logger in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs"):
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
    return fs.exists(path)


def size(uri: str) -> int:
    fs, path = resolve(uri)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        raise StorageError(uri, "file not found") from None


@contextmanager
def _file_errors(uri: str) -> Iterator[None]:
    """A file that is missing, a folder, or not ours to read: one-line errors naming it."""
    try:
        yield
    except FileNotFoundError:
        raise StorageError(uri, "file not found") from None
    except (IsADirectoryError, NotADirectoryError):
        raise StorageError(uri, "is a folder, not a file", "check the path") from None
    except PermissionError:
        raise StorageError(uri, "permission denied", "check the file's permissions, or the credentials") from None


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
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
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
    if is_local(uri):
        with local_atomic_file(local_path(uri)) as tmp:
            shutil.copyfile(local, tmp)
        return
    fs, path = resolve(uri)
    fs.put_file(local, path)


def copy(src: str, dst: str) -> None:
    """Copy a file within one store: a hard link locally (files here are replaced by renames,
    never written in place, so a link is a copy), else a copy; a server-side copy on object stores."""
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
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def move(src: str, dst: str) -> None:
    """Move a file within one store (a rename locally, copy-then-delete on object stores)."""
    if is_local(src) and is_local(dst):
        os.makedirs(os.path.dirname(local_path(dst)), exist_ok=True)
        os.replace(local_path(src), local_path(dst))
        return
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    fs.mv(src_path, dst_path)


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


def pinned(load: Callable[[str], T], what: str, maxsize: int = 4) -> Callable[[str, str], T]:
    """``load`` (URI → an object with a ``sha256``) cached per process and pinned to the sha256
    the flow saw when it checked the file: tasks each need part of the same file (an imatrix's
    entries, an adapter's pairs) and read it once; a file that changed since is an error, not
    silently another file. ``what``: the file, for the message ("the imatrix file")."""
    @functools.lru_cache(maxsize=maxsize)
    def load_pinned(uri: str, sha256: str) -> T:
        loaded = load(uri)
        if loaded.sha256 != sha256:
            raise InputChangedError(redact_uri(uri), f"{what} changed during the run", "run the conversion again")
        return loaded

    return load_pinned
