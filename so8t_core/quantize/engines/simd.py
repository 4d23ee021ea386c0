"""The simd engine, the default on CPU: bit-exact SIMD K-quant quantizers (``so8t_core/quantize/engines/_kquants.c``).

libggml-base, which ``ggml_engine`` calls, is compiled without ``-march`` flags, so its
reference K-quant code is scalar. ``_kquants`` re-implements the same reference algorithms
(``quantize_row_q{2,3,4,5,6}_K_ref``, i.e. ``ggml_quantize_chunk`` without an importance matrix,
which is what llama-quantize runs without ``--imatrix``; also Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0;
IQ4_NL and IQ4_XS with or without importance weights; and the K types with them too, i.e.
``quantize_row_q{2,3,4,5,6}_K_impl``, what llama-quantize runs with ``--imatrix``, and the legacy
types but Q8_0 with them, ``quantize_row_q{4,5}_{0,1}_impl``) and produces **the same bytes**,
several times faster: every float operation is the
reference's own IEEE float32 operation in the reference's order (no FMA, no reassociation), and
the speed comes from quantizing 8-48 independent sub-blocks side by side in SIMD lanes.
Kernels for AVX-512, AVX2 and a generic (SSE2 / plain C) fallback are compiled into the module
and the best one the CPU supports is picked at run time; all give identical bytes.

The C call releases the GIL, so a thread pool over row chunks runs it in parallel, exactly as
``ggml_engine`` does. Types outside ``SUPPORTED``, and importance-matrix quantization but for
the types in ``WEIGHTED``, stay with ``ggml_engine``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from so8t_core.quantize.engines.ggml import run_row_chunks

try:
    from so8t_core.quantize.engines import _kquants
except ImportError as exc:  # not built: `pip install -e .` compiles it (needs a C compiler)
    _kquants = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

ENGINE_NAME = "simd"
# Work is split into this many chunks per thread and handed out dynamically, as in ggml_engine.
CHUNKS_PER_THREAD = 8

#: Every type the extension implements (all byte-identical to ggml_engine / llama-quantize).
IMPLEMENTED: frozenset[GGMLQuantizationType] = (
    frozenset(GGMLQuantizationType(t) for t in _kquants.supported()) if _kquants is not None else frozenset()
)
#: Kernel sets usable on this CPU, best first (e.g. ``("avx512", "avx2", "generic")``).
ISAS: tuple[str, ...] = tuple(_kquants.isas()) if _kquants is not None else ()
#: The kernel set ``quantize_rows`` uses.
ISA: str | None = ISAS[0] if ISAS else None
_K_TYPES = frozenset({GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
                      GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K})
_IQ4_TYPES = frozenset({GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS})
#: The types ``quantize_rows`` takes: those it quantizes faster than libggml on this CPU. The
#: K-quants and IQ4 types always; the legacy 32-element types only with SIMD kernels (libggml's
#: own scalar code for them is already fast), except Q8_0, which the plain-C kernels also speed up.
SUPPORTED: frozenset[GGMLQuantizationType] = (
    IMPLEMENTED if ISA not in (None, "generic")
    else IMPLEMENTED & (_K_TYPES | _IQ4_TYPES | {GGMLQuantizationType.Q8_0})
)
#: The types the extension also quantizes with an importance matrix: IQ4_NL and IQ4_XS (libggml's
#: importance-weighted quantizer for them is the same function as without one), the K types and
#: Q4_0, Q4_1, Q5_0 and Q5_1 (their ``_impl`` functions: another search than without one).
_WEIGHTED_IMPLEMENTED = _IQ4_TYPES | _K_TYPES | {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                                 GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1}
#: The types ``quantize_rows`` also quantizes with an importance matrix.
WEIGHTED: frozenset[GGMLQuantizationType] = SUPPORTED & _WEIGHTED_IMPLEMENTED


def available() -> bool:
    """Whether the compiled extension could be loaded."""
    return _kquants is not None


def row_size(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_per_row // block * size


def quantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, n_threads: int | None = None,
                  imatrix: np.ndarray | None = None) -> memoryview:
    """Quantize a float32 matrix (rows × n_per_row) to ``qtype``, in parallel over rows.

    Same contract and same bytes as ``ggml_engine.quantize_rows(data, qtype, imatrix)``;
    ``imatrix`` (n_per_row importance weights) only for the types in ``WEIGHTED``.
    ``n_per_row`` must be a multiple of the type's block size. Returns the quantized buffer
    itself (no copy).
    """
    return _quantize(data, qtype, n_threads, imatrix=imatrix)


def _quantize(data: np.ndarray, qtype: GGMLQuantizationType, n_threads: int | None = None,
              isa: str | None = None, imatrix: np.ndarray | None = None) -> memoryview:
    """``quantize_rows`` with a choice of kernel set (``isa``: one of ``ISAS``; None = the best).

    With an explicit ``isa`` every type in ``IMPLEMENTED`` is accepted (the tests check them all).
    """
    if _kquants is None:
        raise RuntimeError(f"the simd engine's C extension is not built ({_IMPORT_ERROR}); "
                           "run `pip install -e .` with a C compiler, or use ggml_engine")
    qtype = GGMLQuantizationType(qtype)
    if qtype not in (SUPPORTED if isa is None else IMPLEMENTED):
        raise ValueError(f"{qtype.name} is not supported by the simd engine (supported: "
                         f"{', '.join(sorted(t.name for t in SUPPORTED))}); use ggml_engine")
    isa_index = -1
    if isa is not None:
        if isa not in ISAS:
            raise ValueError(f"kernel set {isa!r} is not usable on this CPU (usable: {', '.join(ISAS)})")
        isa_index = _kquants.ISA_NAMES.index(isa)
    arr = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = arr.shape[-1] if arr.ndim else 0
    block, _ = GGML_QUANT_SIZES[qtype]
    if n_per_row == 0 or n_per_row % block:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block}")
    nrows = arr.size // n_per_row
    qw = None
    if imatrix is not None:
        if qtype not in _WEIGHTED_IMPLEMENTED:
            raise ValueError(f"{qtype.name} with an importance matrix is not supported by the simd engine; "
                             "use ggml_engine")
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {qw.shape}, expected ({n_per_row},)")
    rsize = row_size(qtype, n_per_row)
    out = np.empty(nrows * rsize, dtype=np.uint8)
    src = arr.reshape(nrows, n_per_row)

    def run(start: int, stop: int) -> None:
        written = _kquants.quantize(int(qtype), src[start:stop], out[start * rsize:stop * rsize], stop - start,
                                    n_per_row, isa_index, qw)
        if written != (stop - start) * rsize:
            raise RuntimeError(f"_kquants wrote {written} bytes, expected {(stop - start) * rsize}")

    run_row_chunks(nrows, n_threads, run)
    return out.data  # the buffer itself: no copy of what can be a large tensor
