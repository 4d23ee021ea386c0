"""Publishing releases atomically to any fsspec destination.

Layout (docs/architecture.md):

    <dest>/<model>/<fingerprint[:16]>/<quant>/   one release: GGUF file(s), stats, validation,
                                                 heads sidecar, analysis, README.md, manifest.json
    <dest>/<model>/latest.json                   for each quant, the release published last

``manifest.json`` is a release's commit record: it lists every file with its size and
sha256 and is written last. A release without it is incomplete and must be ignored; one
with it is complete. Publishing works so that this holds at every instant, whatever fails:

1. if the release's manifest already lists exactly these files, nothing is uploaded, and
   a file the release already holds with the same sha256 is never uploaded again; a run
   without validation never replaces a validated release of the same bytes (it would only
   take the validation away), so it publishes nothing then;
2. every other file is uploaded under ``<release>/.staging-<id>/`` and verified (size and
   sha256 read back from the destination);
3. only then, holding the release's lock (``<release>/.publish-lock``, taken by an exclusive
   create), is an existing manifest removed (the old release turns invisible, never partial),
   the files are moved into place, and the new manifest is written;
4. ``latest.json`` moves to the new release last, under the model folder's lock.

The locks make concurrent publishers take turns: two runs publishing the same release leave
the files and manifest of one of them, never a mix, and two runs publishing different quants
of one model both keep their entry in ``latest.json``. A lock whose holder crashed is taken
over (at once when the holder was a process of this host, else after LOCK_STALE_SECONDS).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

from so8t_core import storage
from so8t_core.constants import CONVERTER, MANIFEST_NAME, MODEL_CARD_NAME
from so8t_core.errors import StorageError
from so8t_core.refs import FileRef, StagedTensor

LATEST_NAME = "latest.json"
LOCK_NAME = ".publish-lock"
STAGING_PREFIX = ".staging-"
# A holder on another host is presumed crashed after this long. Committing (moves within the
# store, one small write) takes seconds; uploads happen before the lock is taken.
LOCK_STALE_SECONDS = 900
FINGERPRINT_CHARS = 16


def release_uri(dest: str, model: str, fingerprint: str, quant: str) -> str:
    return storage.join(dest, model, fingerprint[:FINGERPRINT_CHARS], quant)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def release_manifest(name: str, quant: str, source_fingerprint: str, validation: dict | None,
                     staged: Sequence[StagedTensor], imatrix: dict | None = None,
                     lora: dict | None = None, tokenizer: dict | None = None) -> dict:
    """What a release's manifest says besides its files: the model, the quant, the source,
    the validation, the bake error per gated tensor, the importance matrix and LoRA adapter
    used (``imatrix``: its summary: sha256, entries, the tensors it had no entry for, and what
    it was computed on when the run computed it), and, when llama.cpp does not reproduce the
    tokenizer (converted with --allow-tokenizer-mismatch), the tokenizer check that says so
    (``tokenizer``: the analysis')."""
    manifest = {"name": name, "quant": quant, "converter": CONVERTER, "source_fingerprint": source_fingerprint,
                "validation": validation,
                "bake_errors": {s.gguf_name: s.bake_error for s in staged if s.bake_error is not None},
                "imatrix": imatrix}
    if lora is not None:
        manifest["lora"] = lora
    if tokenizer is not None and not tokenizer["parity"]["ok"]:
        manifest["tokenizer_mismatch"] = tokenizer
    return manifest


def manifest_document(files: Mapping[str, FileRef], extra: Mapping[str, Any]) -> dict:
    return {**extra, "files": {n: {"sha256": r.sha256, "size": r.size} for n, r in sorted(files.items())}}


def _read_json(uri: str) -> dict | None:
    """A JSON record, or None when it is absent or unreadable (then it does not count)."""
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, StorageError):
        return None


def read_manifest(release: str) -> dict | None:
    """A release's manifest, or None when the release is absent or incomplete."""
    return _read_json(storage.join(release, MANIFEST_NAME))


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
    if holder is None:  # unreadable: written by something else; wait for it to go stale by age
        return False
    if time.time() - float(holder.get("created", 0)) > LOCK_STALE_SECONDS:
        return True
    return holder.get("host") == socket.gethostname() and _gone_here(holder.get("pid"))


def _host_tag() -> str:
    return storage.sha256_bytes(socket.gethostname().encode())[:8]


def _staging_name() -> str:
    """``.staging-<host tag>-<pid>-<id>``: the owner in the name lets a later publisher on this
    host remove what a killed one left behind."""
    return f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _remove_abandoned_staging(release: str, ours: str) -> None:
    """Staging prefixes in ``release`` left by killed publishers of this host (their uploads can
    never be committed). Called holding the release's lock; others' staging is left alone."""
    for name in storage.list_names(release):
        parts = name[len(STAGING_PREFIX):].split("-") if name.startswith(STAGING_PREFIX) else []
        if name != ours and len(parts) == 3 and parts[0] == _host_tag() and _gone_here(parts[1]):
            storage.remove_tree(storage.join(release, name))


@contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """Hold ``<folder>/.publish-lock`` while the block runs: one publisher at a time changes the
    records in ``folder`` (a release's files and manifest; a model's latest.json). Taken with
    an exclusive create; a lock left by a crashed holder is taken over (see _lock_stale)."""
    uri = storage.join(folder, LOCK_NAME)
    token = uuid.uuid4().hex
    mine = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
    delay = 0.05
    while not storage.create_exclusive(uri, _json_bytes(mine)):
        holder = _read_json(uri)
        if holder is not None and holder.get("token") == token:
            break  # our own create went through; its answer was lost and the retry found it
        if _lock_stale(holder):
            storage.remove(uri)
            continue
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
    try:
        yield
    finally:
        if (_read_json(uri) or {}).get("token") == token:
            storage.remove(uri)


