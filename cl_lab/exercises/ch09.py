"""Chapter 09's exercises: LoRA's forward pass on GPT-2's ``Conv1D``, and the size of Adam's first step.

- ``lora_conv1d``: y = base(x) + (α/r)·x Aᵀ Bᵀ on a ``Conv1D`` (weight stored [d_in, d_out]), checked against
  ``LoRALinear`` and for bit-exact equality with the frozen layer while B = 0 (Hu et al. 2021, arXiv 2106.09685,
  eq. 3).
- ``adam_first_step``: the change Δθ of Adam's first step (moments zero, bias-corrected), checked against
  ``torch.optim.Adam`` and against its one invariant, |Δθ| ≈ lr whatever the gradient's size (Kingma & Ba 2015,
  arXiv 1412.6980, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.methods.lora import LoRALinear

# ---------------------------------------------------------------- 9.1 · LoRA's forward on Conv1D


def lora_conv1d_stub(base: Conv1D, A: Tensor, B: Tensor, alpha: float, x: Tensor) -> Tensor:
    """base: a frozen GPT-2 ``Conv1D`` (weight [d_in, d_out], y = x W + b); A [r, d_in]; B [d_out, r];
    x [..., d_in]. Returns the adapted output [..., d_out]: base(x) + (α/r)·x Aᵀ Bᵀ."""
    raise NotImplementedError


def lora_conv1d_solution(base: Conv1D, A: Tensor, B: Tensor, alpha: float, x: Tensor) -> Tensor:
    rank = A.shape[0]
    return base(x) + (alpha / rank) * (x @ A.T) @ B.T  # [..., d_in] → [..., r] → [..., d_out]


def _lora_no_scale(base: Conv1D, A: Tensor, B: Tensor, alpha: float, x: Tensor) -> Tensor:
    return base(x) + (x @ A.T) @ B.T


def _lora_linear_layout(base: Conv1D, A: Tensor, B: Tensor, alpha: float, x: Tensor) -> Tensor:
    return x @ base.weight.T + base.bias + (alpha / A.shape[0]) * (x @ A.T) @ B.T  # nn.Linear's [out, in]


def _lora_case(d_in: int, d_out: int, rank: int, seed: int) -> tuple[Conv1D, LoRALinear, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = Conv1D(d_out, d_in)  # transformers' argument order: (nf = d_out, nx = d_in)
    with torch.no_grad():
        base.weight.copy_(0.2 * torch.randn(d_in, d_out, generator=gen))
        base.bias.copy_(0.1 * torch.randn(d_out, generator=gen))
    layer = LoRALinear(base)
    layer.add_adapter(rank, 2.0 * rank, generator=gen)
    layer.active = (0,)
    x = torch.randn(3, 5, d_in, generator=gen)  # [batch, positions, d_in]
    return base, layer, x


@torch.no_grad()
def _lora_properties(fn) -> None:
    base, layer, x = _lora_case(d_in=12, d_out=20, rank=4, seed=0)
    A, B, alpha = layer.A[0], layer.B[0], 2.0 * 4
    y = fn(base, A.clone(), B.clone(), alpha, x)
    expect(isinstance(y, Tensor) and y.shape == (3, 5, 20), "shape: x [3, 5, d_in = 12] → y [3, 5, d_out = 20]",
           "(3, 5, 20)", tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__)
    expect(torch.equal(y, base(x)), "at initialisation (B = 0) the output equals the frozen Conv1D's bit for bit",
           "torch.equal(y, base(x))", f"max |y − base(x)| = {(y - base(x)).abs().max().item():.2e}")
    layer.B[0].copy_(0.3 * torch.randn(layer.B[0].shape, generator=torch.Generator().manual_seed(1)))
    y = fn(base, A.clone(), layer.B[0].clone(), alpha, x)
    gap = (y - layer(x)).abs().max().item()
    expect(gap <= 1e-5, "with a trained-looking B the output equals cl_lab's LoRALinear", "max |Δ| ≤ 1e-5",
           f"{gap:.2e}")
    doubled = fn(base, A.clone(), layer.B[0].clone(), 2 * alpha, x) - base(x)
    ratio = (doubled.norm() / (y - base(x)).norm()).item()
    expect(abs(ratio - 2) <= 1e-4, "the adapter's part scales with α (α/r)", "2× the part at 2α", f"{ratio:.4f}×")


check_lora_conv1d = register(Exercise(
    name="lora_conv1d", chapter="09", title="LoRA's forward on GPT-2's Conv1D", difficulty=2, minutes=15,
    stub=lora_conv1d_stub, solution=lora_conv1d_solution, properties=_lora_properties,
    wrong_answers={"no α/r scale": _lora_no_scale, "nn.Linear's weight layout": _lora_linear_layout}))


# ---------------------------------------------------------------- 9.2 · Adam's first step


def adam_first_step_stub(grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                         eps: float = 1e-8) -> Tensor:
    """grad: a parameter's first gradient [*shape] (Adam's moments start at zero). Returns Δθ [*shape], the
    change Adam's first step makes: θ_1 − θ_0, with the bias-corrected moments m̂ and v̂."""
    raise NotImplementedError


