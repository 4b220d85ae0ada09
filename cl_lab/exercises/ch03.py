"""Chapter 03's exercises: SI's path-integral importance, and MAS's label-free importance."""

from __future__ import annotations

import torch
from torch import nn

from cl_lab import fisher
from cl_lab.exercises._core import (
    Exercise,
    expect,
    register,
    seeded_inputs,
    seeded_linear,
    seeded_mlp,
    tensors_close,
    unsolved,
)
from cl_lab.methods.regularization import SI, output_sensitivity


def _show(v: torch.Tensor) -> list[float]:
    return [round(float(e), 4) for e in v.detach().reshape(-1)[:4]]


# ---- Exercise 3.1 · SI's path integral ------------------------------------------------------------------------

def si_importance(grads, updates, xi):
    """One task of training, T optimizer steps, P parameters (flattened):
    grads [T, P]: the task loss's gradient g(t) at each step, read before the step;
    updates [T, P]: the change Δθ(t) each step actually made; xi: the damping ξ > 0.

    Returns Ω [P] (Zenke, Poole & Ganguli 2017, eqs. 3–5):
        ω_k = Σ_t −g_k(t)·Δθ_k(t),     Ω_k = ω_k / (Δ_k² + ξ),     Δ_k = Σ_t Δθ_k(t), the total change.
    """
    omega = -(grads * updates).sum(0)  # [P]
    total_change = updates.sum(0)  # [P]
    return omega / (total_change.pow(2) + xi)


