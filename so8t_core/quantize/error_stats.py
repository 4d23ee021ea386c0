"""A tensor's quantization error: RMSE, relative RMSE, max abs error, cosine, SNR (float64).

Computed by the quantize stage on every row chunk it quantizes (streaming, so memory stays one
chunk) and by validation on the tensors read back from the file. With the simd engine's C
extension built, each chunk's sums take one pass in C with the GIL released.
"""

from __future__ import annotations

import math

import numpy as np

from so8t_core.metrics import check_same_shape

try:  # the simd engine's C extension (optional): single-pass error sums
    from so8t_core.quantize.engines._kquants import error_sums as _error_sums
except ImportError:
    _error_sums = None

# Elements per chunk: bounds each float64 temporary to 8 MiB even for multi-GB weight tensors.
_CHUNK_ELEMENTS = 1 << 20


class ErrorStats:
    """Accumulates :func:`tensor_error_stats` over chunks of a tensor (same results as one call)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_ref2 = self.sum_app2 = self.sum_err2 = self.dot = self.max_abs = 0.0

    def add(self, reference: np.ndarray, approx: np.ndarray) -> None:
        ref, app = np.asarray(reference), np.asarray(approx)
        check_same_shape(ref, app, "tensor_error_stats")
        ref_flat, app_flat = ref.reshape(-1), app.reshape(-1)
        for start in range(0, ref_flat.size, _CHUNK_ELEMENTS):
            r = ref_flat[start:start + _CHUNK_ELEMENTS]
            a = app_flat[start:start + _CHUNK_ELEMENTS]
            if _error_sums is not None and r.dtype == a.dtype == np.float32:
                # One pass in C, float64 sums, GIL released (the quantize stage's hot loop).
                ref2, app2, err2, dot, chunk_max = _error_sums(np.ascontiguousarray(r), np.ascontiguousarray(a))
            else:
                r, a = r.astype(np.float64), a.astype(np.float64)
                e = a - r
                # einsum, not np.dot: BLAS's dot product rounds differently with its thread count
                # (Dask workers run BLAS single-threaded), einsum the same in every process.
                ref2, app2, err2, dot = (float(np.einsum("i,i->", r, r)), float(np.einsum("i,i->", a, a)),
                                         float(np.einsum("i,i->", e, e)), float(np.einsum("i,i->", r, a)))
                chunk_max = float(np.max(np.abs(e)))
            self.sum_ref2 += ref2
            self.sum_app2 += app2
            self.sum_err2 += err2
            self.dot += dot
            if chunk_max > self.max_abs or math.isnan(chunk_max):
                self.max_abs = chunk_max
        self.n += ref_flat.size

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("tensor_error_stats: tensors are empty")
        rmse = math.sqrt(self.sum_err2 / self.n)
        rms_ref = math.sqrt(self.sum_ref2 / self.n)
        if rms_ref > 0.0:
            relative_rmse = rmse / rms_ref
        else:
            relative_rmse = 0.0 if rmse == 0.0 else math.inf
        if self.sum_ref2 == 0.0 and self.sum_app2 == 0.0:
            cosine = 1.0
        elif self.sum_ref2 == 0.0 or self.sum_app2 == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / (math.sqrt(self.sum_ref2) * math.sqrt(self.sum_app2))
            if not math.isnan(cosine):  # rounding can overshoot |cos| = 1 slightly
                cosine = max(-1.0, min(1.0, cosine))
        if self.sum_err2 == 0.0:
            snr_db = math.inf
        elif self.sum_ref2 == 0.0:
            snr_db = -math.inf
        else:
            snr_db = 10.0 * math.log10(self.sum_ref2 / self.sum_err2)
        return {"rmse": rmse, "relative_rmse": relative_rmse, "max_abs_error": self.max_abs, "cosine": cosine,
                "snr_db": snr_db}


def tensor_error_stats(reference: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Error of ``approx`` against ``reference`` (same shape), computed in float64.

    Returns plain floats::

        {"rmse":          sqrt(mean((approx - reference)^2)),
         "relative_rmse": rmse / rms(reference)   (0.0 if both are 0; inf if only rms(reference) is 0),
         "max_abs_error": max |approx - reference|,
         "cosine":        <ref, approx> / (|ref| |approx|)  (1.0 if both all-zero; 0.0 if exactly one is),
         "snr_db":        10 log10(sum ref^2 / sum err^2)   (inf if err == 0; -inf if ref == 0 != err)}

    The arrays are processed in chunks, so the float64 working set stays small even
    for multi-GB tensors.
    """
    stats = ErrorStats()
    stats.add(reference, approx)
    return stats.result()
