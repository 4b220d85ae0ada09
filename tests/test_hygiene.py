"""Weight decay, L2 towards θ* and gradient clipping as loop methods (chapter 01's hygiene table)."""

from types import SimpleNamespace

import pytest
import torch

from cl_lab.methods.hygiene import L2, GradClip


def test_l2_adds_strength_times_distance_to_zero_or_to_the_task_start():
    model = torch.nn.Linear(3, 2)
    ctx = SimpleNamespace(model=model)
    for target in ("zero", "anchor"):
        method = L2(0.5, target)
        method.on_task_start(ctx)
        start = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
                p.grad = torch.zeros_like(p)
        method.before_step(ctx)
        for p, p0 in zip(model.parameters(), start, strict=True):
            expected = 0.5 * (p.detach() if target == "zero" else p.detach() - p0)
            assert torch.allclose(p.grad, expected)
    with pytest.raises(ValueError, match="target"):
        L2(0.1, "origin")
    with pytest.raises(ValueError, match="strength"):
        L2(-1.0)


def test_gradient_clipping_caps_the_total_norm():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    GradClip(0.1).before_step(SimpleNamespace(model=model))
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert total == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        GradClip(0.0)
