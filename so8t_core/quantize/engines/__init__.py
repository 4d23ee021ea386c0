"""The quantization engines: a float32 tensor in, the exact bytes llama.cpp stores out.

Three engines produce the same bytes:

* ``ggml``: libggml's own quantizers (``ggml_quantize_chunk``) through ctypes, i.e. exactly
  what llama-quantize writes; threads over row chunks. The oracle the others are checked
  against, and the engine for importance-matrix quantization (but for IQ4_NL, IQ4_XS, the K
  types Q2_K-Q6_K and Q4_0-Q5_1, which ``simd`` also quantizes with importance weights).
* ``simd``: our C extension (``_kquants.c``), the same reference algorithms run on many
  blocks at once in SIMD lanes, 3-10× faster than libggml's scalar code on the K types
  and ~25× on IQ4_NL/IQ4_XS (tests/test_simd_engine.py, benchmarks/engines.py). Types it does
  not speed up, and imatrix quantization of types other than IQ4_NL/IQ4_XS/Q2_K-Q6_K/Q4_0-Q5_1 (``simd.WEIGHTED``),
  go to ``ggml``.
* ``torch``: a vectorized port of the reference quantizers that runs on CUDA when present,
  checked byte for byte against ``ggml`` (tests/test_torch_engine.py). Types it has no port
  of (the IQ, ternary, 1-bit and Q2_0 types, MXFP4) go to ``ggml``.

``auto`` picks ``torch`` when a GPU is present, else ``simd`` when its extension is built,
else ``ggml``.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType

from so8t_core.errors import UnsupportedError

ENGINES = ("auto", "simd", "ggml", "torch")


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise UnsupportedError(f"--engine {engine}", "unknown engine", f"choose from {', '.join(ENGINES)}")
    from so8t_core.quantize.engines import simd as simd_engine

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
        from so8t_core.quantize.engines import torch as torch_engine

        if qtype in torch_engine.SUPPORTED:
            return torch_engine.quantize_rows(rows, qtype)
    if engine == "simd":
        from so8t_core.quantize.engines import simd as simd_engine

        if qtype in (simd_engine.SUPPORTED if imatrix is None else simd_engine.WEIGHTED):
            return simd_engine.quantize_rows(rows, qtype, n_threads, imatrix=imatrix)
    from so8t_core.quantize.engines.ggml import quantize_rows

    return quantize_rows(rows, qtype, imatrix=imatrix, n_threads=n_threads)


def dequantize(raw: bytes | np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               n_threads: int | None = None) -> np.ndarray:
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if qtype == GGMLQuantizationType.F32:
        return buf.view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return buf.view(np.float16).astype(np.float32).reshape(shape)
    from so8t_core.quantize.engines.ggml import dequantize_rows  # llama.cpp's own to_float, at C speed

    return dequantize_rows(buf, qtype, shape[-1], n_threads).reshape(shape)
