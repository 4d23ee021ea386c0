"""Published models as llama.cpp needs them: local files, from any fsspec URL.

``chat``, ``inspect``, ``validate`` and ``heads`` name a model as a GGUF file, a release folder
(the model file of the version its ``current.json`` names; or a version folder itself) or a
model folder with ``latest.json`` (the latest release of a quant), as a
path, ``file://`` or ``s3://`` URL. llama.cpp reads local files only: a remote file is
downloaded once into the cache (``<cache>/downloads/<sha256>/``), checked against the sha256
its release's manifest lists, and moved into place only then, so a file in the cache is a
verified copy and the next command finds it there. A split model comes whole (every shard, in
one folder, as llama.cpp loads the set through the first).
"""

from __future__ import annotations

import hashlib
import os

from so8t_core import storage
from so8t_core.constants import MANIFEST_NAME, release_label
from so8t_core.errors import StorageError
from so8t_core.gguf_file import split_paths
from so8t_core.publish.release import LATEST_NAME, current_version, latest_release, read_latest, read_manifest

SIDECAR_SUFFIX = ".so8t-heads.gguf"
MODEL_HINT = "pass a .gguf file, a release folder or a model folder with latest.json (a path, file:// or s3://)"


def model_gguf(uri: str, quant: str | None = None) -> str:
    """The local path of the model GGUF that ``uri`` names: a .gguf file itself, a release folder
    (its model file; the first of a split set), or a model folder with latest.json (the latest
    release of ``quant``, any case). Remote files are downloaded into the cache, verified."""
    where = storage.redact_uri(uri)
    if not storage.exists(uri):
        raise StorageError(where, "does not exist", "check the path")
    if storage.is_file(uri):
        return local_gguf(uri)
    if storage.exists(storage.join(uri, LATEST_NAME)):
        uri = _latest(uri, quant)
    version = current_version(uri)  # the version the release's current.json names (or a version folder)
    if version is None:
        raise StorageError(where, "neither a GGUF file nor a complete release (no current.json naming a version "
                           f"with its {MANIFEST_NAME})", MODEL_HINT)
    manifest = version.manifest
    models = sorted(n for n in manifest["files"] if n.endswith(".gguf") and not n.endswith(SIDECAR_SUFFIX))
    if not models:
        raise StorageError(where, "the release lists no model GGUF", f"check its {MANIFEST_NAME}")
    if storage.is_local(uri):  # a split model loads through its first shard
        return storage.local_path(storage.member(version.folder, models[0]))
    return _download(version.folder, models, manifest)[0]


def local_gguf(uri: str) -> str:
    """A GGUF file (any URL) as a local path; a remote one (with the rest of its split set) is
    downloaded into the cache, verified against its release's manifest when it is in one."""
    where = storage.redact_uri(uri)
    if not storage.is_file(uri):
        raise StorageError(where, "does not exist" if not storage.exists(uri) else "is a folder, not a GGUF file",
                           "check the path")
    if storage.is_local(uri):
        return storage.local_path(uri)
    folder, name = uri.rstrip("/").rsplit("/", 1)
    names = [os.path.basename(p) for p in split_paths(name)]  # the whole set, when this is a shard
    manifest = read_manifest(folder)
    if manifest is not None and all(n in manifest.get("files", {}) for n in names):
        return _download(folder, names, manifest)[names.index(name)]
    return _download(folder, names, None)[names.index(name)]


def _latest(model_folder: str, quant: str | None) -> str:
    """The release latest.json names for ``quant`` in ``model_folder``."""
    dest, model = model_folder.rstrip("/").rsplit("/", 1) if "://" in model_folder else \
        os.path.split(storage.local_path(model_folder))
    quants = sorted((read_latest(dest, model) or {}).get("quants") or {})
    where = storage.redact_uri(model_folder)
    if quant is None:
        raise StorageError(where, f"a model folder: which quant? (published: {', '.join(quants) or 'none'})",
                           f"pass --quant {quants[0]}" if quants else "publish a release first")
    name = release_label(quant)
    if name not in quants:
        raise StorageError(where, f"no release of {name} (published: {', '.join(quants) or 'none'})",
                           f"choose one of {', '.join(quants)}" if quants else "publish a release first")
    release = latest_release(dest, model, name)
    if release is None:  # an entry naming no plain <fingerprint>/<quant>/ folder
        raise StorageError(where, f"latest.json's {name} entry names no release folder", "publish the model again")
    return release


def _download(folder: str, names: list[str], manifest: dict | None) -> list[str]:
    """Local copies of ``folder/<name>`` for each of ``names``, in one cache folder: named by the
    first file's sha256 in ``manifest`` (each file checked against it), or without a manifest by
    the URI and what the store says identifies this version (size, ETag)."""
    files = (manifest or {}).get("files", {})
    if manifest is not None:
        key = files[names[0]]["sha256"]
    else:
        marks = [f"{n}|{storage.identity(storage.join(folder, n))}" for n in names]
        key = hashlib.sha256("\n".join([storage.redact_uri(folder), *marks]).encode()).hexdigest()
    local_folder = os.path.join(storage.default_cache_dir(), "downloads", key)
    os.makedirs(local_folder, exist_ok=True)
    paths = []
    for name in names:
        local = os.path.join(local_folder, name)
        paths.append(local)
        if os.path.isfile(local):
            continue  # moved into place only after its check: a verified copy
        remote = storage.join(folder, name)
        part = f"{local}.part-{os.getpid()}"
        try:
            storage.download_file(remote, part)
            expected = files.get(name)
            if expected is not None and (os.path.getsize(part) != expected["size"]
                                         or storage.sha256_of(part) != expected["sha256"]):
                raise StorageError(storage.redact_uri(remote), f"the download does not match the release's "
                                   f"{MANIFEST_NAME} (size or sha256 differs)",
                                   "the release changed while it was read, or the store is corrupt; run it again")
            os.replace(part, local)
        finally:
            if os.path.exists(part):
                os.remove(part)
    return paths
