"""Rotation math against dense references: parameterizations, gate, both folds, health checks."""

import numpy as np
import pytest
import torch

from so8t_core.errors import RotationError
from so8t_core.source.rotation import (
    apply_gate,
    bake_error,
    block_diagonal,
    check_gate_shape,
    checked_rotation,
    fold_into_linear,
    rotation_blocks,
    rotation_health,
)

RNG = np.random.default_rng(7)


def dense_expm(a: np.ndarray) -> np.ndarray:
    """Matrix exponential by its power series, in float64 (independent of torch.matrix_exp)."""
    out, term = np.eye(a.shape[0]), np.eye(a.shape[0])
    for k in range(1, 60):
        term = term @ a / k
        out = out + term
    return out


@pytest.mark.parametrize("parameterization", ["cayley", "expm"])
def test_rotation_blocks_match_dense_definitions(parameterization):
    theta = 0.3 * RNG.standard_normal((5, 8, 8))
    r = rotation_blocks(theta, parameterization)
    for n in range(5):
        a = theta[n] - theta[n].T
        if parameterization == "cayley":
            expect = np.linalg.inv(np.eye(8) - a / 2) @ (np.eye(8) + a / 2)
        else:
            expect = dense_expm(a)
        np.testing.assert_allclose(r[n], expect, atol=1e-12)
    h = rotation_health(r)
    assert h.ok and h.max_orthogonality_error < 1e-13
    assert abs(h.min_det - 1) < 1e-12 and abs(h.max_det - 1) < 1e-12


def test_cayley_and_expm_agree_to_second_order_for_small_theta():
    theta = 1e-3 * RNG.standard_normal((3, 8, 8))
    diff = np.abs(rotation_blocks(theta, "cayley") - rotation_blocks(theta, "expm")).max()
    assert diff < 1e-7  # both are I + A + O(|A|^2)/...; they differ at third order


def test_gate_is_row_vector_right_multiply_on_contiguous_blocks():
    theta = RNG.standard_normal((4, 8, 8))
    r = rotation_blocks(theta, "cayley")
    x = RNG.standard_normal((3, 7, 32))
    np.testing.assert_allclose(apply_gate(x, r), x @ block_diagonal(r), atol=1e-12)
    # block n only mixes channels 8n..8n+7
    e = np.zeros(32)
    e[9] = 1.0
    y = apply_gate(e, r)
    assert np.all(y[:8] == 0) and np.all(y[16:] == 0)
    np.testing.assert_allclose(y[8:16], r[1][1])


@pytest.mark.parametrize("position", ["pre_o_proj", "post_o_proj"])
@pytest.mark.parametrize("parameterization", ["cayley", "expm"])
def test_fold_reproduces_gated_linear_exactly(position, parameterization):
    out_f, in_f = 24, 32
    width = in_f if position == "pre_o_proj" else out_f
    r = rotation_blocks(0.5 * RNG.standard_normal((width // 8, 8, 8)), parameterization)
    w = RNG.standard_normal((out_f, in_f))
    b = RNG.standard_normal(out_f)
    x = RNG.standard_normal((16, in_f))
    w2, b2 = fold_into_linear(w, b, r, position)
    dense = block_diagonal(r)
    if position == "pre_o_proj":
        gated = (x @ dense) @ w.T + b
        np.testing.assert_allclose(w2, w @ dense.T, atol=1e-12)  # W' = W·Rᵀ
    else:
        gated = (x @ w.T + b) @ dense
        np.testing.assert_allclose(w2, dense.T @ w, atol=1e-12)  # W' = Rᵀ·W
        np.testing.assert_allclose(b2, b @ dense, atol=1e-12)  # b' = b·R
    np.testing.assert_allclose(x @ w2.T + b2, gated, atol=1e-11)


def test_transposed_fold_of_the_original_project_is_detected():
    """The SO8T repo folded W·R instead of W·Rᵀ; the bake error must expose that."""
    r = rotation_blocks(0.3 * RNG.standard_normal((4, 8, 8)), "cayley")
    w = RNG.standard_normal((32, 32))
    good, _ = fold_into_linear(w, None, r, "pre_o_proj")
    wrong = w @ block_diagonal(r)
    assert bake_error(w, None, r, "pre_o_proj", good.astype(np.float32), None) < 1e-6
    assert bake_error(w, None, r, "pre_o_proj", wrong, None) > 0.05


def test_fold_matches_torch_module_with_hook():
    """The same gate as a torch forward hook on nn.Linear (how the reference runs it)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=True).double()
    r = rotation_blocks(0.4 * RNG.standard_normal((2, 8, 8)), "expm")
    rt = torch.from_numpy(r)
    lin.register_forward_hook(lambda m, a, out: torch.einsum("bni,nio->bno", out.view(-1, 2, 8), rt).reshape(out.shape))
    x = torch.randn(5, 32, dtype=torch.float64)
    gated = lin(x).detach().numpy()
    w2, b2 = fold_into_linear(lin.weight.detach().numpy(), lin.bias.detach().numpy(), r, "post_o_proj")
    np.testing.assert_allclose(x.numpy() @ w2.T + b2, gated, atol=1e-12)


def test_health_rejects_non_rotations():
    assert not rotation_health(np.full((1, 8, 8), np.nan)).finite
    reflection = np.eye(8)[None].copy()
    reflection[0, 0, 0] = -1
    h = rotation_health(reflection)
    assert h.max_orthogonality_error == 0 and h.min_det == pytest.approx(-1) and not h.ok
    assert not rotation_health(1.01 * np.eye(8)[None]).ok


def test_checked_rotation_refuses_bad_theta():
    with pytest.raises(RotationError, match="NaN/Inf"):
        checked_rotation(np.full((1, 8, 8), np.nan), "cayley", "ckpt", "theta")
    # Finite but huge θ: matrix_exp's scaling and squaring no longer yields an orthogonal R.
    with pytest.raises(RotationError, match="does not give a rotation"):
        checked_rotation((1e12 * RNG.standard_normal((2, 8, 8))).astype(np.float32), "expm", "ckpt", "theta")
    with pytest.raises(RotationError, match=r"expected \[4, 8, 8\]"):
        check_gate_shape((3, 8, 8), 32, "ckpt", "theta")
    with pytest.raises(RotationError):
        check_gate_shape((4, 8, 4), 32, "ckpt", "theta")
