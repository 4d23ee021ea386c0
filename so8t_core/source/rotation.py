"""SO(8) rotation gates: θ → R, health checks, and the exact folds into a linear layer.

Conventions (docs/so8t-format.md): θ has shape [D/8, 8, 8]; ``A = θ − θᵀ`` (skew);
``R_n = (I − A/2)⁻¹ (I + A/2)`` (cayley) or ``expm(A)``; an activation row vector x is
split into contiguous 8-channel blocks and ``y_n = x_n · R_n``. All math here runs in
float64; weights are rounded to float32 once, at the end.

Folds, for a PyTorch linear ``y = x Wᵀ + b`` with W of shape [out, in]:
  gate on the input  (y = Lin(x·R)):  W' = W·Rᵀ            (b unchanged)
  gate on the output (y = Lin(x)·R):  W' = Rᵀ·W,  b' = b·R
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from so8t_core.constants import ROTATION_BLOCK, ROTATION_PARAMETERIZATIONS, ROTATION_POSITIONS
from so8t_core.errors import RotationError

# R is accepted as a rotation when ‖RᵀR − I‖_max and |det R − 1| stay below this. A θ gives
# an R that is orthogonal to float64 precision; a stored R has only its storage precision
# (bf16 rounding alone costs ~4e-3), so it gets a looser bound. The folds are exact for
# any R (they never use R⁻¹), so the bound is a sanity check that R is a rotation at all.
ORTHOGONALITY_TOLERANCE = 1e-6
STORED_ROTATION_TOLERANCE = 1e-2


def skew(theta: np.ndarray) -> np.ndarray:
    return theta - np.swapaxes(theta, -1, -2)


def rotation_blocks(theta: np.ndarray, parameterization: str) -> np.ndarray:
    """θ [n, 8, 8] → R [n, 8, 8] in float64."""
    if parameterization not in ROTATION_PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    a = skew(np.asarray(theta, dtype=np.float64))
    eye = np.broadcast_to(np.eye(ROTATION_BLOCK), a.shape)
    with np.errstate(all="ignore"):  # non-finite results are reported by rotation_health
        if parameterization == "cayley":
            try:
                return np.linalg.solve(eye - a / 2, eye + a / 2)
            except np.linalg.LinAlgError:
                return np.full(a.shape, np.nan)
        import torch  # matrix_exp: scaling and squaring with Padé, in float64

        return torch.linalg.matrix_exp(torch.from_numpy(np.ascontiguousarray(a))).numpy()


@dataclass(frozen=True)
class RotationHealth:
    n_blocks: int
    finite: bool
    max_orthogonality_error: float  # max over blocks of max|RᵀR − I|
    min_det: float
    max_det: float

    tolerance: float = ORTHOGONALITY_TOLERANCE

    @property
    def ok(self) -> bool:
        return (self.finite and self.max_orthogonality_error < self.tolerance
                and abs(self.min_det - 1) < self.tolerance and abs(self.max_det - 1) < self.tolerance)

    def as_dict(self) -> dict:
        return {"n_blocks": self.n_blocks, "finite": self.finite,
                "max_orthogonality_error": self.max_orthogonality_error,
                "min_det": self.min_det, "max_det": self.max_det, "ok": self.ok}


def rotation_health(r: np.ndarray, tolerance: float = ORTHOGONALITY_TOLERANCE) -> RotationHealth:
    finite = bool(np.isfinite(r).all())
    if not finite:
        return RotationHealth(r.shape[0], False, float("inf"), float("nan"), float("nan"), tolerance)
    gram = np.swapaxes(r, -1, -2) @ r
    err = float(np.abs(gram - np.eye(ROTATION_BLOCK)).max()) if r.size else 0.0
    det = np.linalg.det(r) if r.size else np.ones(1)
    return RotationHealth(r.shape[0], True, err, float(det.min()), float(det.max()), tolerance)


def check_gate_shape(theta_shape: tuple[int, ...], width: int, where: str, name: str) -> None:
    expect = (width // ROTATION_BLOCK, ROTATION_BLOCK, ROTATION_BLOCK)
    if width % ROTATION_BLOCK or tuple(theta_shape) != expect:
        raise RotationError(where, f"{name} has shape {list(theta_shape)}, expected {list(expect)} "
                                   f"for a rotated width of {width}",
                            "a gate must be [D/8, 8, 8], D the width it rotates (o_proj's input before "
                            "o_proj, its output after)")


def gate_rotation(tensor: np.ndarray, parameterization: str) -> tuple[np.ndarray, RotationHealth]:
    """A gate tensor → (R in float64, its health). ``"matrix"`` means the tensor already is R."""
    if parameterization == "matrix":
        r = np.asarray(tensor, dtype=np.float64)
        return r, rotation_health(r, STORED_ROTATION_TOLERANCE)
    r = rotation_blocks(tensor, parameterization)
    return r, rotation_health(r)


def checked_rotation(tensor: np.ndarray, parameterization: str, where: str, name: str) -> np.ndarray:
    """θ (or a stored R) → R, refusing anything that is not finite and a proper rotation."""
    if not np.isfinite(tensor).all():
        raise RotationError(where, f"{name} has NaN/Inf values",
                            "the gate diverged in training; use another checkpoint")
    r, health = gate_rotation(tensor, parameterization)
    if not health.ok:
        raise RotationError(where, f"{name} does not give a rotation ({parameterization}: "
                                   f"max |RᵀR−I| = {health.max_orthogonality_error:.3g}, "
                                   f"det in [{health.min_det:.6g}, {health.max_det:.6g}])",
                            "a stored R must be orthogonal with det +1; a θ this large is numerically "
                            "degenerate; check the checkpoint")
    return r


def apply_gate(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """y = x·R on contiguous 8-channel blocks of the last axis (the forward convention)."""
    n = r.shape[0]
    xb = x.reshape(*x.shape[:-1], n, ROTATION_BLOCK)
    return np.einsum("...ni,nio->...no", xb, r).reshape(x.shape)


def block_diagonal(r: np.ndarray) -> np.ndarray:
    """The dense D×D matrix blockdiag(R_0, …, R_{n−1}) (for tests and small checks)."""
    n = r.shape[0]
    out = np.zeros((n * ROTATION_BLOCK, n * ROTATION_BLOCK), dtype=r.dtype)
    for i in range(n):
        s = slice(i * ROTATION_BLOCK, (i + 1) * ROTATION_BLOCK)
        out[s, s] = r[i]
    return out


def fold_into_linear(weight: np.ndarray, bias: np.ndarray | None, r: np.ndarray, position: str
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold the gate into o_proj exactly, in float64; returns float64 (W', b')."""
    if position not in ROTATION_POSITIONS:
        raise ValueError(f"unknown position {position!r}")
    w = np.asarray(weight, dtype=np.float64)
    n = r.shape[0]
    if position == "pre_o_proj":  # W' = W·Rᵀ: per block of input columns, W[:, blk] @ R_nᵀ
        wb = w.reshape(w.shape[0], n, ROTATION_BLOCK)
        w2 = np.einsum("oni,nji->onj", wb, r).reshape(w.shape)
        return w2, None if bias is None else np.asarray(bias, dtype=np.float64)
    # post_o_proj: W' = Rᵀ·W per block of output rows; b' = b·R
    wb = w.reshape(n, ROTATION_BLOCK, w.shape[1])
    w2 = np.einsum("nij,nic->njc", r, wb).reshape(w.shape)
    b2 = None if bias is None else apply_gate(np.asarray(bias, dtype=np.float64), r)
    return w2, b2


def bake_error(weight: np.ndarray, bias: np.ndarray | None, r: np.ndarray, position: str,
               baked_weight: np.ndarray, baked_bias: np.ndarray | None, n_probe: int = 16, seed: int = 0) -> float:
    """Max |gated − baked| o_proj output on fixed random inputs, relative to the output scale.

    The gated module runs in float64 with the source weights; the baked one in
    float64 with the float32 weights that are actually stored, so the number covers
    the fold and the storage rounding together.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_probe, weight.shape[1]))
    w = np.asarray(weight, dtype=np.float64)
    b = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    if position == "pre_o_proj":
        gated = apply_gate(x, r) @ w.T + b
    else:
        gated = apply_gate(x @ w.T + b, r)
    bb = 0.0 if baked_bias is None else np.asarray(baked_bias, dtype=np.float64)
    baked = x @ np.asarray(baked_weight, dtype=np.float64).T + bb
    scale = max(float(np.abs(gated).max()), 1e-30)
    return float(np.abs(gated - baked).max() / scale)
