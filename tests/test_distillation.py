"""LwF: the distillation loss, its temperature, and its errors."""

import pytest
import torch

from cl_lab import data, models, train
from cl_lab.methods.distillation import LwF, distillation_loss


def test_distillation_zero_when_outputs_match_and_positive_otherwise():
    z = torch.randn(5, 4)
    assert distillation_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(z + torch.randn(5, 4), z, 2.0).item() > 0


def test_distillation_gradient_scale_independent_of_high_temperature():
    old = torch.randn(64, 4)
    new = (old + 0.01 * torch.randn(64, 4)).requires_grad_(True)
    grads = []
    for temperature in (4.0, 8.0):
        (g,) = torch.autograd.grad(distillation_loss(new, old, temperature), new)
        grads.append(g.norm().item())
    assert grads[1] == pytest.approx(grads[0], rel=0.1)  # the T² factor cancels the 1/T² of soft targets


def test_lwf_in_the_loop_and_errors():
    stream = data.split_mnist(5, "class", n_train=100)
    run = train.fit(models.MLP(784, (16,), stream.n_out), stream, LwF(), steps=3, batch_size=16, progress=False)
    assert run.R.shape == (5, 5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LwF(temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be ≥ 0"):
        LwF(alpha=-1.0)
    with pytest.raises(ValueError, match="consolidated"):
        LwF().penalty(models.MLP(4, (3,), 2), torch.randn(2, 4))
