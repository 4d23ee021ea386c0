"""A checkpoint's content fingerprint: what names a source version in caches and release folders."""

from __future__ import annotations

import hashlib
import json
import os

from so8t_core import storage
from so8t_core.refs import SourceRef
from so8t_core.source.checkpoint import TOKENIZER_FILES, Checkpoint


def fingerprint(ckpt: Checkpoint, tensor_sha256: dict[str, str] | None = None,
                cache_dir: str | None = None) -> SourceRef:
    """Content fingerprint of a checkpoint: config, tokenizer files and every tensor's bytes.

    Reads each tensor once, by byte range (memory: one tensor). Independent of
    shard layout and file names, so re-sharding the same weights keeps it. With
    ``cache_dir``, a shard whose identity (size and mtime, or ETag) was seen before is
    not read again: its tensors' hashes come from the cache.
    """
    shas = dict(tensor_sha256 or {})
    if cache_dir is not None:
        shas.update(_cached_shard_hashes(ckpt, cache_dir))
    for name in ckpt.tensors:
        if name not in shas:
            shas[name] = ckpt.tensor_sha256(name)
    files = {}
    for name in (*TOKENIZER_FILES, "README.md"):  # the model card feeds general.* metadata
        data = ckpt.read_file(name)
        if data is not None:
            files[name] = hashlib.sha256(data).hexdigest()
    doc = {
        "config": hashlib.sha256(ckpt.config_bytes).hexdigest(),
        "files": files,
        "tensors": {n: [ckpt.tensors[n].dtype, list(ckpt.tensors[n].shape), shas[n]] for n in sorted(shas)},
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return SourceRef(uri=ckpt.uri, fingerprint=digest, tensor_sha256=shas,
                     n_bytes=sum(e.nbytes for e in ckpt.tensors.values()))


def _cached_shard_hashes(ckpt: Checkpoint, cache_dir: str) -> dict[str, str]:
    """Tensor sha256s per shard, remembered under the shard's identity; computes what is missing."""
    by_file: dict[str, list[str]] = {}
    for name, e in ckpt.tensors.items():
        by_file.setdefault(e.file, []).append(name)
    out: dict[str, str] = {}
    for file, names in by_file.items():
        ident = storage.identity(file)
        if ident is None:
            continue
        key = hashlib.sha256(f"{file}|{ident}|{ckpt.unwrapped_prefix}".encode()).hexdigest()
        path = os.path.join(cache_dir, "fingerprints", key + ".json")
        try:
            with open(path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = None
        if not isinstance(cached, dict) or set(cached) != set(names):
            cached = {n: ckpt.tensor_sha256(n) for n in names}
            with storage.local_atomic_file(path) as tmp:
                with open(tmp, "w") as f:
                    json.dump(cached, f)
        out.update(cached)
    return out