def _recorded_si_run(seed: int, steps: int = 30):
    """Noisy minibatch SGD on a small regression; returns (grads [T, P], updates [T, P], SI's Ω [P], ξ)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(4, 2)
    x, w_true = torch.randn(64, 4, generator=gen), torch.randn(4, 2, generator=gen)
    y = x @ w_true
    si = SI(c=0.0, xi=0.05)
    si.begin_task(layer)
    grads, updates = [], []
    for _ in range(steps):
        batch = torch.randint(len(x), (8,), generator=gen)
        layer.zero_grad(set_to_none=True)
        (layer(x[batch]) - y[batch]).pow(2).mean().backward()
        si.record_gradient(layer)
        before = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
        grads.append(torch.cat([p.grad.reshape(-1) for p in layer.parameters()]))
        with torch.no_grad():  # a plain SGD step (torch.optim's first step imports torch._dynamo: seconds)
            for p in layer.parameters():
                p -= 0.05 * p.grad
        si.record_step(layer)
        updates.append(torch.cat([p.detach().reshape(-1) for p in layer.parameters()]) - before)
    si.consolidate(layer)
    return torch.stack(grads), torch.stack(updates), fisher.flatten(si.importance), si.xi


def _quadratic_path(steps: int = 400, lr: float = 0.01):
    """Full-batch gradient descent on L(θ) = ½ (θ − c)ᵀ H (θ − c): (grads, updates, loss decrease)."""
    hessian, target = torch.diag(torch.tensor([2.0, 0.5, 1.0, 0.1])), torch.tensor([1.0, -1.0, 2.0, 3.0])
    theta, grads, updates = torch.zeros(4), [], []

    def loss(t):
        return 0.5 * (t - target) @ hessian @ (t - target)

    start = loss(theta)
    for _ in range(steps):
        g = hessian @ (theta - target)
        grads.append(g)
        updates.append(-lr * g)
        theta = theta - lr * g
    return torch.stack(grads), torch.stack(updates), float(start - loss(theta))


def _si_importance_properties(fn) -> None:
    grads, updates, library, xi = _recorded_si_run(0)
    got = fn(grads.clone(), updates.clone(), xi)
    expect(torch.is_tensor(got) and got.shape == (grads.shape[1],), "returns a tensor [P]",
           f"shape ({grads.shape[1]},)", tuple(got.shape) if torch.is_tensor(got) else type(got).__name__)
    downhill = fn(torch.tensor([[1.0]]), torch.tensor([[-0.1]]), 0.01)
    expect(float(downhill) > 0, "a step against the gradient (the loss falls) gives Ω > 0", "> 0", _show(downhill))
    still = fn(torch.tensor([[2.0, 1.0], [-1.0, 1.0]]), torch.tensor([[0.0, -0.1], [0.0, -0.1]]), 0.01)
    expect(bool(torch.isfinite(still).all()) and float(still[0]) == 0,
           "a parameter that never moved gets Ω = 0, and ξ keeps Ω finite", "[0, finite]", _show(still))
    back_and_forth = fn(torch.tensor([[-1.0], [1.0]]), torch.tensor([[0.1], [-0.1]]), 0.1)
    expect(abs(float(back_and_forth) - 2.0) < 1e-4,
           "Δ is the total change over the task, not the path length (there and back: ω = 0.2, Δ = 0, Ω = 0.2/ξ = 2)",
           2.0, _show(back_and_forth))
    for seed in (0, 1):
        grads, updates, library, xi = _recorded_si_run(seed)
        got = fn(grads.clone(), updates.clone(), xi)
        expect(tensors_close(got, library),
               f"equals the Ω of cl_lab's SI on a recorded minibatch-SGD run (seed {seed})", _show(library), _show(got))
    grads, updates, decrease = _quadratic_path()
    xi = 0.01
    omega = fn(grads, updates, xi) * (updates.sum(0).pow(2) + xi)
    expect(abs(float(omega.sum()) / decrease - 1) < 0.02,
           "Σ_k Ω_k(Δ_k² + ξ) = Σ_k ω_k is the loss decrease on a quadratic with small full-batch steps",
           round(decrease, 4), round(float(omega.sum()), 4))


def _raw_omega(grads, updates, xi):
    return -(grads * updates).sum(0)


def _sign_flipped(grads, updates, xi):
    return -si_importance(grads, updates, xi)


def _no_damping(grads, updates, xi):
    return -(grads * updates).sum(0) / updates.sum(0).pow(2)


def _path_length(grads, updates, xi):
    return -(grads * updates).sum(0) / (updates.pow(2).sum(0) + xi)


check_si_importance = register(Exercise(
    name="si_importance", chapter="03", title="SI's path integral", difficulty=2, minutes=15,
    stub=unsolved(si_importance), solution=si_importance, properties=_si_importance_properties,
    wrong_answers={"the raw ω, without the Δ² + ξ normaliser": _raw_omega,
                   "ω = Σ g·Δθ (the sign flipped)": _sign_flipped,
                   "no damping ξ": _no_damping,
                   "Σ_t Δθ(t)² (the path's squared steps) in place of Δ²": _path_length}))


# ---- Exercise 3.2 · MAS's label-free importance ---------------------------------------------------------------

def mas_importance(model, x):
    """model: nn.Module mapping x [N, D] to outputs f(x) [N, C]; no labels.

    Returns {parameter name: tensor like the parameter} (Aljundi et al. 2018, eq. 4):
        Ω = (1/N) Σ_b |∂ ‖f(x_b)‖²₂ / ∂θ|,     the absolute value taken per sample, before the mean.
    """
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        squared_norm = model(x[b:b + 1]).pow(2).sum()
        grads = torch.autograd.grad(squared_norm, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            total[n] += g.abs()
    return {n: v / len(x) for n, v in total.items()}


def _mas_case(seed: int, hidden: tuple[int, ...]):
    return seeded_mlp(seed, 5, hidden, 3), seeded_inputs(seed, 10, 5)


def _mas_importance_properties(fn) -> None:
    linear, x = seeded_linear(0, 4, 3), seeded_inputs(0, 9, 4)
    got = fn(linear, x)
    expect(isinstance(got, dict) and set(got) == {"0.weight", "0.bias"}, "returns {parameter name: tensor}",
           "keys ['0.bias', '0.weight']", sorted(got) if isinstance(got, dict) else type(got).__name__)
    expect(all(torch.is_tensor(got[n]) and got[n].shape == p.shape for n, p in linear.named_parameters()),
           "every tensor is shaped like its parameter", "0.weight (3, 4), 0.bias (3,)",
           {n: tuple(v.shape) for n, v in got.items() if torch.is_tensor(v)})
    expect(all(bool((v >= 0).all()) for v in got.values()), "every entry is ≥ 0 (a mean of absolute values)",
           "≥ 0", "< 0")
    with torch.no_grad():
        z = linear(x)  # [N, C]; ∂‖z‖²/∂W = 2 z xᵀ and ∂‖z‖²/∂b = 2 z, per sample
    by_hand = {"0.weight": (2 * z[:, :, None] * x[:, None, :]).abs().mean(0), "0.bias": (2 * z).abs().mean(0)}
    expect(all(tensors_close(got[n], by_hand[n]) for n in by_hand),
           "one linear layer, by hand: Ω_W = mean over x of |2 z xᵀ|, Ω_b = mean |2 z|",
           _show(by_hand["0.weight"]), _show(got["0.weight"]))
    for seed, hidden in ((1, (6,)), (2, (7, 4))):
        model, x = _mas_case(seed, hidden)
        want, got = output_sensitivity(model, x), fn(model, x)
        expect(all(tensors_close(got[n], want[n]) for n in want),
               f"equals cl_lab's MAS importance (output_sensitivity) on an MLP with hidden {hidden}",
               _show(want["head.weight"]), _show(got["head.weight"]))


def _abs_of_the_batch_gradient(model, x):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(x).pow(2).sum(1).mean(), list(params.values()))
    return {n: g.abs() for n, g in zip(params, grads, strict=True)}


def _norm_not_squared(model, x):
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        grads = torch.autograd.grad(model(x[b:b + 1]).norm(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            total[n] += g.abs() / len(x)
    return total


def _softmax_outputs(model, x):
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        grads = torch.autograd.grad(model(x[b:b + 1]).softmax(1).pow(2).sum(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            total[n] += g.abs() / len(x)
    return total


check_mas_importance = register(Exercise(
    name="mas_importance", chapter="03", title="MAS's label-free importance", difficulty=2, minutes=15,
    stub=unsolved(mas_importance), solution=mas_importance, properties=_mas_importance_properties,
    wrong_answers={"|gradient of the batch mean| (the absolute value after the mean)": _abs_of_the_batch_gradient,
                   "the norm ‖f(x)‖, not its square": _norm_not_squared,
                   "the squared norm of the softmax probabilities": _softmax_outputs}))
