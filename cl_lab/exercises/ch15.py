"""Chapter 15's exercise: OSF's gradient projection (Nayak et al. 2025, arXiv:2504.07097), the one line that keeps
an update out of the directions a model must preserve.

- ``orthogonal_step``: a gradient G [n, k] with the component in the span of a preserved basis [n, h] removed,
  G − Q Qᵀ G with Q an orthonormal basis of that span; checked on hand-made cases, on bases that are not orthonormal,
  and against PEFT's own projection (``peft.tuners.osf.utils.project_gradient_to_orthogonal_space``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cl_lab.exercises._core import Exercise, expect, register


def orthogonal_step_stub(grad: Tensor, preserved: Tensor) -> Tensor:
    """grad [n, k]: a gradient; preserved [n, h] (h < n): columns spanning the directions to keep (any full-rank
    basis, not necessarily orthonormal). Returns grad [n, k] with its component in that span removed."""
    raise NotImplementedError


def orthogonal_step_solution(grad: Tensor, preserved: Tensor) -> Tensor:
    q = torch.linalg.qr(preserved).Q  # [n, h]: an orthonormal basis of the same span
    return grad - q @ (q.T @ grad)  # (I − QQᵀ) G


def _onto(grad: Tensor, preserved: Tensor) -> Tensor:
    q = torch.linalg.qr(preserved).Q
    return q @ (q.T @ grad)


def _assumes_orthonormal(grad: Tensor, preserved: Tensor) -> Tensor:
    return grad - preserved @ (preserved.T @ grad)


def _first_direction_only(grad: Tensor, preserved: Tensor) -> Tensor:
    q = torch.linalg.qr(preserved).Q[:, :1]
    return grad - q @ (q.T @ grad)


def _peft_projection(grad: Tensor, basis: Tensor) -> Tensor:
    from peft.tuners.osf.utils import project_gradient_to_orthogonal_space

    u = torch.nn.Parameter(torch.zeros_like(grad))
    u.grad = grad.clone()
    svd = {"U_high": basis, "U_low": u, "S_low": torch.nn.Parameter(torch.zeros(grad.shape[1])),
           "V_low": torch.nn.Parameter(torch.zeros(grad.shape[1], 2)), "S_high": torch.ones(basis.shape[1]),
           "V_high": torch.zeros(basis.shape[1], 2)}
    project_gradient_to_orthogonal_space(svd)
    return u.grad


def _orthogonal_step_properties(fn) -> None:
    e = torch.eye(3)
    grad = torch.tensor([[1.0], [2.0], [3.0]])
    got = fn(grad.clone(), e[:, :1].clone())
    expect(isinstance(got, Tensor) and got.shape == (3, 1), "returns a gradient of the same shape [n, k]", "(3, 1)",
           tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__)
    expect(torch.allclose(got, torch.tensor([[0.0], [2.0], [3.0]])),
           "removes the preserved direction: e₁ kept, g = (1, 2, 3) → (0, 2, 3)", "[0, 2, 3]",
           [round(v, 3) for v in got.view(-1).tolist()])
    got = fn(grad.clone(), torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    expect(torch.allclose(got, torch.tensor([[0.0], [0.0], [3.0]]), atol=1e-5),
           "works for a basis that is not orthonormal: span{2e₁, 3e₂} kept, (1, 2, 3) → (0, 0, 3)", "[0, 0, 3]",
           [round(v, 3) for v in got.view(-1).tolist()])
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(12, 4, generator=gen)
    grad = torch.randn(12, 5, generator=gen)
    got = fn(grad.clone(), basis.clone())
    left = (basis.T @ got).abs().max().item()
    expect(left <= 1e-4, "the result has no component along any preserved column (random basis, h = 4)", "≤ 1e-4",
           f"{left:.2e}")
    again = (fn(got.clone(), basis.clone()) - got).abs().max().item()
    expect(again <= 1e-4, "projecting twice changes nothing (a projection is idempotent)", "≤ 1e-4", f"{again:.2e}")
    q = torch.linalg.qr(basis).Q
    gap = (got - _peft_projection(grad, q)).abs().max().item()
    expect(gap <= 1e-4, "equal to PEFT's OSF projection (project_gradient_to_orthogonal_space) for an orthonormal "
           "basis", "≤ 1e-4", f"{gap:.2e}")


check_orthogonal_step = register(Exercise(
    name="orthogonal_step", chapter="15", title="OSF's orthogonal gradient step", difficulty=1, minutes=10,
    stub=orthogonal_step_stub, solution=orthogonal_step_solution, properties=_orthogonal_step_properties,
    wrong_answers={"the projection onto the preserved span": _onto,
                   "a basis assumed orthonormal": _assumes_orthonormal,
                   "only the first preserved direction": _first_direction_only}))
