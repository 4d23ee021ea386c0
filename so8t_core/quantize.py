"""Quantization: engines, per-tensor bytes, and the staging of quantized tensors.

Which type each tensor gets is decided by :mod:`so8t_core.quant_mix` (llama.cpp's mixes).
The bytes come from one of three engines that produce the same bytes:

* ``ggml``: libggml's own quantizers (``ggml_quantize_chunk``) through ctypes, i.e. exactly
  what llama-quantize writes; threads over row chunks. The oracle the others are checked
  against, and the only engine for importance-matrix quantization.
* ``simd``: our C extension (``_kquants.c``), the same reference algorithms run on many
  blocks at once in SIMD lanes, 3-10× faster than libggml's scalar code on the K types
  (tests/test_simd_engine.py, benchmarks/engines.py). Types it does not speed up, and
  imatrix quantization, go to ``ggml``.
* ``torch``: a vectorized port of the reference quantizers that runs on CUDA when present,
  checked byte for byte against ``ggml`` (tests/test_torch_engine.py).

``auto`` picks ``torch`` when a GPU is present, else ``simd`` when its extension is built,
else ``ggml``.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .checkpoint import Checkpoint
from .constants import NOT_STORAGE_TYPES, QUANT_TYPES, QuantType
from .errors import UnsupportedError
from .lora import LoraAdapter, MergedReader
from .metrics import ErrorStats
from .plan import Materializer, TensorPlan
from .refs import StagedTensor
from .storage import local_atomic_file

# Part of every staging key: bump when the bytes for the same inputs may change. All
# engines write identical bytes, so the engine is not part of the key.
FORMAT_VERSION = "llama.cpp-0.3.36/1"
ENGINES = ("auto", "simd", "ggml", "torch")
# Types whose quantizer uses an importance matrix when given one (llama-quantize --imatrix).
IMATRIX_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                 GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
                 GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}


def quant_type(name: str) -> QuantType:
    key = name.upper()
    if key in QUANT_TYPES:
        return QUANT_TYPES[key]
    if key in NOT_STORAGE_TYPES:
        raise UnsupportedError(f"--quant {name}", NOT_STORAGE_TYPES[key], "use --quant Q8_0")
    raise UnsupportedError(f"--quant {name}", "unknown or not yet supported quant type",
                           f"choose from {', '.join(QUANT_TYPES)}")


def ggml_type(name: str, where: str) -> GGMLQuantizationType:
    """A GGML tensor type by name, for overrides like --output-tensor-type q8_0."""
    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        qtype = None
    if qtype is None or qtype.name in NOT_STORAGE_TYPES or qtype not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedError(where, f"{name!r} is not a tensor type so8t-gguf writes",
                               f"choose from {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}")
    return qtype


SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q2_K,
)


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise UnsupportedError(f"--engine {engine}", "unknown engine", f"choose from {', '.join(ENGINES)}")
    from . import simd_engine

    if engine == "simd" and not simd_engine.available():
        raise UnsupportedError("--engine simd", "the simd engine's C extension is not built",
                               "reinstall with a C compiler (pip install -e .), or use --engine ggml")
    if engine != "auto":
        return engine
    if _gpu_driver_present():  # importing torch costs seconds: only where a GPU may be
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "simd" if simd_engine.available() else "ggml"


def _gpu_driver_present() -> bool:
    """Whether a CUDA or ROCm driver is loaded (what torch.cuda needs), without importing torch."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, engine: str = "ggml",
             imatrix: np.ndarray | None = None, n_threads: int | None = None) -> bytes | memoryview:
    """float32 tensor → the exact bytes GGUF stores for ``qtype`` (what llama-quantize writes).

    Returns a byte buffer (no copy of large tensors): len, hashing, writing and comparing
    work on it as on bytes.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return memoryview(arr).cast("B")
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(1, -1)
    if engine == "torch" and imatrix is None:  # importance-weighted quantizers are ggml's only
        from .torch_engine import quantize_rows as torch_quantize_rows

        return torch_quantize_rows(rows, qtype)
    if engine == "simd" and imatrix is None:
        from . import simd_engine

        if qtype in simd_engine.SUPPORTED:
            return simd_engine.quantize_rows(rows, qtype, n_threads)
    from .ggml_engine import quantize_rows

    return quantize_rows(rows, qtype, imatrix=imatrix, n_threads=n_threads)


def dequantize(raw: bytes | np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               n_threads: int | None = None) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if qtype == GGMLQuantizationType.F32:
        return buf.view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return buf.view(np.float16).astype(np.float32).reshape(shape)
    from .ggml_engine import dequantize_rows  # llama.cpp's own to_float, at C speed

    return dequantize_rows(buf, qtype, shape[-1], n_threads).reshape(shape)


# --- one planned tensor → staged bytes ---------------------------------------------------

def staging_key(source_sha256: Sequence[str], item: TensorPlan, qtype: GGMLQuantizationType,
                imatrix_sha256: str | None = None) -> str:
    """Content address of a staged tensor: what went in, what was done, what came out."""
    text = "|".join([*source_sha256, item.transform_id(), item.gguf_name, qtype.name, imatrix_sha256 or "",
                     FORMAT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()


def stage_tensor(ckpt: Checkpoint, item: TensorPlan, targets: Sequence[tuple[str, GGMLQuantizationType]],
                 staging_dir: str, source_sha256: Sequence[str], engine: str = "ggml",
                 imatrix: np.ndarray | None = None, n_threads: int | None = None,
                 adapter: LoraAdapter | None = None) -> list[StagedTensor]:
    """Materialize one planned tensor (bake/permute), quantize it to each (quant, type) target, stage it.

    An item marked with a LoRA pair (``item.lora``) reads its source with the adapter's delta
    merged in, row chunk by row chunk, before the permutation or bake.

    The tensor streams through in row chunks: each chunk is read by byte range, transformed,
    quantized for every target, compared with its dequantization, and appended to the staged
    files, so memory holds a few chunks, never the tensor. Staged files are content-addressed;
    one already staged (same inputs, same code version) is reused, not recomputed.
    """
    imatrix_sha = _imatrix_sha256(imatrix)
    done: dict[int, StagedTensor] = {}
    todo = []
    for i, (quant_name, qtype) in enumerate(targets):
        weights = imatrix if qtype in IMATRIX_TYPES else None
        bin_path = _staged_path(staging_dir, source_sha256, item, qtype, imatrix_sha)
        cached = _staged(bin_path)
        if cached is not None:
            done[i] = cached.model_copy(update={"quant": quant_name})
        else:
            todo.append((i, quant_name, qtype, weights, bin_path))
    if todo:
        t0 = time.perf_counter()
        outputs = {i: _StagedWriter(path) for i, _, _, _, path in todo}
        try:
            reader = ckpt
            if item.lora is not None:
                if adapter is None or adapter.pairs.get(item.source) is None \
                        or adapter.pairs[item.source].sha256 != item.lora:
                    raise UnsupportedError(item.gguf_name, "planned with a LoRA pair the given adapter does not have",
                                           "pass the adapter the plan was made with")
                reader = MergedReader(ckpt, adapter)
            materializer = Materializer(item, reader, ckpt.uri)
            for _, chunk in materializer.chunks():
                for i, _, qtype, weights, _ in todo:
                    raw = quantize(chunk, qtype, engine, weights, n_threads)
                    outputs[i].add(raw, chunk, dequantize(raw, qtype, chunk.shape, n_threads))
            seconds = time.perf_counter() - t0
            for i, quant_name, qtype, _, bin_path in todo:
                sha, nbytes, stats = outputs[i].finish()
                staged = StagedTensor(
                    gguf_name=item.gguf_name, source=item.source, layer=item.layer, tensor_class=item.tensor_class,
                    quant=quant_name, ggml_type=qtype.name, shape=item.shape, uri=bin_path, sha256=sha,
                    nbytes=nbytes, seconds=seconds, bake_error=materializer.bake_error, **stats)
                with local_atomic_file(bin_path[:-4] + ".json") as tmp:
                    with open(tmp, "w") as f:
                        f.write(staged.model_dump_json())
                done[i] = staged
        finally:
            for w in outputs.values():
                w.close()
    return [done[i] for i in range(len(targets))]


def _imatrix_sha256(imatrix: np.ndarray | None) -> str | None:
    return None if imatrix is None else hashlib.sha256(np.ascontiguousarray(imatrix).tobytes()).hexdigest()


def _staged_path(staging_dir: str, source_sha256: Sequence[str], item: TensorPlan, qtype: GGMLQuantizationType,
                 imatrix_sha: str | None) -> str:
    key = staging_key(source_sha256, item, qtype, imatrix_sha if qtype in IMATRIX_TYPES else None)
    return os.path.join(staging_dir, key[:2], key + ".bin")


def find_staged(item: TensorPlan, targets: Sequence[tuple[str, GGMLQuantizationType]], staging_dir: str,
                source_sha256: Sequence[str], imatrix: np.ndarray | None = None) -> list[StagedTensor] | None:
    """The staged records of ``item`` for every target, or None when any is missing: a file
    lookup, so a re-run schedules no task for what an earlier run (even a killed one) staged."""
    found = []
    imatrix_sha = _imatrix_sha256(imatrix)
    for quant_name, qtype in targets:
        staged = _staged(_staged_path(staging_dir, source_sha256, item, qtype, imatrix_sha))
        if staged is None:
            return None
        found.append(staged.model_copy(update={"quant": quant_name}))
    return found


def _staged(bin_path: str) -> StagedTensor | None:
    meta_path = bin_path[:-4] + ".json"
    if not (os.path.exists(meta_path) and os.path.exists(bin_path)):
        return None
    staged = StagedTensor.model_validate_json(open(meta_path, "rb").read())
    return staged if os.path.getsize(bin_path) == staged.nbytes else None


class _StagedWriter:
    """Appends chunks of one staged tensor to a temporary file; renamed into place on finish."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}-{id(self)}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.stats = ErrorStats()

    def add(self, raw, reference: np.ndarray, approx: np.ndarray) -> None:
        self.file.write(raw)
        self.sha.update(raw)
        self.nbytes += len(raw)
        self.stats.add(reference, approx)

    def finish(self) -> tuple[str, int, dict]:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest(), self.nbytes, self.stats.result()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
