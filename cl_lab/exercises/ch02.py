"""Chapter 02's exercises: per-sample squares in one matrix product, the exact Fisher in one batched pass, and
EWC's penalty."""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
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
from cl_lab.methods.regularization import EWC


def _number(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def _sum_of_entries(d: dict[str, torch.Tensor]) -> float:
    return float(sum(v.detach().sum() for v in d.values()))


# ---- Exercise 2.1 · Per-sample squares in one matrix product --------------------------------------------------

def per_sample_square_sum(a, g):
    """A Linear layer z = W a: its inputs a [N, in] and the per-sample gradients g [N, out] of some per-sample
    score with respect to its outputs z. Sample b's weight gradient is the outer product g_b a_bᵀ [out, in].

    Returns Σ_b (g_b a_bᵀ)² [out, in], squared entry by entry, without a loop over the samples.
    """
    return g.pow(2).T @ a.pow(2)


def _per_sample_square_sum_properties(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    got = fn(a.clone(), g.clone())
    expect(torch.is_tensor(got) and got.shape == (3, 5), "returns a tensor [out, in]", "shape (3, 5)",
           tuple(got.shape) if torch.is_tensor(got) else type(got).__name__)
    expect(bool((got >= 0).all()), "every entry is a sum of squares, so ≥ 0", "≥ 0", f"min {float(got.min()):.3g}")
    one = fn(a[:1], g[:1])
    expect(tensors_close(one, torch.outer(g[0], a[0]).pow(2)), "one sample: the square of its outer product g aᵀ",
           "(g₀ a₀ᵀ)²", "another matrix")
    loop = sum(torch.outer(g[b], a[b]).pow(2) for b in range(len(a)))
    expect(tensors_close(got, loop), "equals the per-sample loop Σ_b (g_b a_bᵀ)²", f"sum {float(loop.sum()):.4g}",
           f"sum {float(got.sum()):.4g}")
    twice = fn(torch.cat([a, a]), torch.cat([g, g]))
    expect(tensors_close(twice, 2 * loop), "a sum over samples: every sample twice gives twice the result",
           f"sum {float(2 * loop.sum()):.4g}", f"sum {float(twice.sum()):.4g}")


def _square_of_the_summed_gradient(a, g):
    return (g.T @ a).pow(2)


def _product_of_the_sums(a, g):
    return g.pow(2).sum(0)[:, None] * a.pow(2).sum(0)[None, :]


check_per_sample_square_sum = register(Exercise(
    name="per_sample_square_sum", chapter="02", title="Per-sample squares in one matrix product", difficulty=1,
    minutes=10, stub=unsolved(per_sample_square_sum), solution=per_sample_square_sum,
    properties=_per_sample_square_sum_properties,
    wrong_answers={"the square of the summed gradient (gᵀa)²: a batch-squared Fisher": _square_of_the_summed_gradient,
                   "Σ_b g_b² times Σ_b a_b² (squares summed separately)": _product_of_the_sums}))


# ---- Exercise 2.2 · The exact Fisher in one batched pass ------------------------------------------------------

def exact_fisher_diag(model, x):
    """model: nn.Module whose trainable parameters all sit in nn.Linear layers (an MLP on flat inputs),
    mapping x [N, D] to logits [N, C]. Returns {parameter name: tensor shaped like the parameter}:

        F = (1/N) Σ_b Σ_c p(c|x_b) (∂ log p(c|x_b) / ∂θ)²

    in C backward passes (one per class, none per sample).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    inputs, outputs = [], []  # each Linear layer's a [N, in] and z [N, out], in forward order

    def keep(layer, args, z):
        inputs.append(args[0].detach())
        outputs.append(z)

    hooks = [m.register_forward_hook(keep) for _, m in linears]
    try:
        log_p = F.log_softmax(model(x), dim=1)  # [N, C]
    finally:
        for h in hooks:
            h.remove()
    fisher_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    root_p = log_p.detach().exp().sqrt()  # [N, C], held fixed: (∇ √p·log p)² = p (∇ log p)²
    for c in range(log_p.shape[1]):
        grads = torch.autograd.grad((root_p[:, c] * log_p[:, c]).sum(), outputs, retain_graph=True)
        for (name, layer), a, g in zip(linears, inputs, grads, strict=True):  # g [N, out], a [N, in]
            fisher_sum[f"{name}.weight"] += g.pow(2).T @ a.pow(2)
            if layer.bias is not None:
                fisher_sum[f"{name}.bias"] += g.pow(2).sum(0)
    return {n: v / len(x) for n, v in fisher_sum.items()}


def _backward_calls(fn) -> tuple[object, int]:
    """``fn()``'s result and how many backward passes it ran (``torch.autograd.grad`` and ``Tensor.backward``)."""
    with mock.patch.object(torch.autograd, "grad", wraps=torch.autograd.grad) as grad, \
            mock.patch.object(torch.Tensor, "backward", autospec=True, side_effect=torch.Tensor.backward) as backward:
        out = fn()
    return out, grad.call_count + backward.call_count


def _fisher_case(seed: int, hidden: tuple[int, ...] = (6,), n: int = 12, classes: int = 4):
    return seeded_mlp(seed, 5, hidden, classes), seeded_inputs(seed, n, 5, scale=1.5)


def _exact_fisher_properties(fn) -> None:
    linear, x = seeded_linear(0, 5, 3), seeded_inputs(0, 10, 5, scale=1.5)
    got = fn(linear, x)
    expect(isinstance(got, dict) and set(got) == {"0.weight", "0.bias"}, "returns {parameter name: tensor}",
           "keys ['0.bias', '0.weight']", sorted(got) if isinstance(got, dict) else type(got).__name__)
    expect(all(torch.is_tensor(got[n]) and got[n].shape == p.shape for n, p in linear.named_parameters()),
           "every tensor is shaped like its parameter", "0.weight (3, 5), 0.bias (3,)",
           {n: tuple(v.shape) for n, v in got.items() if torch.is_tensor(v)})
    expect(all(bool((v >= 0).all()) for v in got.values()), "every entry is ≥ 0 (a sum of squares)", "≥ 0", "< 0")
    with torch.no_grad():
        p = F.softmax(linear(x), dim=1)  # [N, C]
    spread = p * (1 - p)  # for a softmax layer Σ_c p_c (δ_ck − p_k)² = p_k (1 − p_k)
    by_hand = {"0.weight": spread.T @ x.pow(2) / len(x), "0.bias": spread.mean(0)}
    expect(all(tensors_close(got[n], by_hand[n]) for n in by_hand),
           "one linear softmax layer, by hand: F[k, d] = mean over x of p_k(1 − p_k)·x_d²",
           f"sum {_sum_of_entries(by_hand):.4g}", f"sum {_sum_of_entries(got):.4g}")
    for seed, hidden in ((1, (6,)), (2, (7, 4))):
        model, x = _fisher_case(seed, hidden)
        want = fisher.fisher_diagonal(model, x, estimate="exact")
        got, calls = _backward_calls(lambda model=model, x=x: fn(model, x))
        expect(all(tensors_close(got[n], want[n]) for n in want),
               f"equals cl_lab.fisher.fisher_diagonal(estimate='exact') on an MLP with hidden {hidden}",
               f"sum {_sum_of_entries(want):.4g}", f"sum {_sum_of_entries(got):.4g}")
        n_classes = 4
        expect(calls <= n_classes, f"one backward pass per class, none per sample ({len(x)} samples, "
               f"{n_classes} classes)", f"≤ {n_classes}", calls)


def _batch_squared(model, x):
    params = dict(model.named_parameters())
    log_p = F.log_softmax(model(x), dim=1)
    root_p = log_p.detach().exp().sqrt()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for c in range(log_p.shape[1]):  # the batch-mean gradient, squared: a square of a mean, not a mean of squares
        grads = torch.autograd.grad((root_p[:, c] * log_p[:, c]).mean(), list(params.values()), retain_graph=True)
        for n, g in zip(params, grads, strict=True):
            total[n] += g.pow(2)
    return total


def _summed_not_averaged(model, x):
    return {n: v * len(x) for n, v in exact_fisher_diag(model, x).items()}


def _predicted_class_only(model, x):
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        log_p = F.log_softmax(model(x[b:b + 1]), dim=1)[0]
        grads = torch.autograd.grad(log_p.max(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            total[n] += g.pow(2) / len(x)
    return total


def _loop_over_samples(model, x):
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        log_p = F.log_softmax(model(x[b:b + 1]), dim=1)[0]
        for c in range(len(log_p)):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads, strict=True):
                total[n] += log_p[c].exp().detach() * g.pow(2) / len(x)
    return total


check_exact_fisher = register(Exercise(
    name="exact_fisher", chapter="02", title="The exact Fisher in one batched pass", difficulty=3, minutes=25,
    stub=unsolved(exact_fisher_diag), solution=exact_fisher_diag, properties=_exact_fisher_properties,
    wrong_answers={"the batch-mean gradient squared (batch-squared)": _batch_squared,
                   "summed over the samples, not averaged": _summed_not_averaged,
                   "the predicted class only": _predicted_class_only,
                   "right values, one backward pass per sample and class": _loop_over_samples}))


# ---- Exercise 2.3 · EWC's penalty ------------------------------------------------------------------------------

def ewc_penalty(model, fisher, anchor, lam):
    """model: nn.Module; fisher and anchor: {parameter name: tensor like the parameter} (F and θ*); lam: λ ≥ 0.

    Returns the scalar tensor (λ/2) Σ_i F_i (θ_i − θ*_i)² (Kirkpatrick et al. 2017, eq. 3), differentiable
    with respect to the model's parameters.
    """
    params = dict(model.named_parameters())
    return 0.5 * lam * sum((fisher[n] * (params[n] - anchor[n]).pow(2)).sum() for n in fisher)


def _penalty_case(seed: int):
    model = seeded_mlp(seed, 4, (5,), 3)
    gen = torch.Generator().manual_seed(seed)
    fisher_diag = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return model, fisher_diag, anchor


def _library_penalty(model, fisher_diag, anchor, lam) -> float:
    ewc = EWC(lam=lam)
    ewc.fishers, ewc.anchors = [fisher_diag], [anchor]
    return _number(ewc.penalty(model))


def _ewc_penalty_properties(fn) -> None:
    model, fisher_diag, anchor = _penalty_case(0)
    got = fn(model, fisher_diag, anchor, 10.0)
    expect(torch.is_tensor(got) and got.numel() == 1, "returns a scalar tensor", "a 1-element tensor",
           type(got).__name__)
    at_anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = _number(fn(model, fisher_diag, at_anchor, 10.0))
    expect(abs(zero) < 1e-8, "zero when the weights sit at the anchor θ*", 0.0, zero)
    for seed in (0, 1):
        model, fisher_diag, anchor = _penalty_case(seed)
        for lam in (1.0, 250.0):
            want = _library_penalty(model, fisher_diag, anchor, lam)
            value = _number(fn(model, fisher_diag, anchor, lam))
            expect(abs(value - want) <= 1e-5 * abs(want), f"equals cl_lab's EWC penalty at λ = {lam:g} (seed {seed})",
                   round(want, 5), round(value, 5))
    model.zero_grad(set_to_none=True)
    penalty = fn(model, fisher_diag, anchor, 4.0)
    expect(torch.is_tensor(penalty) and penalty.requires_grad,
           "differentiable: the penalty keeps its graph to the parameters", "requires_grad=True", "a detached value")
    penalty.backward()
    params = dict(model.named_parameters())
    want = {n: 4.0 * fisher_diag[n] * (params[n].detach() - anchor[n]) for n in params}
    expect(all(params[n].grad is not None and tensors_close(params[n].grad, want[n]) for n in params),
           "its gradient is λ·F⊙(θ − θ*)", "λF(θ − θ*)", "another gradient")
    model.zero_grad(set_to_none=True)


def _without_the_half(model, fisher, anchor, lam):
    return 2 * ewc_penalty(model, fisher, anchor, lam)


def _detached(model, fisher, anchor, lam):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return torch.tensor(float(0.5 * lam * sum((fisher[n] * (params[n] - anchor[n]).pow(2)).sum() for n in fisher)))


def _pulled_towards_zero(model, fisher, anchor, lam):
    params = dict(model.named_parameters())
    return 0.5 * lam * sum((fisher[n] * params[n].pow(2)).sum() for n in fisher)


check_ewc_penalty = register(Exercise(
    name="ewc_penalty", chapter="02", title="EWC's penalty", difficulty=1, minutes=10,
    stub=unsolved(ewc_penalty), solution=ewc_penalty, properties=_ewc_penalty_properties,
    wrong_answers={"without the ½": _without_the_half,
                   "computed on detached weights (a number, no gradient)": _detached,
                   "pulled towards 0 instead of θ* (Fisher-weighted weight decay)": _pulled_towards_zero}))
