"""The linear algebra of knowledge editing at one layer seen as a key–value memory: ROME's rank-one edit and
MEMIT's batched least squares.

A layer's weight W [d_v, d_k] maps a key k [d_k] (the activation the layer reads) to a value W k [d_v] (what it
writes). In a GPT-2 block the key is the input of the MLP's output projection ``mlp.c_proj`` at a token, and
the value that projection's output. Keys are stored one per row: K [N, d_k], so the key covariance is
C = Kᵀ K / N, the transpose of the papers' K Kᵀ (their keys are columns).

| function          | what it solves                                                                          |
|-------------------|-----------------------------------------------------------------------------------------|
| ``key_covariance``| C = Kᵀ K / N + ridge · (tr C / d_k) · I                                                 |
| ``rome_update``   | min tr(Δ C Δᵀ) s.t. (W + Δ) k* = v*  →  Δ = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)         |
| ``memit_update``  | min ‖Δ‖²_C·λ + Σᵢ ‖Δ kᵢ − rᵢ‖²  →  Δ = Rᵀ K (λ C + Kᵀ K)⁻¹                              |

Everything is solved in float64 and returned in the dtype and device of the first tensor argument.
"""

from __future__ import annotations

import torch

from cl_lab import _validate

SINGULAR_TOL = 1e-10  # smallest Cholesky pivot of C, relative to its largest diagonal entry: below it, singular


def _tensor(name: str, value, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} must be finite, got NaN or inf entries")
    return value


def key_covariance(keys: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The uncentred second moment of the keys, C = Kᵀ K / N [d_k, d_k] from keys [N, d_k], plus ``ridge``
    times its mean eigenvalue on the diagonal (so ``ridge`` is scale-free), in float64. ROME estimates the same
    matrix, E[k kᵀ], from 100,000 Wikipedia tokens (Meng et al. 2022, arXiv 2202.05262, sec. 3.1)."""
    keys = _tensor("keys", keys, 2)
    ridge = _validate.non_negative("ridge", ridge)
    if len(keys) == 0:
        raise ValueError("keys must hold at least one key, got 0 rows")
    k64 = keys.double()
    cov = k64.T @ k64 / len(keys)  # [d_k, d_k]
    if ridge > 0:
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return cov


def _check_covariance(C: torch.Tensor, d_k: int) -> torch.Tensor:
    C = _tensor("C", C, 2)
    if C.shape != (d_k, d_k):
        raise ValueError(f"C must be [d_k, d_k] = [{d_k}, {d_k}] to match the keys, got shape {tuple(C.shape)}")
    c64 = C.double()
    if not torch.allclose(c64, c64.T, rtol=1e-6, atol=1e-9 * c64.abs().max().item()):
        raise ValueError("C must be symmetric (a key covariance), got an asymmetric matrix")
    factor, info = torch.linalg.cholesky_ex(c64)  # C = L Lᵀ; fails or has a tiny pivot when C is singular
    pivots = factor.diagonal().pow(2)
    if info.item() != 0 or not pivots.min() > SINGULAR_TOL * c64.diagonal().max():
        raise ValueError(f"C is singular or not positive definite (a key direction with no variance among "
                         f"d_k = {d_k}): add a ridge regulariser, e.g. key_covariance(keys, ridge=1e-3)")
    return c64


def rome_update(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """ROME's rank-one change Δ [d_v, d_k] (Meng et al. 2022, arXiv 2202.05262, eq. 2):

        minimise ‖(W + Δ) K − V‖²  subject to  (W + Δ) k* = v*,   with V = W K (the layer stores K → V now)
        Δ = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*),   C = K Kᵀ.

    W [d_v, d_k], C [d_k, d_k] symmetric positive definite, k_star [d_k], v_star [d_v] (without the layer's
    bias: only v* − W k* enters).
    """
    W = _tensor("W", W, 2)
    d_v, d_k = W.shape
    c64 = _check_covariance(C, d_k)
    k_star, v_star = _tensor("k_star", k_star, 1), _tensor("v_star", v_star, 1)
    if len(k_star) != d_k:
        raise ValueError(f"k_star must have d_k = {d_k} entries to match W [d_v, d_k], got {len(k_star)}")
    if len(v_star) != d_v:
        raise ValueError(f"v_star must have d_v = {d_v} entries to match W [d_v, d_k], got {len(v_star)}")
    k64 = k_star.double().to(c64.device)
    if not k64.abs().max() > 0:
        raise ValueError("k_star must be a non-zero key, got all zeros")
    u = torch.linalg.solve(c64, k64)  # C⁻¹k* [d_k]
    residual = v_star.double().to(c64.device) - W.double().to(c64.device) @ k64  # v* − W k* [d_v]
    delta = torch.outer(residual, u) / (u @ k64)  # [d_v, d_k]
    return delta.to(dtype=W.dtype, device=W.device)


def memit_update(C: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """MEMIT's batched update at one layer (Meng et al. 2023, arXiv 2210.07229, eq. 14): the Δ [d_v, d_k] that
    minimises tr(Δ C Δᵀ) + Σᵢ ‖Δ kᵢ − rᵢ‖², i.e. Δ = Rᵀ K (C + Kᵀ K)⁻¹ (their R K₁ᵀ (C₀ + K₁K₁ᵀ)⁻¹).

    C [d_k, d_k] carries MEMIT's weight on the preserved keys (λ · E[k kᵀ], λ = 15,000–20,000 in the paper);
    keys K [N, d_k] are the edits' keys, residuals R [N, d_v] what each edit must add to the layer's output.
    The constraints hold only approximately (soft), so any N ≥ 1 is allowed. For N = 1 it is ROME's update
    scaled by s / (1 + s), s = k*ᵀ C⁻¹ k* (Sherman–Morrison).
    """
    keys, residuals = _tensor("keys", keys, 2), _tensor("residuals", residuals, 2)
    if len(keys) == 0 or len(keys) != len(residuals):
        raise ValueError(f"keys [N, d_k] and residuals [N, d_v] must have the same N ≥ 1, got keys "
                         f"{tuple(keys.shape)} and residuals {tuple(residuals.shape)}")
    c64 = _check_covariance(C, keys.shape[1])
    k64 = keys.double().to(c64.device)  # [N, d_k]
    r64 = residuals.double().to(c64.device)  # [N, d_v]
    delta = torch.linalg.solve(c64 + k64.T @ k64, k64.T @ r64).T  # Rᵀ K (C + KᵀK)⁻¹, C symmetric
    return delta.to(dtype=keys.dtype, device=keys.device)
