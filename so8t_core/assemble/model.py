"""Assembling the model GGUF from staged tensors: its metadata, and the file (or split set) itself."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Sequence

import gguf

from so8t_core.analysis import checkpoint_model
from so8t_core.assemble.metadata import MODEL_CARD_FILES, Provenance, general_kvs, model_kvs, parameter_counts
from so8t_core.constants import CONVERTER, QuantType, quant_type
from so8t_core.gguf_file import GGUFKV, NO_SPLIT, Split, TensorInfo, gguf_size, tensor_nbytes, write_gguf
from so8t_core.quantize.staging import FORMAT_VERSION
from so8t_core.refs import FileRef, StagedTensor, file_ref, made_files
from so8t_core.source.checkpoint import TOKENIZER_FILES, Checkpoint
from so8t_core.source.tokenizer import tokenizer_metadata


def _inputs_key(arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor], split: Split) -> str:
    """What a model GGUF is made of: metadata, the staged tensors' sha256, the split, the format."""
    what = [FORMAT_VERSION, arch, [(kv.key, int(kv.vtype), kv.sub_type and int(kv.sub_type), kv.value) for kv in kvs],
            [(s.gguf_name, s.ggml_type, list(s.shape), s.sha256) for s in staged], split.max_tensors, split.max_bytes]
    data = json.dumps(what, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode()
    return hashlib.sha256(data).hexdigest()


def assemble_model(path: str, arch: str, kvs: Sequence[GGUFKV], staged: Sequence[StagedTensor],
                   split: Split = NO_SPLIT) -> list[FileRef]:
    """Write the model GGUF (one file, or a split set): tensors in order, data streamed from staging.

    A record beside the file (``<file>.inputs.json``) lets a re-run with the same inputs reuse
    the files untouched (``refs.made_files``).
    """
    return made_files(path + ".inputs.json", _inputs_key(arch, kvs, staged, split),
                      lambda: [r.uri for r in _write_model(path, arch, kvs, staged, split)])


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


def tokenizer_files(ckpt: Checkpoint) -> dict[str, bytes]:
    return {n: data for n in TOKENIZER_FILES if (data := ckpt.read_file(n)) is not None}


# The tokenizer.* keys by (checkpoint, its config and tokenizer files): the same for every quant of
# a run, and building them (the vocabulary, merges, special tokens) costs most of a second.
_TOKENIZER_KVS: dict[tuple, list[GGUFKV]] = {}


def tokenizer_kvs(ckpt: Checkpoint, allow_tokenizer_mismatch: bool = False) -> list[GGUFKV]:
    files = tokenizer_files(ckpt)
    key = (ckpt.uri, ckpt.config_bytes, tuple(sorted(files.items())), allow_tokenizer_mismatch)
    if key not in _TOKENIZER_KVS:
        if len(_TOKENIZER_KVS) >= 4:
            _TOKENIZER_KVS.clear()
        _TOKENIZER_KVS[key] = tokenizer_metadata(files, ckpt.config, ckpt.uri, allow_tokenizer_mismatch)
    return list(_TOKENIZER_KVS[key])


def model_metadata(ckpt: Checkpoint, quant: QuantType, name: str, source_fingerprint: str,
                   staged: Sequence[StagedTensor], extra: Sequence[GGUFKV] = (),
                   allow_tokenizer_mismatch: bool = False) -> tuple[str, list[GGUFKV]]:
    """(architecture, every metadata key of the model GGUF), from the checkpoint and the staged tensors.

    ``extra``: keys llama-quantize adds for this file (the quantize.imatrix.* keys). ``name``: the
    model's name (``--name``; by default the checkpoint folder's), which gguf.Metadata mines for
    general.name & co. where convert mines its model folder's name: the same by default, and a
    file that does not depend on where the checkpoint lay.
    ``allow_tokenizer_mismatch``: write the tokenizer even when llama.cpp does not reproduce it.
    """
    spec, structure, _ = checkpoint_model(ckpt)
    tok = tokenizer_kvs(ckpt, allow_tokenizer_mismatch)
    provenance = Provenance(
        source_fingerprint=source_fingerprint, structure=structure, converter=CONVERTER,
        max_bake_error=max((s.bake_error for s in staged if s.bake_error is not None), default=0.0))
    general = general_kvs(spec.arch, name, model_card_files(ckpt), parameter_counts([(s.gguf_name, s.shape)
                                                                                      for s in staged]))
    return spec.arch, model_kvs(general, spec, quant, tok, provenance, extra)


def model_file_size(ckpt: Checkpoint, quant: QuantType, name: str,
                    tensors: Sequence[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]],
                    extra: Sequence[GGUFKV] = (), allow_tokenizer_mismatch: bool = False) -> int:
    """The size of the model GGUF (unsplit) :func:`assemble_model` writes for these tensors (name,
    shape, type) with :func:`model_metadata`'s keys, before anything is read whole, baked or
    quantized: the values only those know, the source fingerprint (a sha256) and the largest bake
    error (a float32), have a fixed size."""
    planned = [SimpleNamespace(gguf_name=n, shape=tuple(shape), bake_error=0.0) for n, shape, _ in tensors]
    arch, kvs = model_metadata(ckpt, quant, name, "0" * 64, planned, extra, allow_tokenizer_mismatch)
    return gguf_size(arch, kvs, [TensorInfo(n, tuple(shape), t, tensor_nbytes(tuple(shape), t))
                                 for n, shape, t in tensors])


def f32_file_size(ckpt: Checkpoint, name: str, shapes: Sequence[tuple[str, Sequence[int]]],
                  allow_tokenizer_mismatch: bool = False) -> int:
    """The size of the run's F32 file of these tensors (name, shape): what a target size's
    metadata overhead is measured from (quantize.target.file_overhead)."""
    return model_file_size(ckpt, quant_type("F32"), name,
                           [(n, tuple(shape), gguf.GGMLQuantizationType.F32) for n, shape in shapes],
                           allow_tokenizer_mismatch=allow_tokenizer_mismatch)


def model_card_files(ckpt: Checkpoint) -> dict[str, bytes]:
    """What gguf.Metadata reads for general.*: the model card, config.json, generation_config.json."""
    files = {n: data for n in MODEL_CARD_FILES if n != "config.json" and (data := ckpt.read_file(n)) is not None}
    files["config.json"] = ckpt.config_bytes
    return files
