"""Lazy reader for Hugging Face checkpoint folders at any fsspec URI.

Opening a checkpoint reads only ``config.json``, the shard index and each shard's
safetensors header. Tensors are read one at a time by byte range, so memory is
bounded by the largest tensor, not the model. ``pytorch_model*.bin`` shards go through
``legacy_bin`` (safe loading, cached as safetensors) so the rest of the pipeline reads
them the same way; ``fingerprint`` names a checkpoint's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from so8t_core import storage
from so8t_core.errors import CheckpointError, StorageError
from so8t_core.source.legacy_bin import bin_as_safetensors
from so8t_core.source.safetensors_format import (
    SafetensorsHeader,
    TensorSlice,
    decode_float,
    header_length,
    parse_header,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "generation_config.json", "added_tokens.json",
)


@dataclass(frozen=True)
class TensorEntry(TensorSlice):
    """One tensor of the checkpoint: its header entry and the shard it lives in."""

    file: str = ""  # URI of the shard


@dataclass
class Checkpoint:
    uri: str
    config: dict[str, Any]
    config_bytes: bytes
    tensors: dict[str, TensorEntry]
    shards: list[str] = field(default_factory=list)  # shard URIs, in index order
    weight_format: str = "safetensors"
    unwrapped_prefix: str = ""  # wrapper prefix removed from tensor names (PEFT, DDP, SO8T wrappers)

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, cache_dir: str | None = None) -> "Checkpoint":
        uri = uri.rstrip("/") if "://" in uri else storage.local_path(uri)
        fs, root = storage.resolve(uri)
        if not fs.isdir(root):
            hint = "pass the checkpoint folder, not a file inside it" if fs.exists(root) else \
                "check the path; `so8t-gguf demo-checkpoint DEST` builds an example"
            raise CheckpointError(uri, "not a checkpoint folder", hint)
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
        if storage.is_local(uri):
            refuse_links_outside(uri, names)
        if "config.json" not in names:
            raise CheckpointError(storage.join(uri, "config.json"), "missing config.json",
                                  "a Hugging Face checkpoint folder needs config.json beside its weights")
        config_bytes = storage.read_bytes(storage.join(uri, "config.json"))
        try:
            config = json.loads(config_bytes)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[...]]]]"
            problem = str(exc)[:200] if isinstance(exc, ValueError) else "nested too deeply"
            raise CheckpointError(storage.join(uri, "config.json"), f"not valid JSON ({problem})",
                                  "fix or re-save config.json") from None
        if not isinstance(config, dict):
            raise CheckpointError(storage.join(uri, "config.json"), "must be a JSON object", "")

        if SAFETENSORS_INDEX in names:
            shard_of = _read_index(uri, SAFETENSORS_INDEX)
            fmt = "safetensors"
        elif SAFETENSORS_SINGLE in names:
            shard_of, fmt = None, "safetensors"
            shard_files = [SAFETENSORS_SINGLE]
        elif BIN_INDEX in names or BIN_SINGLE in names:
            shard_of = _read_index(uri, BIN_INDEX) if BIN_INDEX in names else None
            fmt = "pytorch-bin"
        else:
            raise CheckpointError(uri, "no weights found (model.safetensors, model.safetensors.index.json "
                                       "or pytorch_model*.bin)", "copy the weight files into the folder")

        if shard_of is not None:
            shard_files = list(dict.fromkeys(shard_of.values()))
        elif fmt == "pytorch-bin":
            shard_files = [BIN_SINGLE]
        for shard in shard_files:
            if shard not in names:
                raise CheckpointError(storage.join(uri, shard), "missing shard listed in the index",
                                      "download every shard named in the index file")

        shard_uris = [storage.join(uri, s) for s in shard_files]
        readable = shard_uris
        if fmt == "pytorch-bin":
            readable = [bin_as_safetensors(s, cache_dir) for s in shard_uris]

        tensors: dict[str, TensorEntry] = {}
        for shard_uri, read_uri in zip(shard_uris, readable):
            header = read_safetensors_header(read_uri, display=shard_uri)
            for t in header.tensors.values():
                if t.name in tensors:
                    raise CheckpointError(shard_uri, f"tensor {t.name!r} appears in more than one shard",
                                          "the checkpoint is inconsistent; re-save it")
                if shard_of is not None and shard_of.get(t.name) not in (None, posixpath.basename(shard_uri)):
                    raise CheckpointError(shard_uri, f"tensor {t.name!r} is indexed in {shard_of[t.name]}",
                                          "the index and the shards disagree; re-save the checkpoint")
                tensors[t.name] = TensorEntry(t.name, t.dtype, t.shape, t.start, t.end, file=read_uri)
        if shard_of is not None:
            for name, shard in shard_of.items():
                if name not in tensors:
                    raise CheckpointError(storage.join(uri, shard),
                                          f"tensor {name!r} listed in the index is not in this shard",
                                          "the shard is incomplete; re-download it")
        prefix = wrapper_prefix(tensors)
        if prefix:
            tensors = _unwrap(tensors, prefix, uri)
        return cls(uri=uri, config=config, config_bytes=config_bytes, tensors=tensors,
                   shards=shard_uris, weight_format=fmt, unwrapped_prefix=prefix)

    # --- reading -----------------------------------------------------------------------

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.uri, f"tensor {name!r} not found", "the checkpoint is incomplete") from None

    def read_raw(self, name: str) -> bytes:
        e = self.entry(name)
        try:
            return storage.read_bytes(e.file, e.start, e.end)
        except StorageError as exc:
            raise CheckpointError(e.file, f"cannot read tensor {name!r}: {exc.problem}", exc.hint) from None

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32, checked to be finite."""
        e = self.entry(name)
        return self._finite(e, decode_float(self.read_raw(name), e.dtype, e.shape, f"{e.file}: tensor {name!r}"))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor (first axis) as float32: one byte-range read."""
        e = self.entry(name)
        if not e.shape or not 0 <= start <= stop <= e.shape[0]:
            raise CheckpointError(e.file, f"tensor {name!r} of shape {list(e.shape)} has no rows {start}:{stop}",
                                  "config.json and the weights disagree")
        row_bytes = e.nbytes // e.shape[0] if e.shape[0] else 0
        try:
            raw = storage.read_bytes(e.file, e.start + start * row_bytes, e.start + stop * row_bytes)
        except StorageError as exc:
            raise CheckpointError(e.file, f"cannot read tensor {name!r}: {exc.problem}", exc.hint) from None
        shape = (stop - start, *e.shape[1:])
        return self._finite(e, decode_float(raw, e.dtype, shape, f"{e.file}: tensor {name!r}"))

    @staticmethod
    def _finite(e: TensorEntry, arr: np.ndarray) -> np.ndarray:
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise CheckpointError(e.file, f"tensor {e.name!r} has {bad} NaN/Inf values",
                                  "the checkpoint is corrupt or training diverged; use an earlier checkpoint")
        return arr

    def read_file(self, name: str) -> bytes | None:
        """An auxiliary file of the folder (tokenizer, generation config), or None."""
        uri = storage.join(self.uri, name)
        return storage.read_bytes(uri) if storage.exists(uri) else None

    def tensor_sha256(self, name: str) -> str:
        return hashlib.sha256(self.read_raw(name)).hexdigest()


# Wrappers around the Hugging Face model that saved state dicts carry as a name prefix:
# PEFT (base_model.model.), SO8T's SafetyAware models (base_model., _llm_backbone.), DDP (module.).
WRAPPER_PREFIXES = ("base_model.model.", "base_model.", "_llm_backbone.", "module.")
BASE_NAME_RE = re.compile(r"^(model\.(layers\.\d+\.|embed_tokens\.|norm\.)|lm_head\.)")


def wrapper_prefix(names) -> str:
    """The wrapper prefix under which most base-model tensors live ("" for a plain checkpoint)."""
    best, best_count = "", sum(1 for n in names if BASE_NAME_RE.match(n))
    for prefix in WRAPPER_PREFIXES:
        count = sum(1 for n in names if n.startswith(prefix) and BASE_NAME_RE.match(n[len(prefix):]))
        if count > best_count:
            best, best_count = prefix, count
    return best


def _unwrap(tensors: dict[str, TensorEntry], prefix: str, where: str) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    for name, entry in tensors.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short in out:
            raise CheckpointError(where, f"tensor {short!r} appears both with and without the {prefix!r} prefix",
                                  "the checkpoint holds two copies of a tensor; re-save one state dict")
        out[short] = dataclasses.replace(entry, name=short)
    return out


def read_safetensors_header(uri: str, display: str | None = None) -> SafetensorsHeader:
    where = display or uri
    try:
        fsize = storage.size(uri)
        n = header_length(storage.read_bytes(uri, 0, min(8, fsize)), fsize, where)
        return parse_header(storage.read_bytes(uri, 8, 8 + n), fsize, where)
    except StorageError as exc:
        raise CheckpointError(where, exc.problem, exc.hint) from None


def _read_index(uri: str, index_name: str) -> dict[str, str]:
    where = storage.join(uri, index_name)
    try:
        index = json.loads(storage.read_bytes(where))
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and weight_map
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise CheckpointError(where, "not a valid index (needs a non-empty \"weight_map\" object)",
                              "re-save the checkpoint") from None
    for name, shard in weight_map.items():
        # Shards must be plain file names inside the folder: no paths, no escapes.
        if (not isinstance(shard, str) or not shard or shard != posixpath.basename(shard)
                or shard in (".", "..") or "\\" in shard):
            raise CheckpointError(where, f"tensor {name!r} points to {shard!r}, outside the checkpoint folder",
                                  "shard names must be plain file names in the same folder")
    return weight_map


def refuse_links_outside(folder: str, names, what: str = "checkpoint") -> None:
    """A local checkpoint's (or LoRA adapter's, ``what``) files may be symbolic links (Hugging
    Face's cache holds ``snapshots/<rev>/<file> -> ../../blobs/<sha256>``), but only to files inside
    the folder or, for a cache snapshot, inside its repository folder (``models--org--name``). A link
    elsewhere would make us read, and publish (README.md feeds the model card and the GGUF's
    metadata; an adapter's weights are merged), a file the checkpoint's author picked on this machine."""
    real = os.path.realpath(folder)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.dirname(os.path.dirname(real)))
    for name in sorted(names):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            if not any(os.path.commonpath([target, root]) == root for root in roots):
                raise CheckpointError(path, f"is a symbolic link to a file outside the {what} folder",
                                      f"copy the file into the folder if it belongs to the {what}")


