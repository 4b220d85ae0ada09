"""Chapter 12 exercises: DPO's loss on sequence log-probabilities, and Schulman's k3 estimator of the KL to the
reference.

Both checkers work in float64 on small seeded random inputs and compare with ``cl_lab.methods.alignment.dpo_loss``
and ``cl_lab.lm.kl_estimators.kl_estimates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cl_lab.exercises._core import Exercise, expect, register, unsolved
from cl_lab.methods.alignment import dpo_loss as library_dpo

TOL = 1e-9


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scalar(out: object, prop: str) -> float:
    expect(isinstance(out, torch.Tensor) and out.dim() == 0, f"{prop}: returns a 0-d tensor (the mean over pairs)",
           "a 0-d tensor", getattr(out, "shape", type(out).__name__))
    return float(out)


# --- Exercise 12.1 · DPO's loss -------------------------------------------------------------------------------------

def sequence_dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
             ref_logp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Inputs: sequence log-probabilities [B] of the chosen and rejected responses under the policy and the
    frozen reference. Returns DPO's loss (Rafailov et al. 2023, eq. 7), a 0-d tensor: the mean over pairs of
    −log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])."""
    margin = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)  # [B] implicit reward gap
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def _dpo_no_beta(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta):
    return -F.logsigmoid((logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)).mean()


def _dpo_references_swapped(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta):
    return -F.logsigmoid(beta * ((logp_chosen - ref_logp_rejected) - (logp_rejected - ref_logp_chosen))).mean()


def _dpo_sigmoid(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta):
    return -torch.sigmoid(beta * ((logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected))).mean()


def _dpo_properties(fn: Callable) -> None:
    same = -5.0 + _randn(0, 6)
    at_start = _scalar(fn(same, same - 1.0, same, same - 1.0, 0.1), "policy = reference")
    expect(abs(at_start - math.log(2)) < 1e-9, "at π_θ = π_ref the loss is ln 2 ≈ 0.6931", round(math.log(2), 4),
           round(at_start, 4))
    for seed, beta in ((1, 0.1), (2, 0.5), (3, 2.0)):
        chosen, rejected, ref_chosen, ref_rejected = (-10.0 + 3.0 * _randn(seed * 10 + k, 8) for k in range(4))
        args = (chosen.clone(), rejected.clone(), ref_chosen.clone(), ref_rejected.clone())
        got = _scalar(fn(*args, beta), f"β = {beta}")
        want = float(library_dpo(chosen, rejected, ref_chosen, ref_rejected, beta))
        expect(got > 0, f"β = {beta}: the loss is positive (−log of a probability)", "> 0", round(got, 4))
        expect(abs(got - want) < 1e-9 * max(1.0, want), f"β = {beta}: equals cl_lab's dpo_loss on random "
               "log-probabilities", round(want, 6), round(got, 6))


check_dpo_loss = register(Exercise(
    name="dpo_loss", chapter="12", title="DPO's loss on sequence log-probabilities", difficulty=2, minutes=15,
    stub=unsolved(sequence_dpo_loss), solution=sequence_dpo_loss, properties=_dpo_properties,
    wrong_answers={"β left out": _dpo_no_beta,
                   "reference terms swapped between chosen and rejected": _dpo_references_swapped,
                   "sigmoid instead of log-sigmoid": _dpo_sigmoid},
))


# --- Exercise 12.2 · Schulman's k3 ----------------------------------------------------------------------------------

def k3_estimate(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """logp_policy, logp_ref: [S] log-probabilities of S tokens x sampled from the policy π_θ, under π_θ and
    under π_ref. Returns the per-sample k3 estimates [S] of KL(π_θ ‖ π_ref) (Schulman 2020):
    k3 = (r − 1) − log r with r = π_ref(x) / π_θ(x)."""
    log_r = logp_ref - logp_policy  # [S]
    return torch.expm1(log_r) - log_r


def _k3_is_k1(logp_policy, logp_ref):
    return logp_policy - logp_ref


def _k3_ratio_flipped(logp_policy, logp_ref):
    log_r = logp_policy - logp_ref
    return torch.expm1(log_r) - log_r


def _k3_properties(fn: Callable) -> None:
    for seed, vocab in ((0, 5), (1, 40)):
        log_q = (1.5 * _randn(seed, vocab)).log_softmax(0)  # the policy π_θ over a small vocabulary
        log_p = (1.5 * _randn(seed + 100, vocab)).log_softmax(0)  # the reference π_ref
        out = fn(log_q.clone(), log_p.clone())  # every token once: weigh by π_θ for the exact expectation
        expect(isinstance(out, torch.Tensor) and out.shape == log_q.shape, "returns one estimate per sample [S]",
               tuple(log_q.shape), getattr(out, "shape", type(out).__name__))
        expect(float(out.min()) >= -TOL, "every k3 sample is ≥ 0 (unlike k1)", "≥ 0", round(float(out.min()), 4))
        zero = fn(log_q.clone(), log_q.clone())
        expect(float(zero.abs().max()) <= TOL, "π_θ = π_ref gives 0 on every sample", 0.0,
               round(float(zero.abs().max()), 6))
        exact = float((log_q.exp() * (log_q - log_p)).sum())
        mean = float((log_q.exp() * out).sum())
        expect(abs(mean - exact) <= 1e-9 * max(1.0, exact), "unbiased: its mean under x ~ π_θ is KL(π_θ ‖ π_ref)",
               round(exact, 6), round(mean, 6))


check_k3_estimate = register(Exercise(
    name="k3_estimate", chapter="12", title="Schulman's k3 estimator of the KL", difficulty=1, minutes=10,
    stub=unsolved(k3_estimate), solution=k3_estimate, properties=_k3_properties,
    wrong_answers={"k1 = −log r": _k3_is_k1, "ratio the wrong way round (r = π_θ / π_ref)": _k3_ratio_flipped},
))