def publish_release(files: Mapping[str, FileRef], release: str, extra: Mapping[str, Any]) -> tuple[FileRef, int]:
    """Publish ``files`` (name → local FileRef) as the release at ``release``.

    Returns the manifest's ref and how many files were uploaded (0 when the release was
    already published with these exact files).
    """
    manifest = manifest_document(files, extra)
    data = _json_bytes(manifest)
    manifest_ref = FileRef(uri=storage.join(release, MANIFEST_NAME), sha256=storage.sha256_bytes(data),
                           size=len(data))
    current = read_manifest(release)
    if (kept := _kept(current, manifest, manifest_ref, release)) is not None:
        return kept, 0
    staging = storage.join(release, _staging_name())
    staged: set[str] = set()

    def stage(names: Iterable[str]) -> None:
        for name in names:
            ref, target = files[name], storage.join(staging, name)
            storage.upload_file(ref.uri, target)
            if storage.size(target) != ref.size or storage.sha256_of(target) != ref.sha256:
                raise StorageError(target, "verification failed after upload (size or sha256 differs)",
                                   "retry; the destination may be unreliable")
            staged.add(name)

    try:
        # Uploads go to our own staging prefix, outside the lock: concurrent publishers upload in
        # parallel and only take turns to commit.
        stage(_changed(files, release, current))
        with exclusive(release):
            current = read_manifest(release)  # what the publisher before us committed, if any
            if (kept := _kept(current, manifest, manifest_ref, release)) is not None:
                return kept, 0
            changed = _changed(files, release, current)
            stage(n for n in changed if n not in staged)
            old_manifest = storage.join(release, MANIFEST_NAME)
            if current is not None or storage.exists(old_manifest):
                storage.remove(old_manifest)  # the old release turns invisible before any file changes
            for name in changed:
                storage.move(storage.join(staging, name), storage.join(release, name))
            storage.write_bytes_atomic(manifest_ref.uri, data)
            # Files of the previous release that this one does not list (e.g. fewer split shards):
            # unlisted, so invisible already; removed so the release holds what it lists.
            for name in set((current or {}).get("files", {})) - set(files):
                stale = storage.join(release, name)
                if storage.exists(stale):
                    storage.remove(stale)
            _remove_abandoned_staging(release, posixpath.basename(staging))
    finally:
        storage.remove_tree(staging)
    return manifest_ref, len(changed)


def _kept(current: dict | None, manifest: dict, manifest_ref: FileRef, release: str) -> FileRef | None:
    """The committed manifest's ref when publishing ``manifest`` over ``current`` would change
    nothing worth changing (the same release, or one that would only lose its validation);
    None when the release is to be published."""
    if current == manifest:
        return manifest_ref
    if _validated_same_files(current, manifest):
        return _committed_manifest_ref(release)
    return None


def _validated_same_files(current: dict | None, new: dict) -> bool:
    """Whether ``new``, published without validation, would only take a passed validation away
    from the committed release: every file it has but the model card (which says whether the
    model was validated) is committed with the same bytes. Then the committed release stays."""
    if current is None or new.get("validation") is not None:
        return False
    if not (current.get("validation") or {}).get("passed"):
        return False
    committed = current.get("files", {})
    return all(committed.get(n) == info for n, info in new["files"].items() if n != MODEL_CARD_NAME)


def _committed_manifest_ref(release: str) -> FileRef:
    uri = storage.join(release, MANIFEST_NAME)
    data = storage.read_bytes(uri)
    return FileRef(uri=uri, sha256=storage.sha256_bytes(data), size=len(data))


def _changed(files: Mapping[str, FileRef], release: str, current: dict | None) -> list[str]:
    """The files to upload: all but those the committed release already holds with the same bytes."""
    listed = (current or {}).get("files", {})
    return [n for n, ref in files.items()
            if not (listed.get(n) == {"sha256": ref.sha256, "size": ref.size}
                    and storage.exists(storage.join(release, n))
                    and storage.size(storage.join(release, n)) == ref.size)]


def read_latest(dest: str, model: str) -> dict | None:
    """``<dest>/<model>/latest.json``, or None when nothing was published for ``model``."""
    return _read_json(storage.join(dest, model, LATEST_NAME))


def latest_release(dest: str, model: str, quant: str) -> str | None:
    """The URI of the release of ``model`` at ``quant`` published last, or None."""
    entry = ((read_latest(dest, model) or {}).get("quants") or {}).get(quant)
    return None if entry is None else storage.join(dest, model, entry["release"].rstrip("/"))


def update_latest(dest: str, model: str, entries: Mapping[str, Mapping[str, Any]]) -> FileRef:
    """Point ``latest.json`` at the given releases (quant → entry), keeping other quants' entries.
    Under the model folder's lock: concurrent publishers of different quants lose no entry."""
    uri = storage.join(dest, model, LATEST_NAME)
    with exclusive(storage.join(dest, model)):
        current = read_latest(dest, model) or {}
        quants = dict(current.get("quants", {}))
        quants.update(entries)
        data = _json_bytes({"model": model, "quants": quants})
        ref = FileRef(uri=uri, sha256=storage.sha256_bytes(data), size=len(data))
        if not (storage.exists(uri) and storage.sha256_of(uri) == ref.sha256):  # unchanged: not rewritten
            storage.write_bytes_atomic(uri, data)
    return ref
