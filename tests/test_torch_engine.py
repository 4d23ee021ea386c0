"""The torch engine writes exactly ggml's bytes (ggml_quantize_chunk, no imatrix) for every type it supports."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import np_roundf

from so8t_core.quantize.engines import ggml as ggml_engine
from so8t_core.quantize.engines import torch as torch_engine

K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS = 96


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Many small kernels: one thread is as fast here and does not stall when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, size)


def _normal(rng, rows, n, scale):
    return (rng.standard_normal((rows, n)) * scale).astype(np.float32)


def make_case(name: str, rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Adversarial inputs: each stresses a branch, a tie or a rounding mode of the reference quantizers."""
    rng = np.random.default_rng(zlib.crc32(f"{name}|{n}|{seed}".encode()))
    base = _normal(rng, rows, n, 0.02)
    if name == "normal":
        return _normal(rng, rows, n, 1.0)
    if name == "normal_0.02":
        return base
    if name == "zeros":
        # all-zero rows, -0.0 rows, and zero 16/32/256-element blocks inside random rows
        x = base.copy()
        x[0::5] = 0.0
        x[1::5] = -0.0
        for size in (16, 32, 256):
            if n >= size:
                b = _blocks(x, size)
                mask = rng.random(b.shape[:2]) < 0.3
                b[mask] = 0.0
                mask = rng.random(b.shape[:2]) < 0.1
                b[mask] = -0.0
        return x
    if name == "constant":
        # constant rows (positive, negative, zero) and constant 16/32-element blocks
        vals = rng.choice(np.array([0.5, -0.5, 1.0, -3.0, 0.02, -1e-3, 7.0, 0.0], np.float32), size=rows)
        x = np.repeat(vals[:, None], n, axis=1).astype(np.float32)
        y = base.copy()
        for size in (16, 32):
            b = _blocks(y, size)
            mask = rng.random(b.shape[:2]) < 0.3
            b[mask] = rng.choice(np.array([0.25, -0.75, 0.02], np.float32), size=(int(mask.sum()), 1))
        return np.concatenate([x[: rows // 2], y[rows // 2:]])
    if name == "outlier":
        # one huge outlier (±1e4) per 32-element block among 1e-3 values
        x = (rng.standard_normal((rows, n)) * 1e-3).astype(np.float32)
        b = _blocks(x, 32)
        pos = rng.integers(0, 32, size=b.shape[:2])
        sign = rng.choice(np.array([-1.0, 1.0], np.float32), size=b.shape[:2])
        np.put_along_axis(b, pos[..., None], (sign * 1e4)[..., None], axis=2)
        return x
    if name == "denormal":
        # float32 subnormals (~1e-40, down to the smallest), mixed with tiny normals
        x = (rng.standard_normal((rows, n)) * 1e-40).astype(np.float32)
        x[::4] = (rng.integers(-8, 9, size=(len(x[::4]), n)) * np.float32(1.4e-45)).astype(np.float32)
        x[1::4] *= np.float32(1e5)  # ~1e-35: normal values that give subnormal scales
        b = _blocks(x, 32)
        b[2::4, ::3] = (rng.standard_normal(b[2::4, ::3].shape) * 1e-38).astype(np.float32)
        return x
    if name == "fp16_subnormal":
        # scales d ~ 1e-6..1e-8 are fp16 subnormals (or underflow to 0 in fp16)
        s = rng.choice(np.array([1e-4, 1e-5, 1e-6, 1e-7], np.float32), size=(rows, 1))
        return (rng.standard_normal((rows, n)) * s).astype(np.float32)
    if name == "integers":
        # exact ties: small integers, many repeated |max| values of both signs
        x = rng.integers(-8, 9, size=(rows, n)).astype(np.float32)
        x[::3] = rng.integers(0, 4, size=(len(x[::3]), n))
        x[1::3] = rng.integers(-31, 32, size=(len(x[1::3]), n))
        return x
    if name == "half_steps":
        # values at exact (k + 1/2)·2^-e: every product with a power-of-two scale lands on a .5 tie
        k = rng.integers(-16, 16, size=(rows, n)).astype(np.float32)
        e = rng.integers(0, 8, size=(rows, 1)).astype(np.float32)
        x = ((k + np.float32(0.5)) * np.exp2(-e)).astype(np.float32)
        x[::2] = ((k[::2] * np.float32(0.5))).astype(np.float32)
        return x
    if name == "negative_max":
        # mixed signs whose largest |x| is negative; and ±max ties where the first one must win
        x = base.copy()
        b = _blocks(x, 16)
        am = np.abs(b).max(axis=2)
        pos = rng.integers(0, 16, size=b.shape[:2])
        np.put_along_axis(b, pos[..., None], (-1.5 * am)[..., None], axis=2)
        t = b[::3]
        np.put_along_axis(t, ((pos[::3] + 5) % 16)[..., None], (1.5 * am[::3])[..., None], axis=2)
        b[::3] = t
        return x
    if name == "huge":
        # finite but huge: squares overflow to inf inside the searches
        x = _normal(rng, rows, n, 1e30)
        x[::3] = _normal(rng, len(x[::3]), n, 1e19)  # x² ≈ 1e38: right at the float32 limit
        x[1::3] = _normal(rng, len(x[1::3]), n, 3e37)
        return x
    if name == "sparse":
        x = _normal(rng, rows, n, 1.0)
        x[rng.random(x.shape) < 0.95] = 0.0
        return x
    if name == "bf16_rounded":
        return torch.from_numpy(_normal(rng, rows, n, 0.05)).to(torch.bfloat16).to(torch.float32).numpy()
    if name == "fp16_rounded":
        return _normal(rng, rows, n, 0.05).astype(np.float16).astype(np.float32)
    if name == "positive":
        return np.abs(_normal(rng, rows, n, 0.02)) + np.float32(0.01)
    raise KeyError(name)


CASES = ("normal", "normal_0.02", "zeros", "constant", "outlier", "denormal", "fp16_subnormal", "integers",
         "half_steps", "negative_max", "huge", "sparse", "bf16_rounded", "fp16_rounded", "positive")


def assert_same(x: np.ndarray, qtype: T, device: str, **kwargs) -> None:
    ours = torch_engine.quantize_rows(x, qtype, device=device, **kwargs)
    theirs = bytes(ggml_engine.quantize_rows(x, qtype, n_threads=1))
    assert isinstance(ours, bytes)
    assert len(ours) == len(theirs)
    if ours != theirs:
        size = GGML_QUANT_SIZES[qtype][1]
        a = np.frombuffer(ours, np.uint8).reshape(-1, size)
        b = np.frombuffer(theirs, np.uint8).reshape(-1, size)
        bad = np.nonzero((a != b).any(axis=1))[0]
        per_row = x.shape[1] // GGML_QUANT_SIZES[qtype][0]
        i = bad[0]
        raise AssertionError(f"{qtype.name}: {len(bad)}/{len(a)} blocks differ; first block {i} "
                             f"(row {i // per_row}), bytes {np.nonzero(a[i] != b[i])[0].tolist()[:12]}")


def _lengths(qtype: T) -> tuple[int, ...]:
    return (256, 512) if qtype in K_TYPES else (32, 64, 256, 512)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", torch_engine.SUPPORTED, ids=lambda t: t.name)
def test_matches_ggml(qtype, case, device):
    for n in _lengths(qtype):
        assert_same(make_case(case, ROWS, n), qtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_matches_ggml_4096_rows(qtype, device):
    rng = np.random.default_rng(4096)
    x = (rng.standard_normal((4096, 256)) * 0.02).astype(np.float32)
    x[17] = 0.0
    x[99, 5] = 3.0  # an outlier row
    assert_same(x, qtype, device)


@pytest.mark.parametrize("qtype", [t for t in torch_engine.SUPPORTED if GGML_QUANT_SIZES[t][0] > 1],
                         ids=lambda t: t.name)
def test_row_length_not_multiple_of_block_raises(qtype):
    block = GGML_QUANT_SIZES[qtype][0]
    with pytest.raises(ValueError):
        torch_engine.quantize_rows(np.zeros((4, block + block // 2), np.float32), qtype, device="cpu")


def test_unsupported_type_raises():
    with pytest.raises(ValueError):
        torch_engine.quantize_rows(np.zeros((1, 256), np.float32), T.IQ4_XS, device="cpu")


@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q3_K, T.Q4_0), ids=lambda t: t.name)
def test_deterministic(qtype):
    x = make_case("normal_0.02", 64, 512, seed=3)
    first = torch_engine.quantize_rows(x, qtype, device="cpu")
    assert all(torch_engine.quantize_rows(x, qtype, device="cpu") == first for _ in range(2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q6_K, T.Q8_0, T.F16), ids=lambda t: t.name)
def test_chunked_equals_unchunked(qtype, device):
    x = make_case("normal", 48, 1024, seed=5)
    whole = torch_engine.quantize_rows(x, qtype, device=device, chunk_elements=x.size)
    # chunks that split rows in the middle and leave a ragged last chunk
    assert torch_engine.quantize_rows(x, qtype, device=device, chunk_elements=3 * 256 + 17) == whole
    assert torch_engine.quantize_rows(x, qtype, device=device, chunk_elements=1) == whole
    assert whole == bytes(ggml_engine.quantize_rows(x, qtype, n_threads=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", (T.Q6_K, T.Q8_0), ids=lambda t: t.name)
def test_default_chunking_of_a_large_tensor(qtype, device):
    rows = torch_engine.CPU_CHUNK_ELEMENTS // 1024 + 77  # more than one default chunk, ragged tail
    x = make_case("normal_0.02", rows, 1024, seed=11)
    ours = torch_engine.quantize_rows(x, qtype, device=device)
    assert ours == torch_engine.quantize_rows(x, qtype, device=device, chunk_elements=x.size)
    assert ours == bytes(ggml_engine.quantize_rows(x, qtype, n_threads=1))


@pytest.mark.parametrize("device", DEVICES)
def test_primitives(device):
    """The C scalar semantics the quantizers rest on, checked directly (they differ between CPU and CUDA torch)."""
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 4194303.0, -4194304.0, 3.0e6 + 0.5, 1e-40, -0.0,
                  np.inf, -np.inf, np.nan, 7.4999995, 1e10, -3e9, 2147483520.0, -2147483648.0], np.float32)
    t = torch.from_numpy(v).to(device)
    # nearest_int: round half to even within ±2^22; the bit trick beyond it; NaN → 0 (the x86 default NaN)
    bits = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
    bits[np.isnan(v)] = 0
    assert torch_engine._nearest_int(t).cpu().numpy().tolist() == bits.tolist()
    # roundf: half away from zero (gguf-py's np_roundf is the independent reference)
    finite = np.isfinite(v)
    np.testing.assert_array_equal(torch_engine._roundf(t).cpu().numpy()[finite], np_roundf(v[finite]))
    np.testing.assert_array_equal(torch_engine._roundf(t).cpu().numpy()[~finite], v[~finite])
    # cvttss2si: truncation; NaN, ±inf and anything outside int32 → INT_MIN
    ok = finite & (v >= -2.0**31) & (v < 2.0**31)
    cvt = np.where(ok, np.trunc(np.where(ok, v, 0)).astype(np.int64), -2**31)
    assert torch_engine._cvtt_i32(t).cpu().numpy().tolist() == cvt.tolist()
    # true division even by a constant (torch may turn t / scalar into t * (1/scalar))
    a = torch.from_numpy(np.arange(1, 4097, dtype=np.float32) * np.float32(0.37)).to(device)
    assert np.array_equal(torch_engine._div(a, 127.0).cpu().numpy(), a.cpu().numpy() / np.float32(127.0))
    assert np.array_equal(torch_engine._div(1.0, a).cpu().numpy(), np.float32(1.0) / a.cpu().numpy())
    assert np.array_equal(torch_engine._sqrt(a).cpu().numpy(), np.sqrt(a.cpu().numpy()))


def test_accepts_torch_tensors_and_other_dtypes():
    x = make_case("normal", 8, 256, seed=7)
    ref = torch_engine.quantize_rows(x, T.Q5_K, device="cpu")
    assert torch_engine.quantize_rows(torch.from_numpy(x), T.Q5_K, device="cpu") == ref
    h = x.astype(np.float16)
    assert (torch_engine.quantize_rows(h, T.Q4_K, device="cpu")
            == bytes(ggml_engine.quantize_rows(h.astype(np.float32), T.Q4_K, n_threads=1)))
    assert torch_engine.quantize_rows(np.zeros((0, 256), np.float32), T.Q4_K, device="cpu") == b""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_special_values(qtype, device):
    """inf, NaN (ggml writes a quiet NaN with the sign), fp16 overflow/subnormals, bf16 rounding ties."""
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65520.0, -1e9, 6e-8, -3e-8, 1e-45, -0.0,
                         1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.4e38, -1.17549e-38, 2.0**-24, 0.0, 1.0], np.float32)
    x = np.concatenate([specials, make_case("normal", 1, 46).ravel()]).reshape(2, 32)
    bits = x.view(np.uint32)
    bits[1, 0] = 0x7FC12345  # a NaN with a payload
    bits[1, 1] = 0xFF800001  # a signalling NaN
    assert_same(x, qtype, device)
