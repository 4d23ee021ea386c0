"""The CPU quantization engine: libggml's own quantizers, called through ctypes.

llama-cpp-python ships libggml-base, which exports ``ggml_quantize_chunk``: the function
llama-quantize calls. Without an importance matrix it runs the reference (``*_ref``)
quantizers, so its bytes are llama-quantize's bytes by construction. ctypes releases
the GIL during the call, so a thread pool over row chunks runs it in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ENGINE_NAME = "ggml"
# Work is split into this many chunks per thread and handed out dynamically, so a thread
# that runs slower (a busy core) does not hold the others up, as llama-quantize does.
CHUNKS_PER_THREAD = 8


@functools.lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base, with the quantizers' signatures declared."""
    import llama_cpp

    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h at the pinned llama.cpp)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def _to_float(qtype: GGMLQuantizationType):
    traits = libggml().ggml_get_type_traits(int(qtype)).contents
    block, size = GGML_QUANT_SIZES[qtype]
    if traits.blck_size != block or traits.type_size != size or not traits.to_float:
        raise RuntimeError(f"libggml's type traits for {qtype.name} do not match gguf-py's "
                           f"({traits.blck_size}/{traits.type_size} vs {block}/{size})")
    # A plain function pointer called through ctypes: the GIL is released during the call.
    return ctypes.cast(traits.to_float, ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64))


def dequantize_rows(raw, qtype: GGMLQuantizationType, n_per_row: int, n_threads: int | None = None) -> np.ndarray:
    """Quantized rows → float32 (rows × n_per_row) with libggml's own ``to_float``: what
    llama.cpp computes with, at C speed, threaded over rows like ``quantize_rows``."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    rsize = row_size(qtype, n_per_row)
    if n_per_row % GGML_QUANT_SIZES[qtype][0] or buf.size % rsize:
        raise ValueError(f"{buf.size} bytes are not whole {qtype.name} rows of {n_per_row}")
    nrows = buf.size // rsize
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    to_float = _to_float(qtype)

    def run(start: int, stop: int) -> None:
        to_float(buf[start * rsize:].ctypes.data, out[start].ctypes.data, (stop - start) * n_per_row)

    run_row_chunks(nrows, n_threads, run)
    return out


def run_row_chunks(nrows: int, n_threads: int | None, run) -> None:
    """Call ``run(start, stop)`` over rows ``[0, nrows)``: in one call on one thread, else in
    ``CHUNKS_PER_THREAD`` chunks per thread handed out dynamically. The C code behind ``run``
    releases the GIL, so the threads run in parallel."""
    n_threads = max(1, n_threads or os.cpu_count() or 1)
    if nrows == 0:
        return
    if n_threads == 1 or nrows < 2:
        run(0, nrows)
        return
    chunk = max(1, -(-nrows // (n_threads * CHUNKS_PER_THREAD)))
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(lambda start: run(start, min(nrows, start + chunk)), range(0, nrows, chunk)))


def row_size(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    return int(libggml().ggml_row_size(int(qtype), n_per_row))


def quantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None,
                  n_threads: int | None = None) -> memoryview:
    """Quantize a float32 matrix (rows × n_per_row) with ggml_quantize_chunk, in parallel over rows.

    ``imatrix`` (n_per_row float32 importance weights) switches to the importance-weighted
    quantizers exactly as llama-quantize does with ``--imatrix``.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = arr.shape[-1]
    nrows = arr.size // n_per_row
    block, _ = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block}")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {qw.shape}, expected ({n_per_row},)")
    lib = libggml()
    if qw is None and lib.ggml_quantize_requires_imatrix(int(qtype)):  # libggml would abort the process
        raise ValueError(f"{qtype.name} cannot be quantized without importance data")
    lib.ggml_quantize_init(int(qtype))  # builds the IQ grids once; a no-op for other types
    rsize = row_size(qtype, n_per_row)
    out = np.empty(nrows * rsize, dtype=np.uint8)
    src = arr.reshape(nrows, n_per_row)
    qw_ptr = None if qw is None else qw.ctypes.data

    def run(start: int, stop: int) -> None:
        # ggml_quantize_chunk's `start` is an element offset into src and dst: pass row pointers instead.
        written = lib.ggml_quantize_chunk(int(qtype), src[start].ctypes.data, out[start * rsize:].ctypes.data,
                                          0, stop - start, n_per_row, qw_ptr)
        if written != (stop - start) * rsize:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {(stop - start) * rsize}")

    run_row_chunks(nrows, n_threads, run)
    return out.data  # the buffer itself: no copy of what can be a large tensor
