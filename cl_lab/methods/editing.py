"""Knowledge editing at one linear layer viewed as a key–value memory: ROME's rank-one edit, its batched
least-squares form (MEMIT at one layer), and the fine-tuning baselines it is compared with.

The layer's weight W [d_v, d_k] maps a key k [d_k] (the hidden activation the layer reads) to a value W k
[d_v] (what it writes). Keys are stored one per row here: K [N, d_k], so the key covariance is
C = Kᵀ K / N, the transpose of the papers' K Kᵀ (their keys are columns).

| function            | what it solves                                                                       |
|---------------------|--------------------------------------------------------------------------------------|
| ``key_covariance``  | C = Kᵀ K / N + ridge · (tr C / d_k) · I                                              |
| ``rome_update``     | min ‖Δ Kᵀ‖² s.t. (W + Δ) k* = v*  →  Δ = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)       |
| ``batch_update``    | every edit at once: exactly (``mode="exact"``) or MEMIT's soft least squares        |
| ``finetune_on_fact``| the baselines: gradient steps on the new fact, on all weights or one, with EWC       |

Everything is solved in float64 and returned in W's dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate

BATCH_MODES = ("exact", "memit")
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
    """The uncentred second moment of the keys, C = Kᵀ K / N [d_k, d_k] from keys [N, d_k], plus
    ``ridge`` times its mean eigenvalue on the diagonal (so ``ridge`` is scale-free). ROME estimates the same
    matrix, E[k kᵀ], from 100,000 Wikipedia keys (Meng et al. 2022, arXiv 2202.05262, sec. 3.1)."""
    keys = _tensor("keys", keys, 2)
    ridge = _validate.non_negative("ridge", ridge)
    if len(keys) == 0:
        raise ValueError("keys must hold at least one key, got 0 rows")
    k64 = keys.double()
    cov = k64.T @ k64 / len(keys)  # [d_k, d_k]
    if ridge > 0:
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return cov.to(keys.dtype)


def _check_covariance(C: torch.Tensor, d_k: int) -> torch.Tensor:
    C = _tensor("C", C, 2)
    if C.shape != (d_k, d_k):
        raise ValueError(f"C must be [d_k, d_k] = [{d_k}, {d_k}] to match W [d_v, d_k], got shape {tuple(C.shape)}")
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

    W [d_v, d_k], C [d_k, d_k] symmetric positive definite, k_star [d_k], v_star [d_v].
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


def rome_edit(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor) -> torch.Tensor:
    """The edited weight Ŵ = W + ``rome_update(W, C, k_star, v_star)`` (a new tensor; W is not changed)."""
    return W + rome_update(W, C, k_star, v_star)


def batch_update(W: torch.Tensor, C: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 mode: str = "exact") -> torch.Tensor:
    """All edits at once, at one layer: keys K* [N, d_k] should map to values V* [N, d_v]; R = V* − K* Wᵀ.

    ``mode="exact"``: minimise ‖Δ Kᵀ‖² subject to (W + Δ) k_i = v_i for every edit i — ROME's problem with
    N constraints: Δ = Rᵀ (K* C⁻¹ K*ᵀ)⁻¹ K* C⁻¹. Needs N ≤ d_k independent keys; for N = 1 it is ROME.
    ``mode="memit"``: MEMIT's soft form at one layer (Meng et al. 2023, arXiv 2210.07229, sec. 4.1):
    minimise ‖Δ Kᵀ‖² + ‖(W + Δ) K*ᵀ − V*ᵀ‖², so Δ = Rᵀ K* (C + K*ᵀ K*)⁻¹ (their R K₁ᵀ (C₀ + K₁K₁ᵀ)⁻¹).
    Here C must carry MEMIT's weight on the preserved keys (its λ · E[kkᵀ]); the constraints then hold
    only approximately, and any N is allowed.
    """
    W = _tensor("W", W, 2)
    d_v, d_k = W.shape
    mode = _validate.one_of("mode", mode, BATCH_MODES)
    c64 = _check_covariance(C, d_k)
    keys, values = _tensor("keys", keys, 2), _tensor("values", values, 2)
    if keys.shape[1] != d_k or values.shape[1] != d_v or len(keys) != len(values) or len(keys) == 0:
        raise ValueError(f"keys must be [N, d_k = {d_k}] and values [N, d_v = {d_v}] with the same N ≥ 1, got "
                         f"keys {tuple(keys.shape)} and values {tuple(values.shape)}")
    k64 = keys.double().to(c64.device)  # [N, d_k]
    residual = values.double().to(c64.device) - k64 @ W.double().to(c64.device).T  # R [N, d_v]
    if mode == "memit":
        delta = torch.linalg.solve(c64 + k64.T @ k64, k64.T @ residual).T  # Rᵀ K* (C + K*ᵀK*)⁻¹, C symmetric
        return delta.to(dtype=W.dtype, device=W.device)
    if len(keys) > d_k:
        raise ValueError(f"mode='exact' needs at most d_k = {d_k} edits (one constraint per key), got N = "
                         f"{len(keys)}; use mode='memit'")
    c_inv_keys = torch.linalg.solve(c64, k64.T)  # C⁻¹ K*ᵀ [d_k, N]
    gram = k64 @ c_inv_keys  # K* C⁻¹ K*ᵀ [N, N]
    if torch.linalg.matrix_rank(gram) < len(keys):
        raise ValueError("keys must be linearly independent for mode='exact' (two edits share a key "
                         "direction), got a rank-deficient set; use mode='memit'")
    delta = (c_inv_keys @ torch.linalg.solve(gram, residual)).T  # [d_v, d_k]
    return delta.to(dtype=W.dtype, device=W.device)


# ---------------------------------------------------------------- baselines: gradient steps on the new fact

Penalty = Callable[[nn.Module], torch.Tensor]  # model -> scalar added to the loss (e.g. EWC.penalty)


def finetune_on_fact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     params: Iterable[nn.Parameter] | None = None, steps: int = 50, lr: float = 1e-2,
                     penalty: Penalty | None = None, until_learned: bool = True) -> nn.Module:
    """The fine-tuning baselines of ROME's comparison (Meng et al. 2022, arXiv 2202.05262, sec. 3.2, table 1:
    "FT" on all weights; on one layer it is their FT-L without its norm constraint): ``steps`` Adam steps of
    cross-entropy on inputs x [N, D] with new labels y [N], updating ``params`` (default: every parameter), plus
    ``penalty(model)`` if given
    (e.g. ``EWC.penalty``, the "global protection" of Kirkpatrick et al. 2017, eq. 3). With ``until_learned``
    it stops at the first step where every input gives its new label (the least fine-tuning that makes the
    edit). Changes ``model`` in place; its ``steps_taken`` attribute says how many steps ran."""
    _validate.positive_int("steps", steps)
    _validate.positive("lr", lr)
    _tensor("x", x, 2)
    y = _tensor("y", y, 1)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x [N, D] and y [N] must have the same N ≥ 1, got {len(x)} and {len(y)}")
    chosen = list(model.parameters()) if params is None else list(params)
    if not chosen:
        raise ValueError("params must hold at least one parameter, got none")
    optimizer = torch.optim.Adam(chosen, lr=lr)
    model.steps_taken = 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        if until_learned and bool((logits.argmax(-1) == y).all()):
            break
        loss = F.cross_entropy(logits, y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        optimizer.step()
        model.steps_taken += 1
    return model
