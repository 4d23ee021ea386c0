"""so8t_core.metrics against hand-computed values and edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from so8t_core.metrics import kl_divergence, log_softmax, logit_agreement
from so8t_core.quantize.error_stats import tensor_error_stats

# --- log_softmax -------------------------------------------------------------------------


def test_log_softmax_known_values_and_float64():
    out = log_softmax(np.array([0.0, math.log(3.0)], dtype=np.float32))
    assert out.dtype == np.float64
    np.testing.assert_allclose(np.exp(out), [0.25, 0.75], rtol=1e-6)


def test_log_softmax_is_stable_for_huge_logits():
    out = log_softmax(np.array([[1000.0, 1000.0], [-1000.0, 0.0]]))
    np.testing.assert_allclose(out[0], [-math.log(2.0)] * 2, rtol=1e-15)
    assert out[1, 1] == 0.0 and out[1, 0] == pytest.approx(-1000.0)
    assert np.all(np.isfinite(out))


def test_log_softmax_masked_tokens():
    out = log_softmax(np.array([0.0, -np.inf, 0.0]))
    assert out[1] == -np.inf
    np.testing.assert_allclose(out[[0, 2]], [-math.log(2.0)] * 2)


# --- kl_divergence -----------------------------------------------------------------------


def test_kld_of_identical_logits_is_zero():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(7, 300)).astype(np.float32)
    kld = kl_divergence(logits, logits.copy())
    assert kld.shape == (7,) and kld.dtype == np.float64
    assert np.all(kld == 0.0)  # clamped: never slightly negative


def test_kld_two_class_closed_form():
    # P = (3/4, 1/4), Q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kld = kl_divergence(np.array([math.log(3.0), 0.0]), np.array([0.0, 0.0]))
    assert kld.shape == ()
    assert float(kld) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1308120, abs=1e-7)


def test_kld_sigmoid_form_and_shift_invariance():
    for a, b in [(2.0, -1.0), (-3.5, 0.25), (10.0, 9.0)]:
        p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
        expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        got = kl_divergence(np.array([[a, 0.0]]), np.array([[b + 7.0, 7.0]]))  # shifted test logits
        assert got[0] == pytest.approx(expected, rel=1e-10)


def test_kld_zero_probability_tokens():
    # A token the reference never predicts contributes nothing ...
    kld = kl_divergence(np.array([0.0, -np.inf]), np.array([0.0, 0.0]))
    assert float(kld) == pytest.approx(math.log(2.0))
    # ... but one the test model rules out while the reference does not is infinite.
    assert float(kl_divergence(np.array([0.0, 0.0]), np.array([0.0, -np.inf]))) == math.inf


def test_kld_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(np.zeros((2, 5)), np.zeros((2, 6)))


# --- logit_agreement ---------------------------------------------------------------------


def test_logit_agreement_counts():
    vocab = 8
    ref = np.tile(np.arange(vocab, dtype=np.float32)[::-1], (4, 1))  # argmax 0, top5 {0..4}
    test = ref.copy()
    test[1, 5] = 100.0  # position 1: argmax differs, top5 set differs
    test[2, [3, 4]] = test[2, [4, 3]]  # position 2: order inside top5 changes, set is the same
    test[3, 4], test[3, 6] = -1.0, 3.5  # position 3: argmax same, top5 set differs
    stats = logit_agreement(ref, test)
    assert stats["n_tokens"] == 4 and isinstance(stats["n_tokens"], int)
    assert stats["top1_agreement"] == pytest.approx(3 / 4)
    assert stats["same_topk5"] == pytest.approx(2 / 4)
    kld = kl_divergence(ref, test)
    assert kld[0] == 0.0 and kld[1] > 0
    assert stats["mean_kld"] == pytest.approx(float(np.mean(kld)))
    assert stats["max_kld"] == pytest.approx(float(np.max(kld)))
    assert all(type(v) in (int, float) for v in stats.values())
    json.dumps(stats)


def test_logit_agreement_identical_and_single_row():
    logits = np.random.default_rng(1).normal(size=(3, 50))
    assert logit_agreement(logits, logits) == {
        "n_tokens": 3, "mean_kld": 0.0, "max_kld": 0.0, "top1_agreement": 1.0, "same_topk5": 1.0}
    assert logit_agreement(logits[0], logits[0])["n_tokens"] == 1


def test_logit_agreement_bad_input():
    with pytest.raises(ValueError):
        logit_agreement(np.zeros((3, 10)), np.zeros((4, 10)))
    with pytest.raises(ValueError):
        logit_agreement(np.zeros((0, 10)), np.zeros((0, 10)))


# --- tensor_error_stats ------------------------------------------------------------------


def test_error_stats_known_arrays():
    stats = tensor_error_stats(np.array([3.0, 4.0]), np.array([3.0, 5.0]))
    assert stats["rmse"] == pytest.approx(math.sqrt(0.5))
    assert stats["relative_rmse"] == pytest.approx(math.sqrt(0.5) / math.sqrt(12.5))  # = 0.2
    assert stats["relative_rmse"] == pytest.approx(0.2)
    assert stats["max_abs_error"] == 1.0
    assert stats["cosine"] == pytest.approx(29.0 / (5.0 * math.sqrt(34.0)))
    assert stats["snr_db"] == pytest.approx(10.0 * math.log10(25.0))
    assert all(type(v) is float for v in stats.values())


def test_error_stats_identical_and_zero():
    a = np.array([[1.0, -2.0], [0.5, 8.0]], dtype=np.float32)
    same = tensor_error_stats(a, a.copy())
    assert same == {"rmse": 0.0, "relative_rmse": 0.0, "max_abs_error": 0.0,
                    "cosine": pytest.approx(1.0), "snr_db": math.inf}
    zeros = tensor_error_stats(np.zeros(5), np.zeros(5))
    assert zeros == {"rmse": 0.0, "relative_rmse": 0.0, "max_abs_error": 0.0, "cosine": 1.0,
                     "snr_db": math.inf}
    only_ref_zero = tensor_error_stats(np.zeros(4), np.ones(4))
    assert only_ref_zero["relative_rmse"] == math.inf
    assert only_ref_zero["cosine"] == 0.0 and only_ref_zero["snr_db"] == -math.inf
    assert tensor_error_stats(np.ones(4), np.zeros(4))["cosine"] == 0.0
    assert tensor_error_stats(np.ones(3), -np.ones(3))["cosine"] == pytest.approx(-1.0)


def test_error_stats_float32_overflow_and_precision():
    # Squares of 2**66 (~7e19) overflow float32 (max ~2**128); float64 handles them.
    # Powers of two keep every input exactly representable.
    ref = np.full(1000, 2.0**66, dtype=np.float32)
    approx = ref * np.float32(1 + 2**-10)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(ref * ref))  # what float32 arithmetic would give
    stats = tensor_error_stats(ref, approx)
    assert stats["snr_db"] == pytest.approx(20.0 * 10 * math.log10(2.0), rel=1e-9)  # 60.206 dB
    assert stats["relative_rmse"] == pytest.approx(2**-10, rel=1e-9)
    assert math.isfinite(stats["rmse"])

    # Many elements, spanning several internal chunks: matches an exact float64 reference.
    rng = np.random.default_rng(2)
    ref = (rng.normal(size=5_000_003) * 1e3).astype(np.float32)
    approx = ref + rng.normal(size=ref.size).astype(np.float32) * np.float32(1e-2)
    r64, a64 = ref.astype(np.float64), approx.astype(np.float64)
    e64 = a64 - r64
    stats = tensor_error_stats(ref, approx)
    assert stats["rmse"] == pytest.approx(math.sqrt(math.fsum(e64 * e64) / ref.size), rel=1e-12)
    assert stats["max_abs_error"] == float(np.max(np.abs(e64)))
    assert stats["snr_db"] == pytest.approx(
        10 * math.log10(math.fsum(r64 * r64) / math.fsum(e64 * e64)), rel=1e-12)
    assert stats["cosine"] == pytest.approx(
        math.fsum(r64 * a64) / math.sqrt(math.fsum(r64 * r64) * math.fsum(a64 * a64)), rel=1e-12)


def test_error_stats_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_error_stats(np.zeros((2, 3)), np.zeros((3, 2)))


def test_nan_propagates_instead_of_passing_gates():
    ref = np.zeros((2, 4))
    test = ref.copy()
    test[1, 2] = np.nan  # e.g. a broken GGUF producing nan logits
    stats = logit_agreement(ref, test)
    assert math.isnan(stats["mean_kld"]) and not stats["mean_kld"] <= 1.0
    err = tensor_error_stats(ref + 1.0, test + 1.0)
    assert math.isnan(err["rmse"]) and math.isnan(err["max_abs_error"]) and math.isnan(err["cosine"])


def test_kld_keeps_leading_axes():
    ref = np.random.default_rng(3).normal(size=(2, 3, 10))
    kld = kl_divergence(ref, ref[..., ::-1])
    assert kld.shape == (2, 3) and np.all(kld > 0)
    np.testing.assert_allclose(kld.reshape(-1), kl_divergence(ref.reshape(6, 10), ref[..., ::-1].reshape(6, 10)))


def test_c_error_sums_match_float64_numpy():
    """The quantize stage's single-pass C sums equal numpy's float64 reference (to rounding)."""
    from so8t_core.quantize.engines import _kquants

    rng = np.random.default_rng(3)
    for n in (1, 3, 4, 1001, 1 << 16):
        r = rng.standard_normal(n).astype(np.float32) * 3
        a = (r + rng.standard_normal(n).astype(np.float32) * 0.01).astype(np.float32)
        r64, a64 = r.astype(np.float64), a.astype(np.float64)
        want = (r64 @ r64, a64 @ a64, (a64 - r64) @ (a64 - r64), r64 @ a64, np.abs(a64 - r64).max())
        assert _kquants.error_sums(r, a) == pytest.approx(want, rel=1e-12, abs=0)
    a[7] = np.nan
    assert math.isnan(_kquants.error_sums(r, a)[4])
    a[7] = np.inf
    assert _kquants.error_sums(r, a)[4] == np.inf
    with pytest.raises(ValueError, match="same length"):
        _kquants.error_sums(r, a[:-1])
