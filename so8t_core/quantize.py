"""Per-tensor type choice and quantization.

The type rules follow llama.cpp (src/llama-quant.cpp and convert_hf_to_gguf.py): 1-D
tensors, norms and non-``weight`` tensors stay F32; every other tensor takes the
quant's default type, falling back to F16 when its row length is not a multiple of
the block size. The bytes come from gguf-py's quantizers, which are byte-identical
to libggml's reference quantizers for the types offered here
(../shared/notes/gguf-quants.md §2). K-quants and the mixes come with their engine.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from .checkpoint import Checkpoint
from .constants import NOT_STORAGE_TYPES, QUANT_TYPES, QuantType
from .errors import UnsupportedError
from .metrics import tensor_error_stats
from .plan import TensorPlan, materialize
from .refs import StagedTensor
from .storage import local_atomic_file

ENGINE_VERSION = "gguf-py-0.19.0/1"  # part of every cache key: bump when bytes may change


def quant_type(name: str) -> QuantType:
    key = name.upper()
    if key in QUANT_TYPES:
        return QUANT_TYPES[key]
    if key in NOT_STORAGE_TYPES:
        raise UnsupportedError(f"--quant {name}", NOT_STORAGE_TYPES[key], "use --quant Q8_0")
    raise UnsupportedError(f"--quant {name}", "unknown or not yet supported quant type",
                           f"choose from {', '.join(QUANT_TYPES)}")


def keeps_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp never quantizes 1-D tensors, norms, or tensors not named *.weight."""
    return len(shape) < 2 or not gguf_name.endswith("weight") or "_norm.weight" in gguf_name


def target_type(gguf_name: str, shape: tuple[int, ...], quant: QuantType) -> GGMLQuantizationType:
    if keeps_f32(gguf_name, shape):
        return GGMLQuantizationType.F32
    qtype = quant.default_type
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return GGMLQuantizationType.F16  # llama.cpp: "must use F16 due to unusual shape"
    return qtype


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> bytes:
    """float32 tensor → the exact bytes GGUF stores for ``qtype``."""
    arr = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return arr.tobytes()
    return gguf_quants.quantize(arr, qtype).tobytes()


def dequantize(raw: bytes | np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if qtype == GGMLQuantizationType.F32:
        return buf.view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return buf.view(np.float16).astype(np.float32).reshape(shape)
    block, size = GGML_QUANT_SIZES[qtype]
    rows = buf.reshape(-1, shape[-1] // block * size) if len(shape) > 1 else buf.reshape(1, -1)
    return gguf_quants.dequantize(rows, qtype).reshape(shape).astype(np.float32, copy=False)


# --- one planned tensor → staged bytes ---------------------------------------------------

def staging_key(source_sha256: Sequence[str], item: TensorPlan, qtype: GGMLQuantizationType) -> str:
    """Content address of a staged tensor: what went in, what was done, what came out."""
    text = "|".join([*source_sha256, item.transform_id(), item.gguf_name, qtype.name, ENGINE_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()


def stage_tensor(ckpt: Checkpoint, item: TensorPlan, quants: Sequence[QuantType], staging_dir: str,
                 source_sha256: Sequence[str]) -> list[StagedTensor]:
    """Materialize one planned tensor (bake/permute), quantize it for every quant, stage the bytes.

    Staged files are content-addressed; one already staged (same inputs, same code
    version) is reused, not recomputed.
    """
    out: list[StagedTensor] = []
    data: np.ndarray | None = None
    bake_err: float | None = None
    for quant in quants:
        qtype = target_type(item.gguf_name, item.shape, quant)
        key = staging_key(source_sha256, item, qtype)
        bin_path = os.path.join(staging_dir, key[:2], key + ".bin")
        meta_path = bin_path[:-4] + ".json"
        if os.path.exists(meta_path) and os.path.exists(bin_path):
            staged = StagedTensor.model_validate_json(open(meta_path, "rb").read())
            if os.path.getsize(bin_path) == staged.nbytes:
                out.append(staged.model_copy(update={"quant": quant.name}))
                continue
        t0 = time.perf_counter()
        if data is None:
            data, bake_err = materialize(item, ckpt.read, ckpt.uri)
        raw = quantize(data, qtype)
        stats = tensor_error_stats(data, dequantize(raw, qtype, item.shape))
        staged = StagedTensor(
            gguf_name=item.gguf_name, source=item.source, layer=item.layer, tensor_class=item.tensor_class,
            quant=quant.name, ggml_type=qtype.name, shape=item.shape, uri=bin_path,
            sha256=hashlib.sha256(raw).hexdigest(), nbytes=len(raw), seconds=time.perf_counter() - t0,
            bake_error=bake_err, **stats)
        with local_atomic_file(bin_path) as tmp:
            with open(tmp, "wb") as f:
                f.write(raw)
        with local_atomic_file(meta_path) as tmp:
            with open(tmp, "w") as f:
                f.write(staged.model_dump_json())
        out.append(staged)
    return out
