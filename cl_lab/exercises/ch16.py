"""Chapter 16's exercise: the distillation loss (Hinton et al. 2015, arXiv:1503.02531), the one term a student
learns from when it sees prompts and a teacher's distribution but no labels.

- ``distillation_loss``: T² · KL(q ‖ softmax(z / T)), averaged over the batch, for student logits z [B, V] and
  teacher probabilities q [B, V]; checked on a hand-made case, against ``F.kl_div``, on a teacher with zeros, on
  the batch average and on the gradient's scale, which the T² factor keeps independent of T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lab.exercises._core import Exercise, expect, register


def distillation_loss_stub(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """student_logits [B, V]; teacher_probs [B, V] (rows sum to 1, already softened at ``temperature``).
    Returns the scalar T² · KL(teacher ‖ softmax(student_logits / T)), averaged over the B rows."""
    raise NotImplementedError


def distillation_loss_solution(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, -1)  # [B, V]
    kl = (teacher_probs * (teacher_probs.clamp_min(1e-30).log() - log_p)).sum(-1)  # [B]; 0·log 0 = 0
    return kl.mean() * temperature ** 2


def _without_t_squared(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, -1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean")


def _reversed(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, -1)
    return (log_p.exp() * (log_p - teacher_probs.log())).sum(-1).mean() * temperature ** 2


def _summed_over_batch(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, -1)
    return F.kl_div(log_p, teacher_probs, reduction="sum") * temperature ** 2


def _number(x) -> float:
    return float(x) if isinstance(x, Tensor) and x.numel() == 1 else float("nan")


def _distillation_loss_properties(fn) -> None:
    got = fn(torch.zeros(1, 2), torch.tensor([[0.75, 0.25]]), 1.0)
    expect(isinstance(got, Tensor) and got.dim() == 0, "returns a scalar tensor", "shape ()",
           tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__)
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expect(math.isclose(_number(got), want, rel_tol=1e-4), "hand case, student uniform over 2 words, teacher "
           "(0.75, 0.25): KL(teacher ‖ student) = Σ q log(q / p)", f"{want:.4f}", f"{_number(got):.4f}")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, generator=gen)
    q = F.softmax(torch.randn(4, 7, generator=gen), -1)
    same = _number(fn(z, F.softmax(z / 2.0, -1), 2.0))
    expect(abs(same) <= 1e-5, "zero when the student's softened distribution equals the teacher's", "0",
           f"{same:.2e}")
    one, four = _number(fn(z[:1], q[:1], 1.0)), _number(fn(z[:1].repeat(4, 1), q[:1].repeat(4, 1), 1.0))
    expect(math.isclose(one, four, rel_tol=1e-4), "averages over the batch: four copies of a row cost what one does",
           f"{one:.4f}", f"{four:.4f}")
    want = F.kl_div(F.log_softmax(z, -1), q, reduction="batchmean").item()
    value = _number(fn(z, q, 1.0))
    expect(math.isclose(value, want, rel_tol=1e-4), "equals F.kl_div(log p, q, 'batchmean') at T = 1", f"{want:.4f}",
           f"{value:.4f}")
    sparse = q.clone()
    sparse[:, 0] = 0.0
    sparse = sparse / sparse.sum(-1, keepdim=True)
    value = _number(fn(z, sparse, 1.0))
    expect(math.isfinite(value), "finite when the teacher gives a word probability 0 (0 · log 0 counts as 0)",
           "finite", value)
    for tau in (1.0, 4.0):
        zt = z.clone().requires_grad_(True)
        fn(zt, q, tau).backward()
        want = tau * (F.softmax(z / tau, -1) - q) / len(z)  # ∂/∂z of T² KL = T (p_T − q) / B
        gap = (zt.grad - want).abs().max().item() if zt.grad is not None else float("inf")
        expect(gap <= 1e-5, f"gradient T·(p_T − q)/B at T = {tau:g}: the T² factor keeps the gradient's scale as T "
               "grows", "≤ 1e-5", f"{gap:.2e}")


check_distillation_loss = register(Exercise(
    name="distillation_loss", chapter="16", title="The distillation loss, T² included", difficulty=1, minutes=10,
    stub=distillation_loss_stub, solution=distillation_loss_solution, properties=_distillation_loss_properties,
    wrong_answers={"without the T² factor": _without_t_squared, "the reversed KL": _reversed,
                   "summed over the batch": _summed_over_batch}))