def adam_first_step_solution(grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                             eps: float = 1e-8) -> Tensor:
    beta1, beta2 = betas
    m = (1 - beta1) * grad  # the first moment after one step (it started at 0)
    v = (1 - beta2) * grad**2
    m_hat, v_hat = m / (1 - beta1), v / (1 - beta2)  # bias correction: m̂ = g, v̂ = g²
    return -lr * m_hat / (v_hat.sqrt() + eps)  # = −lr·g/(|g| + ε) ≈ −lr·sign(g)


def _adam_no_bias_correction(grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                             eps: float = 1e-8) -> Tensor:
    beta1, beta2 = betas
    return -lr * (1 - beta1) * grad / (((1 - beta2) * grad**2).sqrt() + eps)


def _adam_as_sgd(grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    return -lr * grad


def _torch_adam_step(grad: Tensor, lr: float) -> Tensor:
    param = torch.nn.Parameter(torch.zeros_like(grad))
    opt = torch.optim.Adam([param], lr=lr)
    param.grad = grad.clone()
    opt.step()
    return param.detach()


@torch.no_grad()
def _adam_properties(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.empty(2000).uniform_(-5, 2, generator=gen)  # |g| from 1e-5 to 100
    signs = torch.randint(0, 2, (2000,), generator=gen) * 2 - 1
    grad = (signs * scales).reshape(40, 50)  # [40, 50]
    lr = 1e-3
    delta = fn(grad.clone(), lr)
    expect(isinstance(delta, Tensor) and delta.shape == grad.shape, "shape: Δθ like the gradient", tuple(grad.shape),
           tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__)
    reference = _torch_adam_step(grad, lr)
    gap = ((delta - reference).abs() / lr).max().item()
    expect(gap <= 1e-4, "equals torch.optim.Adam's first step (|g| from 1e-5 to 100)", "max |Δ − Adam's| ≤ 1e-4·lr",
           f"{gap:.2e}·lr")
    size = (delta.abs() / lr)
    expect(bool(((size - 1).abs() <= 1e-2).all()), "every weight moves by about lr, whatever its gradient's size",
           "|Δθ| within 1 % of lr", f"|Δθ|/lr from {size.min().item():.3g} to {size.max().item():.3g}")
    expect(bool((torch.sign(delta) == -torch.sign(grad)).all()), "each step goes against its gradient's sign")


check_adam_first_step = register(Exercise(
    name="adam_first_step", chapter="09", title="Adam's first step moves every weight by about lr", difficulty=2,
    minutes=15, stub=adam_first_step_stub, solution=adam_first_step_solution, properties=_adam_properties,
    wrong_answers={"no bias correction": _adam_no_bias_correction, "an SGD step": _adam_as_sgd}))
