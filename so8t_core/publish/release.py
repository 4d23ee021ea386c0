"""Publishing releases atomically to any fsspec destination.

Layout (docs/architecture.md, Publishing):

    <dest>/<model>/latest.json                        for each quant, the release published last
    <dest>/<model>/<fingerprint[:16]>/<quant>/        one release (what latest.json and users name):
        current.json                                  the pointer: which version is the release now
        v-<id>/                                       an immutable version: GGUF file(s), stats,
                                                      validation, heads sidecar, analysis, README.md,
                                                      manifest.json

A published version is never modified in place. A version's folder is named after its manifest
(``v-`` + the first 16 hex digits of the manifest's sha256: same inputs, same version) and is
written once, under the release's lock: files moved in, then ``manifest.json`` (every file with
its size and sha256) last. The release changes only when ``current.json`` is replaced (one atomic
write) to name another complete version, so a reader sees the old version or the new one, never
neither and never a mix. Publishing:

1. does nothing when the current version's manifest is this one (and never replaces a validated
   version by an unvalidated one of the same bytes: that would only take the validation away);
2. uploads the files the current version does not hold with the same bytes under
   ``<release>/.staging-<id>/`` and reads each back (size, sha256): the slow part, outside the lock;
3. holding the release's lock (``<release>/.publish-lock``): moves the staged files into the new
   version, copies the unchanged ones from the current version (a server-side copy, a hard link
   locally), writes the version's manifest, then switches ``current.json``;
4. still under the lock, removes versions older than the one it replaced (that one stays, for
   readers still reading it) and what killed publishers of this host left.

``latest.json`` moves to the new release last, under the model folder's lock.

Every name that becomes a path here (a file of a manifest, a version) is a plain name
(storage.check_name), on write and on read: a manifest or pointer naming anything else is not a
release, and nothing outside the release folder is ever written or removed.

The locks make concurrent publishers take turns. A lock whose holder crashed is taken over (at
once when the holder was a process of this host, else after LOCK_STALE_SECONDS); taking over is
itself exclusive (see :func:`_take_over`), so two publishers that find the same stale lock
cannot both enter.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from so8t_core import storage
from so8t_core.constants import CONVERTER, MANIFEST_NAME, MODEL_CARD_NAME, bits_per_weight
from so8t_core.errors import So8tError, StorageError
from so8t_core.refs import FileRef, StagedTensor

LATEST_NAME = "latest.json"
POINTER_NAME = "current.json"
VERSION_PREFIX = "v-"
VERSION_CHARS = 16
LOCK_NAME = ".publish-lock"
STAGING_PREFIX = ".staging-"
# A holder on another host is presumed crashed after this long. Committing (moves within the
# store, two small writes) takes seconds; uploads happen before the lock is taken.
LOCK_STALE_SECONDS = 900
FINGERPRINT_CHARS = 16


def release_uri(dest: str, model: str, fingerprint: str, quant: str) -> str:
    return storage.join(dest, storage.check_name(model, "model name"), fingerprint[:FINGERPRINT_CHARS],
                        storage.check_name(quant, "quant"))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def release_manifest(name: str, quant: str, source_fingerprint: str, validation: dict | None,
                     staged: Sequence[StagedTensor], imatrix: dict | None = None,
                     lora: dict | None = None, tokenizer: dict | None = None,
                     evaluation: dict | None = None, recipe: dict | None = None) -> dict:
    """What a release's manifest says besides its files: the model, the quant, the source,
    the validation, the bake error per gated tensor, the importance matrix and LoRA adapter
    used (``imatrix``: its summary: sha256, entries, the tensors it had no entry for, and what
    it was computed on when the run computed it), and, when llama.cpp does not reproduce the
    tokenizer (converted with --allow-tokenizer-mismatch), the tokenizer check that says so
    (``tokenizer``: the analysis'), and the evaluation against the F32 model (``evaluation``:
    llama-perplexity's --kl-divergence statistics, the text and settings, the gates)."""
    manifest = {"name": name, "quant": quant, "converter": CONVERTER, "source_fingerprint": source_fingerprint,
                "validation": validation,
                "bake_errors": {s.gguf_name: s.bake_error for s in staged if s.bake_error is not None},
                "imatrix": imatrix}
    if staged:  # what the model card's table shows; only when there is something to weigh
        manifest["bits_per_weight"] = bits_per_weight(sum(s.nbytes for s in staged),
                                                      sum(s.n_elements for s in staged))
    if lora is not None:
        manifest["lora"] = lora
    if evaluation is not None:
        manifest["evaluation"] = evaluation
    if recipe is not None:  # a target mix (AUTO-<B>): its target, base mix and tensor-type file
        manifest["recipe"] = recipe
    if tokenizer is not None and not tokenizer["parity"]["ok"]:
        manifest["tokenizer_mismatch"] = tokenizer
    return manifest


def _check_file_names(names: Iterable[str], where: str) -> None:
    """A release's files are plain names, none of the release's own records, distinct even where
    letter case is not."""
    seen: dict[str, str] = {}
    for name in names:
        storage.check_name(name, f"{where}: file", "a release holds plain file names only")
        if name in (MANIFEST_NAME, POINTER_NAME, LATEST_NAME) or _is_version(name):
            raise StorageError(where, f"lists a file named {name}, a name the release's records use",
                               "rename the file")
        if (other := seen.setdefault(name.casefold(), name)) != name:
            raise StorageError(where, f"files {other} and {name} differ only in letter case",
                               "one file on case-insensitive storage; rename one")


def manifest_document(files: Mapping[str, FileRef], extra: Mapping[str, Any]) -> dict:
    _check_file_names(files, "manifest")
    return {**extra, "files": {n: {"sha256": r.sha256, "size": r.size} for n, r in sorted(files.items())}}


def version_name(manifest_bytes: bytes) -> str:
    """A version's folder: named after its manifest, so the same release content is the same version."""
    return VERSION_PREFIX + storage.sha256_bytes(manifest_bytes)[:VERSION_CHARS]


def _is_version(name: str) -> bool:
    digits = name[len(VERSION_PREFIX):]
    return name.startswith(VERSION_PREFIX) and len(digits) == VERSION_CHARS and \
        all(c in "0123456789abcdef" for c in digits)


def _read_json(uri: str) -> dict | None:
    """A JSON object, or None when it is absent or unreadable (then it does not count)."""
    if not storage.exists(uri):
        return None
    try:
        obj = json.loads(storage.read_bytes(uri))
    except (ValueError, StorageError):
        return None
    return obj if isinstance(obj, dict) else None


def _parse_manifest(data: bytes) -> dict | None:
    """A manifest whose files are all plain names with a sha256 and size, else None (not a release:
    a manifest naming ``../x`` would make publishing or reading touch files outside the release)."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        _check_file_names(files, "manifest")
        if not all(isinstance(i, dict) and isinstance(i.get("sha256"), str) and isinstance(i.get("size"), int)
                   for i in files.values()):
            return None
    except (ValueError, TypeError, KeyError, AttributeError, So8tError):
        return None
    return manifest


@dataclass(frozen=True)
class Version:
    """A complete version of a release: the folder its files are in, its name there ("" for a
    release in the layout before versions, whose files sit in the release folder), its manifest."""

    folder: str
    name: str
    manifest: dict
    manifest_bytes: bytes


def _load_version(folder: str, name: str, sha256: str | None = None) -> Version | None:
    uri = storage.join(folder, MANIFEST_NAME)
    if not storage.exists(uri):
        return None
    try:
        data = storage.read_bytes(uri)
    except StorageError:
        return None
    if sha256 is not None and storage.sha256_bytes(data) != sha256:
        return None
    manifest = _parse_manifest(data)
    return None if manifest is None else Version(folder=folder, name=name, manifest=manifest, manifest_bytes=data)


def current_version(release: str) -> Version | None:
    """The version ``current.json`` names, when it is complete; None when the release is absent or
    incomplete. Also reads a bare version folder, and releases published before versions (their
    manifest.json beside their files)."""
    pointer = _read_json(storage.join(release, POINTER_NAME))
    if pointer is not None:
        name = pointer.get("version")
        if not (isinstance(name, str) and _is_version(name)):
            return None
        return _load_version(storage.member(release, name), name, pointer.get("manifest_sha256"))
    return _load_version(release, "")


def read_manifest(release: str) -> dict | None:
    """The manifest of a release's current version, or None when the release is absent or incomplete."""
    version = current_version(release)
    return None if version is None else version.manifest


def _gone_here(pid) -> bool:
    """Whether ``pid`` names no running process of this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError, TypeError):
        return False
    return False


def _lock_stale(holder: dict | None) -> bool:
    """A lock whose holder is gone: a process of this host that no longer runs, or any holder
    after LOCK_STALE_SECONDS (a holder on another host that crashed)."""
    if holder is None or not isinstance(holder.get("token"), str):
        return False  # unreadable: written by something else; wait for it to go stale by age
    try:
        if time.time() - float(holder.get("created", 0)) > LOCK_STALE_SECONDS:
            return True
    except (TypeError, ValueError):
        return False
    return holder.get("host") == socket.gethostname() and _gone_here(holder.get("pid"))


def _host_tag() -> str:
    return storage.sha256_bytes(socket.gethostname().encode())[:8]


def _staging_name() -> str:
    """``.staging-<host tag>-<pid>-<id>``: the owner in the name lets a later publisher on this
    host remove what a killed one left behind."""
    return f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _abandoned(release: str, name: str, ours: str = "") -> bool:
    """Whether ``name`` in ``release`` is what a killed publisher of this host left: its staging
    prefix (its uploads can never be committed), a tombstone of a lock takeover it did not finish,
    a temporary file of a write it did not finish (``<name>.tmp-<pid>-<id>``, local folders)."""
    if name.startswith(STAGING_PREFIX):
        parts = name[len(STAGING_PREFIX):].split("-")
        return name != ours and len(parts) == 3 and parts[0] == _host_tag() and _gone_here(parts[1])
    if name.startswith(LOCK_NAME + ".stale-"):
        return _lock_stale(_read_json(storage.join(release, name)))
    stem, _, tail = name.rpartition(".tmp-")
    pid = tail.split("-")[0]
    return bool(stem) and storage.is_local(release) and pid.isdigit() and _gone_here(pid)


def _remove_abandoned(release: str, ours: str = "") -> None:
    """Remove what killed publishers of this host left in ``release``; under its lock."""
    for name in storage.list_names(release):
        if _abandoned(release, name, ours):
            storage.remove_tree(storage.member(release, name, hidden=True))


def _tidy(release: str) -> None:
    """A release that needs no publishing may still hold what a publisher killed after its switch
    left (its lock, its staging): taken and removed, so that a rerun leaves nothing behind."""
    names = storage.list_names(release)
    if (LOCK_NAME in names and _lock_stale(_read_json(storage.join(release, LOCK_NAME)))) or \
            any(_abandoned(release, n) for n in names):
        with exclusive(release):
            _remove_abandoned(release)


def _holder_record(token: str) -> bytes:
    return _json_bytes({"token": token, "host": socket.gethostname(), "pid": os.getpid(), "created": time.time()})


def _take_over(uri: str, stale: dict) -> None:
    """Remove the lock at ``uri`` if it still is the one ``stale`` describes, such that of many
    publishers that judged it stale at once exactly one removes it, and none removes a lock taken
    since (the race where the second remover deletes the first one's fresh lock).

    A tombstone named after the stale lock's token, ``<lock>.stale-<token>``, is created
    exclusively first: only its creator may remove that lock, after reading it again. Nobody else
    removes a lock but its live holder, so the lock cannot change between that read and the removal.
    A taker killed holding a tombstone leaves a stale tombstone: taken over the same way."""
    tomb = f"{uri}.stale-{stale['token']}"
    token = uuid.uuid4().hex
    if not storage.create_exclusive(tomb, _holder_record(token)):
        other = _read_json(tomb)
        if _lock_stale(other):
            _take_over(tomb, other)  # its taker died mid-takeover; the next attempt retries
        return
    try:
        if (_read_json(uri) or {}).get("token") == stale["token"]:
            storage.remove(uri)
    finally:
        if (_read_json(tomb) or {}).get("token") == token:
            storage.remove(tomb)


@contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """Hold ``<folder>/.publish-lock`` while the block runs: one publisher at a time changes the
    records in ``folder`` (a release's versions and pointer; a model's latest.json). Taken with
    an exclusive create; a lock left by a crashed holder is taken over (:func:`_take_over`)."""
    uri = storage.join(folder, LOCK_NAME)
    token = uuid.uuid4().hex
    delay = 0.02
    while not storage.create_exclusive(uri, _holder_record(token)):
        holder = _read_json(uri)
        if holder is not None and holder.get("token") == token:
            break  # our own create went through; its answer was lost and the retry found it
        if _lock_stale(holder):
            _take_over(uri, holder)
            continue
        time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: waiters do not retry in lockstep
        delay = min(2 * delay, 0.5)
    try:
        yield
    finally:
        if (_read_json(uri) or {}).get("token") == token:
            storage.remove(uri)


def publish_release(files: Mapping[str, FileRef], release: str, extra: Mapping[str, Any]) -> tuple[FileRef, int]:
    """Publish ``files`` (name → local FileRef) as the release at ``release``: a new version,
    then the pointer switched to it.

    Returns the version manifest's ref and how many files were uploaded (0 when the release was
    already published with these exact files).
    """
    manifest = manifest_document(files, extra)
    data = _json_bytes(manifest)
    version = version_name(data)
    target = storage.member(release, version)
    manifest_ref = FileRef(uri=storage.join(target, MANIFEST_NAME), sha256=storage.sha256_bytes(data),
                           size=len(data))
    current = current_version(release)
    if (kept := _kept(current, manifest)) is not None:
        _tidy(release)
        return kept, 0
    staging = storage.member(release, _staging_name(), hidden=True)
    staged: set[str] = set()

    def stage(names: Iterable[str]) -> None:
        for name in names:
            ref, uri = files[name], storage.member(staging, name)
            storage.upload_file(ref.uri, uri)
            if storage.size(uri) != ref.size or storage.sha256_of(uri) != ref.sha256:
                raise StorageError(uri, "verification failed after upload (size or sha256 differs)",
                                   "retry; the destination may be unreliable")
            staged.add(name)

    uploaded = 0
    try:
        # Uploads go to our own staging prefix, outside the lock: concurrent publishers upload in
        # parallel and only take turns to commit.
        if _load_version(target, version, manifest_ref.sha256) is None:
            stage(_changed(files, current))
        with exclusive(release):
            current = current_version(release)  # what the publisher before us committed, if any
            if (kept := _kept(current, manifest)) is not None:
                _remove_abandoned(release, posixpath.basename(staging))
                return kept, 0
            if _load_version(target, version, manifest_ref.sha256) is None:  # else: an earlier version again
                changed = _changed(files, current)
                stage(n for n in changed if n not in staged)
                # The version folder is written only here, under the lock, and complete only once its
                # manifest is there; what a killed commit left in it is overwritten by the same bytes.
                for name in files:
                    if name in changed:
                        storage.move(storage.member(staging, name), storage.member(target, name))
                    else:
                        storage.copy(storage.member(current.folder, name), storage.member(target, name))
                storage.write_bytes_atomic(manifest_ref.uri, data)
                uploaded = len(changed)
            # The switch: one atomic write. Readers see the old version or this one.
            storage.write_bytes_atomic(storage.join(release, POINTER_NAME),
                                       _json_bytes({"version": version, "manifest_sha256": manifest_ref.sha256}))
            _remove_old(release, keep={version, current.name if current else None},
                        ours=posixpath.basename(staging))
    finally:
        storage.remove_tree(staging)
    return manifest_ref, uploaded


def _remove_old(release: str, keep: set[str | None], ours: str) -> None:
    """Under the release's lock, after a switch: versions other than the current one and the one it
    replaced (readers may still be reading that one), a version a killed commit left incomplete,
    what killed publishers of this host left, and the files of a release published before
    versions once it is not one of the two kept."""
    for name in storage.list_names(release):
        if _is_version(name) and name not in keep:
            storage.remove_tree(storage.member(release, name))
    _remove_abandoned(release, ours)
    if "" not in keep and (legacy := _load_version(release, "")) is not None:
        storage.remove(storage.join(release, MANIFEST_NAME))  # invisible first, then its files
        for name in legacy.manifest["files"]:  # plain names, none of the records (_parse_manifest)
            storage.remove(storage.member(release, name))


def _kept(current: Version | None, manifest: dict) -> FileRef | None:
    """The current version's manifest ref when publishing ``manifest`` would change nothing worth
    changing (the same release, or one that would only lose its validation); None when the
    release is to be published."""
    if current is None or current.name == "":
        return None  # nothing, or a release from before versions: published as a version
    if current.manifest == manifest or _validated_same_files(current.manifest, manifest):
        return FileRef(uri=storage.join(current.folder, MANIFEST_NAME),
                       sha256=storage.sha256_bytes(current.manifest_bytes), size=len(current.manifest_bytes))
    return None


def _validated_same_files(current: dict, new: dict) -> bool:
    """Whether ``new``, published without validation, would only take a passed validation away
    from the committed release: every file it has but the model card (which says whether the
    model was validated) is committed with the same bytes. Then the committed release stays."""
    if new.get("validation") is not None or not (current.get("validation") or {}).get("passed"):
        return False
    committed = current.get("files", {})
    return all(committed.get(n) == info for n, info in new["files"].items() if n != MODEL_CARD_NAME)


def _changed(files: Mapping[str, FileRef], current: Version | None) -> list[str]:
    """The files to upload: all but those the current version holds with the same bytes."""
    listed = current.manifest["files"] if current is not None else {}
    return [n for n, ref in files.items()
            if not (listed.get(n) == {"sha256": ref.sha256, "size": ref.size}
                    and storage.exists(storage.member(current.folder, n))
                    and storage.size(storage.member(current.folder, n)) == ref.size)]


def read_latest(dest: str, model: str) -> dict | None:
    """``<dest>/<model>/latest.json``, or None when nothing was published for ``model``."""
    return _read_json(storage.join(dest, storage.check_name(model, "model name"), LATEST_NAME))


def entry_release(dest: str, model: str, entry: Any) -> str | None:
    """The release a latest.json entry names (``<fingerprint16>/<quant>/``), when it is one: a
    latest.json naming ``../x`` would send readers out of the model folder."""
    parts = entry.get("release", "").strip("/").split("/") if isinstance(entry, dict) and \
        isinstance(entry.get("release"), str) else []
    if len(parts) != 2 or not all(storage.is_plain_name(p) for p in parts):
        return None
    return storage.join(dest, model, *parts)


def latest_release(dest: str, model: str, quant: str) -> str | None:
    """The URI of the release of ``model`` at ``quant`` published last, or None."""
    entry = ((read_latest(dest, model) or {}).get("quants") or {}).get(quant)
    return None if entry is None else entry_release(dest, model, entry)


def update_latest(dest: str, model: str, entries: Mapping[str, Mapping[str, Any]],
                  model_files: Callable[[dict[str, dict]], Mapping[str, bytes]] | None = None) -> FileRef:
    """Point ``latest.json`` at the given releases (quant → entry), keeping other quants' entries.
    Under the model folder's lock: concurrent publishers of different quants lose no entry.
    ``model_files``: the files of the model folder made from the entries (its README.md and plot),
    each written atomically under the same lock just before latest.json, so the card and the
    pointer always name the same quants once the lock is released."""
    folder = storage.join(dest, storage.check_name(model, "model name"))
    uri = storage.join(folder, LATEST_NAME)
    with exclusive(folder):
        current = read_latest(dest, model) or {}
        quants = {q: e for q, e in (current.get("quants") or {}).items()
                  if storage.is_plain_name(q) and entry_release(dest, model, e) is not None}
        quants.update(entries)
        for name, content in (model_files(quants) if model_files else {}).items():
            target = storage.join(folder, storage.check_name(name, "model folder file"))
            if not (storage.exists(target) and storage.sha256_of(target) == storage.sha256_bytes(content)):
                storage.write_bytes_atomic(target, content)
        data = _json_bytes({"model": model, "quants": quants})
        ref = FileRef(uri=uri, sha256=storage.sha256_bytes(data), size=len(data))
        if not (storage.exists(uri) and storage.sha256_of(uri) == ref.sha256):  # unchanged: not rewritten
            storage.write_bytes_atomic(uri, data)
    return ref
