"""Post-training losses and the KL penalty as a quadratic (chapter 12).

- DPO, Rafailov et al. 2023 (arXiv:2305.18290), eq. 7, on log-probabilities of whole responses:
  L = −log σ(β[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]).
  ``cl_lab.lm.align`` feeds it the sequence log-probabilities of a language model's responses.
- The KL to a reference, KL(π_θ ‖ π_ref) as in RLHF (Ouyang et al. 2022, arXiv:2203.02155, eq. 2) or the
  distillation direction, exact over a classifier's C answers; along an update Δθ it is ≈ ½ΔθᵀFΔθ, F the
  reference's Fisher: full-matrix EWC (``fisher_quadratic``) beside EWC's diagonal (Kirkpatrick et al. 2017,
  eq. 3; ``diagonal_quadratic``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from cl_lab import _validate


def sft_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy of the demonstrated answers y [B] under logits [B, C]."""
    return F.cross_entropy(logits, y)


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
             ref_logp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), mean over pairs. Inputs are log-probabilities [B] of the chosen and
    rejected responses under the policy and the frozen reference (for a language model: sums over the
    response's tokens); β > 0 is the strength of the implicit KL to the reference — the loss saturates once
    the implicit reward margin β·Δ passes a few units. Equals ln 2 at π_θ = π_ref."""
    beta = _validate.positive("beta", beta)
    margin = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)  # [B]
    return -F.logsigmoid(beta * margin).mean()


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str = "policy||ref"
                    ) -> torch.Tensor:
    """Mean over inputs of the exact KL between the policy and the reference answer distributions, summed over
    all C answers. ``"policy||ref"`` is RLHF's KL(π_θ ‖ π_ref) (Ouyang et al. 2022, eq. 2); ``"ref||policy"``
    is KL(π_ref ‖ π_θ), the distillation direction. Both are 0, with zero gradient, at π_θ = π_ref."""
    _validate.one_of("direction", direction, ("policy||ref", "ref||policy"))
    logp, ref_logp = F.log_softmax(logits, 1), F.log_softmax(ref_logits.detach(), 1)  # [B, C]
    if direction == "policy||ref":
        return (logp.exp() * (logp - ref_logp)).sum(1).mean()
    return (ref_logp.exp() * (ref_logp - logp)).sum(1).mean()


# ------------------------------------------------------------------ the KL as a quadratic: implicit full-matrix EWC

def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def kl_along(model: nn.Module, delta: dict[str, torch.Tensor], x: torch.Tensor, scale: float = 1.0,
             direction: str = "ref||policy") -> float:
    """Exact mean KL over inputs x [N, D] between the model at θ (the reference) and at θ + scale·Δθ."""
    theta = _params(model)
    moved = {n: theta[n] + scale * delta[n] for n in theta}
    with torch.no_grad():
        ref_logits = functional_call(model, theta, (x,))
        logits = functional_call(model, moved, (x,))
        return kl_to_reference(logits, ref_logits, direction).item()


def fisher_quadratic(model: nn.Module, delta: dict[str, torch.Tensor], x: torch.Tensor, scale: float = 1.0) -> float:
    """½ Δθᵀ F Δθ with F the exact (full) Fisher of the model's softmax at θ, averaged over inputs x [N, D],
    without forming F: with u = J Δθ the logits' directional derivative [N, C] (one forward-mode pass),
    Δθᵀ F Δθ = E_x[Σ_c p_c u_c² − (Σ_c p_c u_c)²], the variance of u under p."""
    theta = _params(model)
    tangent = {n: scale * delta[n] for n in theta}
    logits, u = jvp(lambda params: functional_call(model, params, (x,)), (theta,), (tangent,))  # [N, C] each
    p = logits.softmax(1)
    variance = (p * u.pow(2)).sum(1) - (p * u).sum(1).pow(2)  # [N]
    return 0.5 * variance.mean().item()


def diagonal_quadratic(fisher_diag: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                       scale: float = 1.0) -> float:
    """EWC's penalty without λ: ½ Σ_i F_ii Δθ_i² (Kirkpatrick et al. 2017, eq. 3), for comparison."""
    return 0.5 * sum((fisher_diag[n] * (scale * delta[n]).pow(2)).sum().item() for n in fisher_diag)


def full_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exact full Fisher [P, P] (parameters flattened in named_parameters order), from per-sample Jacobians;
    only for tiny models (tests)."""
    theta = _params(model)
    names = list(theta)

    def logits_of(flat: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:  # [C]
        params, start = {}, 0
        for n in names:
            params[n] = flat[start:start + theta[n].numel()].reshape(theta[n].shape)
            start += theta[n].numel()
        return functional_call(model, params, (xb[None],))[0]

    flat = torch.cat([theta[n].reshape(-1) for n in names])
    total = torch.zeros(len(flat), len(flat), dtype=flat.dtype, device=flat.device)
    for xb in x:
        jac = torch.autograd.functional.jacobian(lambda f, xb=xb: logits_of(f, xb), flat)  # [C, P]
        p = logits_of(flat, xb).softmax(0).detach()  # [C]
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total / len(x)
