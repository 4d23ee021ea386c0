"""Assembling GGUF files from staged tensors: the model file and the triality-head sidecar."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import gguf
import numpy as np

from . import CONVERTER
from .analysis import checkpoint_model
from .checkpoint import TOKENIZER_FILES, Checkpoint
from .constants import HEADS_INPUT_FINAL_NORM, SIDECAR_ARCH, Keys, QuantType
from .gguf_file import NO_SPLIT, GGUFKV, Split, TensorInfo, kv_array, kv_str, kv_u32, write_gguf
from .gguf_metadata import MODEL_CARD_FILES, Provenance, general_kvs, model_folder_name, model_kvs
from .quantize import FORMAT_VERSION
from .refs import FileRef, StagedTensor
from .so8t import So8tStructure
from .storage import local_atomic_file
from .tokenizer import tokenizer_metadata


def file_ref(path: str) -> FileRef:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return FileRef(uri=path, sha256=h.hexdigest(), size=os.path.getsize(path))


def _inputs_key(arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor], split: Split) -> str:
    """What a model GGUF is made of: metadata, the staged tensors' sha256, the split, the format."""
    what = [FORMAT_VERSION, arch, [(kv.key, int(kv.vtype), kv.sub_type and int(kv.sub_type), kv.value) for kv in kvs],
            [(s.gguf_name, s.ggml_type, list(s.shape), s.sha256) for s in staged], split.max_tensors, split.max_bytes]
    data = json.dumps(what, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode()
    return hashlib.sha256(data).hexdigest()


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def assemble_model(path: str, arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor],
                   split: Split = NO_SPLIT) -> list[FileRef]:
    """Write the model GGUF (one file, or a split set): tensors in order, data streamed from staging.

    A record beside the file (``<file>.inputs.json``: the inputs' key and the written files
    with their identity) lets a re-run with the same inputs reuse the files untouched.
    """
    key = _inputs_key(arch, kvs, staged, split)
    record = path + ".inputs.json"
    try:
        with open(record) as f:
            previous = json.load(f)
        if previous["key"] == key and all(os.path.exists(r["uri"]) and _identity(r["uri"]) == r["identity"]
                                          for r in previous["files"]):
            return [FileRef(uri=r["uri"], sha256=r["sha256"], size=r["size"]) for r in previous["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    refs = _write_model(path, arch, kvs, staged, split)
    with local_atomic_file(record) as tmp:
        with open(tmp, "w") as f:
            json.dump({"key": key, "files": [{**r.model_dump(), "identity": _identity(r.uri)} for r in refs]}, f)
    return refs


def _write_model(path: str, arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor],
                 split: Split) -> list[FileRef]:
    infos = [TensorInfo(s.gguf_name, tuple(s.shape), gguf.GGMLQuantizationType[s.ggml_type], s.nbytes)
             for s in staged]
    by_name = {s.gguf_name: s for s in staged}

    def read(t: TensorInfo) -> bytes:
        s = by_name[t.name]
        with open(s.uri, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != s.sha256:
            raise RuntimeError(f"staged tensor {s.uri} changed since it was written")
        return data

    return [file_ref(p) for p in write_gguf(path, arch, kvs, infos, read, split)]


def sidecar_tensor_name(checkpoint_name: str) -> str:
    # so8t.triality.safety_head.weight -> safety_head.weight
    return checkpoint_name.rsplit(".", 2)[-2] + "." + checkpoint_name.rsplit(".", 1)[-1]


def assemble_heads_sidecar(path: str, ckpt: Checkpoint, structure: So8tStructure, model_name: str,
                           source_fingerprint: str) -> FileRef | None:
    """The SO8T heads as a small F32 GGUF beside the model (llama.cpp refuses extra tensors).

    Triality heads are stored as ``<head>_head.weight/bias`` with their labels; other
    classifier heads of SO8T variants (safety_head.0.weight, ...) under their own names,
    listed in ``so8t.heads.extra``, so nothing the checkpoint trained is lost.
    """
    if not structure.heads and not structure.classifier_heads:
        return None
    kvs = [kv_str("general.type", "so8t-heads"), kv_str("general.name", f"{model_name} SO8T heads"),
           kv_str(Keys.HEADS_INPUT, HEADS_INPUT_FINAL_NORM),
           kv_u32("so8t.heads.hidden_size", ckpt.config.get("hidden_size", 0)),
           kv_str(Keys.SOURCE_FINGERPRINT, source_fingerprint)]
    if structure.heads:
        kvs.append(kv_array(Keys.HEADS_NAMES, [h.head for h in structure.heads], gguf.GGUFValueType.STRING))
        kvs += [kv_array(Keys.HEADS_LABELS.format(head=h.head), list(h.labels), gguf.GGUFValueType.STRING)
                for h in structure.heads]
    if structure.classifier_heads:
        kvs.append(kv_array(Keys.HEADS_EXTRA, list(structure.classifier_heads), gguf.GGUFValueType.STRING))
    arrays = {}
    for h in structure.heads:
        for name in (h.weight, h.bias):
            if name:
                arrays[sidecar_tensor_name(name)] = np.ascontiguousarray(ckpt.read(name), dtype=np.float32)
    for name in structure.classifier_heads:
        arrays[name] = np.ascontiguousarray(ckpt.read(name), dtype=np.float32)
    infos = [TensorInfo(n, a.shape, gguf.GGMLQuantizationType.F32, a.nbytes) for n, a in arrays.items()]
    write_gguf(path, SIDECAR_ARCH, kvs, infos, lambda t: arrays[t.name].tobytes())
    return file_ref(path)


def tokenizer_files(ckpt: Checkpoint) -> dict[str, bytes]:
    return {n: data for n in TOKENIZER_FILES if (data := ckpt.read_file(n)) is not None}


def model_metadata(ckpt: Checkpoint, quant: QuantType, name: str, source_fingerprint: str,
                   staged: Sequence[StagedTensor], extra: Sequence[GGUFKV] = ()) -> tuple[str, list[GGUFKV]]:
    """(architecture, every metadata key of the model GGUF), from the checkpoint and the staged tensors.

    ``extra``: keys llama-quantize adds for this file (the quantize.imatrix.* keys).
    """
    spec, structure, _ = checkpoint_model(ckpt)
    tok = tokenizer_metadata(tokenizer_files(ckpt), ckpt.config, ckpt.uri)
    provenance = Provenance(
        source_fingerprint=source_fingerprint, structure=structure, converter=CONVERTER,
        max_bake_error=max((s.bake_error for s in staged if s.bake_error is not None), default=0.0))
    n_params = sum(s.n_elements for s in staged)
    general = general_kvs(spec.arch, model_folder_name(ckpt.uri, name), model_card_files(ckpt), n_params)
    return spec.arch, model_kvs(general, spec, quant, tok, provenance, extra)


def model_card_files(ckpt: Checkpoint) -> dict[str, bytes]:
    """What gguf.Metadata reads for general.*: the model card, config.json, generation_config.json."""
    files = {n: data for n in MODEL_CARD_FILES if n != "config.json" and (data := ckpt.read_file(n)) is not None}
    files["config.json"] = ckpt.config_bytes
    return files
