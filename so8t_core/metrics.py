"""Numerical comparison metrics for validation gates (pure numpy, float64 throughout).

Two families:

* logit comparisons between a reference model (e.g. the Hugging Face checkpoint in
  float32) and a test model (the GGUF in llama.cpp): per-position KL divergence,
  top-1 agreement and top-5 set agreement (here);
* tensor reconstruction errors (e.g. a weight before and after quantization):
  RMSE, relative RMSE, max abs error, cosine similarity and SNR in dB
  (:mod:`so8t_core.quantize.error_stats`, where the quantize stage computes them).

All results are computed in float64 regardless of the input dtype, so float32 inputs
with many elements do not lose precision to float32 accumulation. Mismatched shapes
are a programming error and raise :class:`ValueError`. Dictionaries contain plain
Python ``int``/``float`` values so they can go straight into a JSON report (note
that ``inf`` and ``nan`` are still possible values, see each function).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# Elements per chunk in tensor_error_stats: bounds each float64 temporary to 8 MiB
# per temporary even for multi-GB weight tensors.
_CHUNK_ELEMENTS = 1 << 20

TOPK_SET_SIZE = 5


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, returned as float64.

    ``-inf`` logits (masked tokens) are allowed and give ``-inf`` log-probabilities as
    long as at least one logit in the row is finite.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("log_softmax: logits must have at least one axis (the vocabulary)")
    if x.shape[-1] == 0:
        raise ValueError("log_softmax: the vocabulary axis is empty")
    row_max = np.max(x, axis=-1, keepdims=True)
    # A row whose max is not finite (all -inf) would produce inf - inf = nan in the
    # shift; use 0 as the shift there so the nan comes only from the data itself.
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    shifted = x - row_max
    with np.errstate(divide="ignore"):
        log_norm = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return shifted - log_norm


def _as_positions(logits: np.ndarray) -> np.ndarray:
    """View logits as [n_positions, n_vocab] (a single 1-D row counts as one position)."""
    x = np.asarray(logits)
    if x.ndim == 0:
        raise ValueError("logits must have at least one axis (the vocabulary)")
    if x.shape[-1] == 0:
        raise ValueError("logits: the vocabulary axis is empty")
    return x.reshape(-1, x.shape[-1])


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row ranges whose float64 temporaries stay around _CHUNK_ELEMENTS elements."""
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _kl_rows(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    log_p = log_softmax(ref)
    log_q = log_softmax(test)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0.0, p * (log_p - log_q), 0.0)
    kld = np.sum(terms, axis=-1)
    # Clamp rounding noise (e.g. -1e-17 for identical rows); nan stays nan.
    return np.where(kld < 0.0, 0.0, kld)


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per-position ``KL(P_ref || P_test)`` in nats, float64, shape ``logits.shape[:-1]``.

    ``P = softmax(logits)`` over the last axis. Tokens with ``P_ref == 0`` contribute
    nothing (``0 * log 0 = 0``); a token with ``P_ref > 0`` but ``P_test == 0`` gives
    ``inf``. Tiny negative values from rounding are clamped to 0, so the result is
    always ``>= 0`` (or nan if an input row is nan). Rows are processed in blocks,
    so memory stays bounded for long sequences over large vocabularies.
    """
    ref_in = np.asarray(ref_logits)
    test_in = np.asarray(test_logits)
    check_same_shape(ref_in, test_in, "kl_divergence")
    ref = _as_positions(ref_in)
    test = _as_positions(test_in)
    kld = np.empty(ref.shape[0], dtype=np.float64)
    for rows in _row_blocks(*ref.shape):
        kld[rows] = _kl_rows(ref[rows], test[rows])
    return kld.reshape(ref_in.shape[:-1])


def _topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean [n, vocab] mask of each row's top-k tokens, O(vocab) per row.

    Ties at the k-th value are broken towards the lower token id, so the set is
    deterministic (a full argsort of a 50k-150k vocabulary per row is ~10x slower).
    """
    k = min(k, x.shape[-1])
    kth = -np.partition(-x, k - 1, axis=-1)[:, k - 1:k]  # k-th largest value per row
    greater = x > kth
    equal = x == kth
    room = k - np.count_nonzero(greater, axis=-1, keepdims=True)
    return greater | (equal & (np.cumsum(equal, axis=-1) <= room))


def logit_agreement(ref_logits: np.ndarray, test_logits: np.ndarray) -> dict[str, Any]:
    """Summary of how closely ``test_logits`` follows ``ref_logits``, position by position.

    Inputs are ``[..., n_vocab]`` (typically ``[n_tokens, n_vocab]``). Returns::

        {"n_tokens": int,            # positions compared
         "mean_kld": float,          # mean of KL(P_ref || P_test), nats
         "max_kld": float,
         "top1_agreement": float,    # fraction of positions with the same argmax, in [0, 1]
         "same_topk5": float}        # fraction whose top-5 token *sets* are identical

    Ties (for the argmax and at the 5th place) are broken towards the lower token id.
    A nan logit makes ``mean_kld``/``max_kld`` nan, which fails any ``<=`` gate.
    """
    check_same_shape(np.asarray(ref_logits), np.asarray(test_logits), "logit_agreement")
    ref = _as_positions(ref_logits)
    test = _as_positions(test_logits)
    n = int(ref.shape[0])
    if n == 0:
        raise ValueError("logit_agreement: no positions to compare")
    kld = np.empty(n, dtype=np.float64)
    top1 = 0
    same_k = 0
    for rows in _row_blocks(*ref.shape):
        r, t = ref[rows], test[rows]
        kld[rows] = _kl_rows(r, t)
        top1 += int(np.count_nonzero(np.argmax(r, axis=-1) == np.argmax(t, axis=-1)))
        masks_equal = _topk_mask(r, TOPK_SET_SIZE) == _topk_mask(t, TOPK_SET_SIZE)
        same_k += int(np.count_nonzero(np.all(masks_equal, axis=-1)))
    return {
        "n_tokens": n,
        "mean_kld": float(np.mean(kld)),
        "max_kld": float(np.max(kld)),
        "top1_agreement": top1 / n,
        "same_topk5": same_k / n,
    }
