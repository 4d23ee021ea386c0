"""The simd engine's bytes are libggml's bytes: every supported type, every kernel set, hard data.

The reference is ``ggml_engine.quantize_rows(x, t, n_threads=1)``: libggml-base's own
``ggml_quantize_chunk`` without an importance matrix, i.e. llama-quantize's output; for IQ4_NL,
IQ4_XS, the K types and Q4_0/Q4_1/Q5_0/Q5_1 also with one (``imatrix=``), as llama-quantize runs
them with ``--imatrix``.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from so8t_core.quantize.engines import ggml as ggml_engine
from so8t_core.quantize.engines import simd as simd_engine

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
LEGACY_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
IQ4_TYPES = [T.IQ4_NL, T.IQ4_XS]
ALL_TYPES = K_TYPES + LEGACY_TYPES + IQ4_TYPES
WEIGHTED_TYPES = IQ4_TYPES + K_TYPES + [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # also with importance weights
UNWEIGHTED = T.Q8_0  # in simd's SUPPORTED on every CPU, never quantized with importance weights by it


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs


def _normal(name, rows, cols, scale):
    return (_rng(name).standard_normal((rows, cols)) * scale).astype(np.float32)


def _zero_rows_and_blocks(name):
    x = _normal(name, 32, 2048, 0.02)
    x[3] = 0.0  # a whole row
    x[5, 256:512] = 0.0  # a whole super-block
    x[7, 16:32] = 0.0  # one 16-element sub-block
    x[9, 64:96] = 0.0  # one 32-element sub-block
    x[11, ::2] = 0.0
    x[13, 512:768] = -0.0  # negative zeros
    x[15, 768:1024:16] = 1e-3  # all-zero sub-blocks but one element each
    return x


def _constant(name):
    rows = [np.full(512, v, np.float32) for v in (0.5, -0.5, 3.0, -7.25, 1e-3, -1e-6, 65504.0, 1.0)]
    x = np.stack(rows)
    y = _normal(name, 8, 512, 1.0)
    for r in range(8):  # constant sub-blocks inside random rows
        y[r, 32 * r:32 * r + 32] = (r - 4) * 0.25
        y[r, 256 + 16 * r:256 + 16 * r + 16] = -(r + 1) * 0.125
    return np.concatenate([x, y])


def _outliers(name):
    rng = _rng(name)
    x = _normal(name, 64, 512, 0.02)
    blocks = x.reshape(-1, 256)
    pos = rng.integers(0, 256, len(blocks))
    sign = rng.choice([-1.0, 1.0], len(blocks))
    mag = rng.choice([10.0, 1e3, 1e5], len(blocks))
    blocks[np.arange(len(blocks)), pos] = sign * mag
    return x


def _denormals(name):
    rng = _rng(name)
    parts = [
        rng.standard_normal((8, 256)) * 1e-40,  # float32 denormals
        rng.standard_normal((8, 256)) * 1e-38,  # around FLT_MIN
        rng.standard_normal((8, 256)) * 1e-6,  # fp16-subnormal d and dmin
        rng.standard_normal((8, 256)) * 1e-4,
        rng.standard_normal((8, 256)) * 1e-9,  # scales below fp16's smallest subnormal
        rng.standard_normal((8, 256)) * 1e-14,  # around GROUP_MAX_EPS = 1e-15: the all-zero thresholds
        rng.standard_normal((8, 256)) * 1e-15,
        rng.standard_normal((8, 256)) * 1e-16,
    ]
    x = np.concatenate(parts).astype(np.float32)
    x[::5, ::7] = 0.0
    return x


def _mixed_magnitudes(name):
    # every 16-element sub-block at its own scale, from below GROUP_MAX_EPS up: tiny sub-blocks
    # next to normal ones take the "scale quantizes to 0, keep the search codes" paths
    rng = _rng(name)
    x = _normal(name, 32, 512, 1.0)
    exps = rng.integers(-17, 3, (32, 32)).astype(np.float64)
    return (x.reshape(32, 32, 16) * 10.0 ** exps[..., None]).astype(np.float32).reshape(32, 512)


def _ties(name):
    rng = _rng(name)
    ints = rng.integers(-8, 8, (16, 512)).astype(np.float32)  # integer-valued: exact ties everywhere
    halves = (rng.integers(-16, 16, (16, 512)) + 0.5).astype(np.float32)  # exact half-steps
    small = rng.integers(0, 4, (8, 512)).astype(np.float32)  # the Q2_K code range itself
    pm = np.where(rng.random((8, 512)) < 0.5, -1.0, 1.0).astype(np.float32)  # |max| ties, first one wins
    pm[:, ::3] *= 2.0
    return np.concatenate([ints, halves, small, pm])


def _negative_max(name):
    x = _normal(name, 32, 512, 0.02)
    blocks = x.reshape(-1, 256)
    blocks[:, 17] = -0.5  # the largest |x| is negative in every block
    blocks[::2, 200] = 0.5  # and ties with a later positive one in half of them
    blocks[1::4] = -np.abs(blocks[1::4])  # all-negative blocks
    blocks[3::4] = np.abs(blocks[3::4])  # all-positive blocks (the min is clamped to 0)
    return x


def _huge(name):
    rng = _rng(name)
    x = (rng.standard_normal((16, 512)) * 1e30).astype(np.float32)
    x[8:] *= np.float32(1e-60)  # 1e-30
    x[4, :256] = np.float32(3e38)
    x[5, 256:] = np.where(rng.random(256) < 0.5, -3e38, 3e38).astype(np.float32)
    return x


def _sparse(name):
    rng = _rng(name)
    x = _normal(name, 64, 1024, 0.02)
    x[rng.random(x.shape) < 0.95] = 0.0
    return x


def _bf16(name):
    x = _normal(name, 32, 2048, 0.02)
    u = x.view(np.uint32)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return u.view(np.float32)


def _fp16(name):
    return _normal(name, 32, 2048, 0.05).astype(np.float16).astype(np.float32)


def _heavy_tails(name):
    return (_rng(name).standard_t(3, (32, 1024)) * 0.02).astype(np.float32)


def _nonfinite(name):
    x = _normal(name, 12, 256, 1.0)
    x[0:3, 5] = np.inf
    x[3:6, 9] = -np.inf
    x[6:9, 100] = np.nan
    x[9:, :] = np.float32(np.finfo(np.float32).max)
    x[10, ::2] *= -1
    return x


def _nan_positions(name):
    # Q8_0's running max is maxss: a NaN restarts it, so where the NaN sits decides the scale
    x = _normal(name, 8, 256, 1.0)
    x[:, ::32] = 9.0  # the largest |x| of every 32-block comes first...
    x[0, 1::32] = np.nan  # ...then a NaN right after it
    x[1, 31::32] = np.nan  # NaN last: the scale itself is NaN
    x[2, 0::32] = np.nan
    x[3, 16::64] = np.nan
    x[4, :32] = np.nan
    x[5, 5::32] = np.inf
    x[6, 7::32] = -np.inf
    x[7, 9::32] = np.nan
    x[7, 10::32] = -np.inf
    return x


def _signed_zeros(name):
    # the legacy min/max keep the first of equal values: the sign of a zero min/max is stored
    x = np.zeros((6, 256), np.float32)
    x[0, ::2] = -0.0
    x[1, 0] = -0.0
    x[2, 31] = -0.0
    x[3, 32:64] = -0.0
    x[4, 64] = 1.0
    x[5, 70] = -1.0
    return x


def _roundf_ties(name):
    # max |x| = 127 makes Q8_0's scale 1, so x * (1/d) hits roundf's exact halves
    h = (np.arange(-64, 64, dtype=np.float32) + 0.5).reshape(4, 32)
    h[:, 7] = 127.0
    h[1] *= -1
    return np.tile(h, (1, 8))


DATASETS = {
    "normal-1": lambda n: _normal(n, 64, 2048, 1.0),
    "normal-0.02": lambda n: _normal(n, 64, 2048, 0.02),
    "rows-256": lambda n: _normal(n, 200, 256, 0.02),
    "rows-1536": lambda n: _normal(n, 23, 1536, 0.02),  # 6 super-blocks a row: not a power of 2
    "rows-512": lambda n: _normal(n, 97, 512, 0.5),
    "odd-block-count": lambda n: _normal(n, 7, 256, 0.02),  # partial SIMD groups
    "single-row": lambda n: _normal(n, 1, 768, 0.02),
    "zero-rows-and-blocks": _zero_rows_and_blocks,
    "constant": _constant,
    "outlier-per-block": _outliers,
    "denormals-and-fp16-subnormal-scales": _denormals,
    "mixed-sub-block-magnitudes": _mixed_magnitudes,
    "exact-ties": _ties,
    "negative-max": _negative_max,
    "huge-1e30": _huge,
    "sparse-95": _sparse,
    "bf16-rounded": _bf16,
    "fp16-rounded": _fp16,
    "student-t": _heavy_tails,
    "inf-nan-flt-max": _nonfinite,
    "nan-positions": _nan_positions,
    "signed-zeros": _signed_zeros,
    "roundf-ties": _roundf_ties,
    "rows-96": lambda n: _normal(n, 50, 96, 0.02),  # 32-element types only: not a multiple of 256
}


def _cases(types=ALL_TYPES):
    for name in DATASETS:
        for qtype in types:
            if name == "rows-96" and GGML_QUANT_SIZES[qtype][0] != 32:
                continue
            yield pytest.param(qtype, name, id=f"{qtype.name}-{name}")


@functools.lru_cache(maxsize=None)
def _data(name: str) -> np.ndarray:
    x = DATASETS[name](name)
    x.setflags(write=False)
    return x


@functools.lru_cache(maxsize=None)
def _reference(name: str, qtype: T) -> bytes:
    return bytes(ggml_engine.quantize_rows(_data(name), qtype, n_threads=1))


def _importance(name: str, n: int) -> np.ndarray:
    """Importance weights as llama-quantize passes them (sums / counts): skewed over five orders of
    magnitude, with zeros (columns no token reached) and exact ties."""
    rng = _rng(f"importance-{name}")
    qw = (rng.random(n) ** 4 * 1e3).astype(np.float32)
    qw[::11] = 0.0
    qw[5::13] = 1.0
    return qw


def _assert_same(got: memoryview, ref: bytes, qtype: T, what: str) -> None:
    got_b = bytes(got)
    if got_b == ref:
        return
    size = GGML_QUANT_SIZES[qtype][1]
    assert len(got_b) == len(ref), f"{what}: {len(got_b)} bytes, expected {len(ref)}"
    a = np.frombuffer(got_b, np.uint8).reshape(-1, size)
    b = np.frombuffer(ref, np.uint8).reshape(-1, size)
    bad = np.nonzero((a != b).any(axis=1))[0]
    first = bad[0]
    cols = np.nonzero(a[first] != b[first])[0]
    pytest.fail(f"{what}: {len(bad)} of {len(a)} blocks differ from libggml; first block {first}, "
                f"bytes {cols[:8].tolist()}: got {a[first, cols[:8]].tolist()}, expected {b[first, cols[:8]].tolist()}")


def test_extension_is_built():
    assert simd_engine.available(), "so8t_core.quantize.engines._kquants is missing: run `pip install -e .`"
    assert set(ALL_TYPES) == simd_engine.IMPLEMENTED
    assert set(K_TYPES) <= simd_engine.SUPPORTED <= simd_engine.IMPLEMENTED
    assert "generic" in simd_engine.ISAS and simd_engine.ISA == simd_engine.ISAS[0]


@pytest.mark.parametrize("qtype,name", list(_cases()))
def test_bytes_equal_libggml(qtype, name):
    x, ref = _data(name), _reference(name, qtype)
    for isa in simd_engine.ISAS:  # every kernel set this CPU runs: AVX-512, AVX2, the generic fallback
        _assert_same(simd_engine._quantize(x, qtype, n_threads=1, isa=isa), ref, qtype, f"{name}/{isa}")
    if qtype in simd_engine.SUPPORTED:
        _assert_same(simd_engine.quantize_rows(x, qtype, n_threads=1), ref, qtype, f"{name}/default")


@pytest.mark.parametrize("qtype,name", list(_cases(WEIGHTED_TYPES)))
def test_bytes_equal_libggml_with_importance_weights(qtype, name):
    x = _data(name)
    qw = _importance(name, x.shape[1])
    ref = bytes(ggml_engine.quantize_rows(x, qtype, imatrix=qw, n_threads=1))
    if name.startswith("normal"):
        assert ref != _reference(name, qtype)  # the weights change what is chosen
    for isa in simd_engine.ISAS:
        _assert_same(simd_engine._quantize(x, qtype, n_threads=1, isa=isa, imatrix=qw), ref, qtype, f"{name}/{isa}")
    _assert_same(simd_engine.quantize_rows(x, qtype, n_threads=3, imatrix=qw), ref, qtype, f"{name}/3 threads")


def _importance_edges(n: int) -> dict[str, np.ndarray]:
    """Importance weights at the edges of the weighted searches: none anywhere, none over whole
    sub-blocks and super-blocks, and so large that the weighted sums overflow."""
    rng = _rng(f"importance-edges-{n}")
    holes = (rng.random(n) * 10).astype(np.float32)
    holes[:16] = 0.0  # a 16-element sub-block (Q2_K, Q3_K, Q6_K)
    holes[32:64] = 0.0  # a 32-element one (IQ4, Q4_K, Q5_K)
    holes[256:512] = 0.0  # a whole super-block
    huge = (rng.random(n) * np.float32(1e30)).astype(np.float32)
    huge[::7] = np.float32(3e38)
    return {"zeros": np.zeros(n, np.float32), "holes": holes, "huge": huge,
            "one-column": np.where(np.arange(n) == 17, 1.0, 0.0).astype(np.float32)}


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", ["normal-1", "zero-rows-and-blocks", "huge-1e30", "mixed-sub-block-magnitudes"])
def test_bytes_equal_libggml_with_edge_importance_weights(qtype, name):
    x = _data(name)
    for what, qw in _importance_edges(x.shape[1]).items():
        ref = bytes(ggml_engine.quantize_rows(x, qtype, imatrix=qw, n_threads=1))
        for isa in simd_engine.ISAS:
            _assert_same(simd_engine._quantize(x, qtype, n_threads=1, isa=isa, imatrix=qw), ref, qtype,
                         f"{name}/{what}/{isa}")


def test_the_engines_dispatch_importance_weights_to_simd_only_where_it_has_them(monkeypatch):
    from so8t_core.quantize.engines import quantize

    x = _normal("dispatch", 64, 512, 0.02)
    qw = _importance("dispatch", 512)
    assert simd_engine.WEIGHTED == set(WEIGHTED_TYPES)
    expected = {qtype: bytes(ggml_engine.quantize_rows(x, qtype, imatrix=qw))
                for qtype in (*WEIGHTED_TYPES, UNWEIGHTED, T.IQ3_S)}
    for qtype, ref in expected.items():
        assert bytes(quantize(x, qtype, "simd", qw)) == ref
    with pytest.raises(ValueError, match="importance matrix is not supported"):
        simd_engine.quantize_rows(x, UNWEIGHTED, imatrix=qw)
    with pytest.raises(ValueError, match="expected"):
        simd_engine.quantize_rows(x, T.IQ4_XS, imatrix=qw[:256])

    def no_ggml(*args, **kwargs):
        raise AssertionError("went to ggml_engine")

    monkeypatch.setattr(ggml_engine, "quantize_rows", no_ggml)
    for qtype in WEIGHTED_TYPES:  # simd's own kernels, not libggml's
        assert bytes(quantize(x, qtype, "simd", qw)) == expected[qtype]
    with pytest.raises(AssertionError, match="went to ggml_engine"):
        quantize(x, UNWEIGHTED, "simd", qw)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_4096_rows(qtype):
    x = _normal(f"big-{qtype.name}", 4096, 256, 0.02)
    x[100] = 0.0
    x[200, 3] = 7.0
    ref = bytes(ggml_engine.quantize_rows(x, qtype, n_threads=2))
    _assert_same(simd_engine._quantize(x, qtype, isa=simd_engine.ISA), ref, qtype, "4096x256")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_threads_match_single_thread(qtype):
    x = _normal(f"threads-{qtype.name}", 301, 512, 0.02)
    one = bytes(simd_engine._quantize(x, qtype, n_threads=1, isa=simd_engine.ISA))
    for n in (2, 3, 8):
        assert bytes(simd_engine._quantize(x, qtype, n_threads=n, isa=simd_engine.ISA)) == one, f"{n} threads"


def test_contract():
    x = _normal("contract", 4, 512, 0.02)
    out = simd_engine.quantize_rows(x, T.Q4_K, n_threads=1)
    assert isinstance(out, memoryview) and out.nbytes == 4 * simd_engine.row_size(T.Q4_K, 512) == 4 * 288
    assert isinstance(out.obj, np.ndarray)  # the array's own buffer, not a copy
    # float64 and non-contiguous input are converted, like ggml_engine
    assert bytes(simd_engine.quantize_rows(x.astype(np.float64), T.Q4_K)) == bytes(out)
    wide = np.zeros((4, 1024), np.float32)
    wide[:, ::2] = x
    assert bytes(simd_engine.quantize_rows(wide[:, ::2], T.Q4_K)) == bytes(out)
    # a 1-D array is one row; leading dimensions are flattened
    assert bytes(simd_engine.quantize_rows(x[0], T.Q6_K)) == bytes(ggml_engine.quantize_rows(x[0], T.Q6_K))
    assert bytes(simd_engine.quantize_rows(x.reshape(2, 2, 512), T.Q3_K)) == \
        bytes(ggml_engine.quantize_rows(x, T.Q3_K, n_threads=1))
    assert simd_engine.quantize_rows(np.zeros((0, 256), np.float32), T.Q2_K).nbytes == 0


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_per_row", [255, 128, 1000, 31])
def test_bad_row_length(qtype, n_per_row):
    if GGML_QUANT_SIZES[qtype][0] == 32 and n_per_row % 32 == 0:
        n_per_row += 1
    with pytest.raises(ValueError, match="block size"):
        simd_engine._quantize(np.zeros((2, n_per_row), np.float32), qtype, isa=simd_engine.ISA)


def test_unsupported_type_and_isa():
    with pytest.raises(ValueError, match="not supported"):
        simd_engine.quantize_rows(np.zeros((1, 256), np.float32), T.IQ2_XXS)
    with pytest.raises(ValueError, match="kernel set"):
        simd_engine._quantize(np.zeros((1, 256), np.float32), T.Q4_K, isa="neon")


def test_fp16_conversions():
    """d/dmin are rounded to fp16 from float32 with round-to-nearest-even, as ggml does in software."""
    from so8t_core.quantize.engines import _kquants

    rng = np.random.default_rng(16)
    bits = np.concatenate([
        rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32),  # anything
        np.arange(0x32000000, 0x38C00000, 997, dtype=np.uint32),  # fp16 subnormals and the normal edge
        np.arange(0x477FE000, 0x47800100, dtype=np.uint32),  # around 65504 / overflow to inf
    ])
    ties = np.arange(0, 2048, dtype=np.uint32) << 12 | 0x1000  # exact halfway mantissas
    bits = np.concatenate([bits, 0x38000000 + ties, 0x3F000000 + ties, 0x33000000 + ties])
    bits = np.concatenate([bits, bits | 0x80000000])
    x = bits.view(np.float32)
    got = np.empty(x.size, np.uint16)
    _kquants.f32_to_f16(x, got)
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    np.testing.assert_array_equal(got[nan], np.where(np.signbit(x[nan]), 0xFE00, 0x7E00))  # ggml's NaN

    halves = np.arange(2**16, dtype=np.uint16)
    back = np.empty(halves.size, np.float32)
    _kquants.f16_to_f32(halves, back)
    ref = halves.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref) | np.isinf(ref)
    np.testing.assert_array_equal(back.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    assert np.isnan(back[~finite]).all()


@pytest.mark.parametrize("qtype", ALL_TYPES + [T.BF16, T.F16], ids=lambda t: t.name)
def test_ggml_dequantize_rows_equals_gguf_py(qtype):
    """Dequantization (for the error statistics) through libggml's to_float: gguf-py's values exactly."""
    from gguf import quants

    x = _outliers(f"deq-{qtype.name}")
    raw = ggml_engine.quantize_rows(x, qtype)
    ours = ggml_engine.dequantize_rows(raw, qtype, x.shape[1], n_threads=2)
    theirs = quants.dequantize(np.frombuffer(raw, np.uint8).reshape(x.shape[0], -1), qtype).astype(np.float32)
    assert ours.shape == x.shape
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="whole"):
        ggml_engine.dequantize_rows(bytes(raw)[:-1], qtype, x.shape[1])
