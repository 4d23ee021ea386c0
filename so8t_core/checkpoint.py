"""Lazy reader for Hugging Face checkpoint folders at any fsspec URI.

Opening a checkpoint reads only ``config.json``, the shard index and each shard's
safetensors header. Tensors are read one at a time by byte range, so memory is
bounded by the largest tensor, not the model. ``pytorch_model*.bin`` shards are
accepted only through ``torch.load(weights_only=True)`` (which refuses pickles that
would run code) and are re-saved once, shard by shard, as safetensors in a local
cache so the rest of the pipeline reads them the same way.
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

from . import storage
from .errors import CheckpointError, StorageError
from .refs import SourceRef
from .safetensors_format import (
    SafetensorsHeader, TensorSlice, decode_float, header_length, parse_header,
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
            _refuse_links_outside(uri, names)
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
            readable = [_bin_as_safetensors(s, cache_dir) for s in shard_uris]

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


# What torch.load says when a storage's declared size and its data disagree (legacy
# pickles allocate the declared size first; zip archives compare it with the record).
_STORAGE_SIZE_ERRORS = ("can't allocate memory", "storage has wrong byte size", "does not match expected size")


_LEGACY_SCAN = 64 << 20  # the pickles of a legacy file precede its storages; a state dict's are far smaller
_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_DEVICES = ("cpu", "cuda", "mps", "meta", "xpu")


def _legacy_declared_elements(head: bytes) -> int | None:
    """The storage elements a legacy (pre-zip) torch file declares, read from its pickles
    without running them; None for a zip archive or when the head does not parse (torch's own
    loader then reports the problem).

    The legacy layout is four pickles (magic number, protocol version, system info, the object)
    and then the storages' bytes. In the object's pickle each storage is a persistent id,
    ``("storage", type, key, location, numel, ...)``: the last integer before each BINPERSID."""
    import io
    import pickletools

    if head[:4] == b"PK\x03\x04":
        return None
    stream, storages = io.BytesIO(head), {}
    try:
        for index in range(4):
            last_int, strings = None, []
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _INT_OPS and isinstance(arg, int):
                    last_int = arg
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "MARK":
                    last_int, strings = None, []
                elif op.name in ("BINPERSID", "PERSID") and index == 3 and last_int is not None:
                    # A storage shared by several tensors is declared once per tensor: count its key once.
                    key = tuple(a for a in strings if a != "storage" and not a.startswith(_DEVICES))
                    storages[key or len(storages)] = max(0, last_int)
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
        return None
    return sum(storages.values())


def _declared_size_error(bin_uri: str) -> CheckpointError:
    return CheckpointError(bin_uri, "refused to load: a tensor storage declares a size the file does not hold "
                                    "(corrupt or crafted pickle)", "re-download the file, or convert it to safetensors")


def _bin_as_safetensors(bin_uri: str, cache_dir: str | None) -> str:
    """Load a ``.bin`` shard with weights_only=True and cache it as safetensors."""
    import torch
    from safetensors.torch import save_file

    cache_dir = cache_dir or default_cache_dir()
    digest = storage.sha256_of(bin_uri)
    out = os.path.join(cache_dir, "bin-shards", f"{digest}.safetensors")
    if os.path.exists(out):
        return out
    fs, path = storage.resolve(bin_uri)
    declared = _legacy_declared_elements(storage.read_bytes(bin_uri, 0, min(storage.size(bin_uri), _LEGACY_SCAN)))
    if declared is not None and declared > storage.size(bin_uri):
        # Each element is at least a byte: the file cannot hold what it declares. torch would
        # allocate the declared sizes before finding that out.
        raise _declared_size_error(bin_uri)
    try:
        with fs.open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, MemoryError, ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        if first.startswith("Weights only load failed"):  # generic; the reason is on a later line
            first = next((line for line in lines[1:] if not line.startswith("Check the documentation")), first)
            first = first.split(" Please use")[0]  # torch's advice to allow-list the global: not ours to give
        if isinstance(exc, MemoryError) or any(s in first for s in _STORAGE_SIZE_ERRORS):
            # A storage whose declared size is not what the file holds: torch tried (and
            # failed) to allocate the declared size, or read fewer bytes than it declares.
            raise _declared_size_error(bin_uri) from None
        raise CheckpointError(bin_uri, f"refused to load: not a plain tensor pickle ({first[:200]})",
                              "only weights_only=True pickles are accepted; convert it to safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(bin_uri, "does not hold a flat {name: tensor} state dict",
                              "save the model's state_dict(), or convert it to safetensors")
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # break shared storage
    with storage.local_atomic_file(out) as tmp:
        save_file(tensors, tmp)
    return out


def _refuse_links_outside(folder: str, names) -> None:
    """A local checkpoint's files may be symbolic links (Hugging Face's cache holds
    ``snapshots/<rev>/<file> -> ../../blobs/<sha256>``), but only to files inside the checkpoint
    folder or, for a cache snapshot, inside its repository folder (``models--org--name``). A link
    elsewhere would make us read, and publish (README.md feeds the model card and the GGUF's
    metadata), a file the checkpoint's author picked on this machine."""
    real = os.path.realpath(folder)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.dirname(os.path.dirname(real)))
    for name in sorted(names):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            if not any(os.path.commonpath([target, root]) == root for root in roots):
                raise CheckpointError(path, "is a symbolic link to a file outside the checkpoint folder",
                                      "copy the file into the folder if it belongs to the checkpoint")


def default_cache_dir() -> str:
    return os.environ.get("SO8T_GGUF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "so8t-gguf"))


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
