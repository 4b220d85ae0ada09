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


def _adam_run(extra, weight_decay=0.0, steps=5):
    """Five Adam steps on a fixed least-squares problem, ``extra`` applied to the gradients before each step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    ctx = SimpleNamespace(model=model)
    if extra is not None:
        extra.on_task_start(ctx)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if extra is not None:
            extra.before_step(ctx)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_l2_towards_zero_is_exactly_adams_weight_decay():
    assert torch.allclose(_adam_run(L2(0.1)), _adam_run(None, weight_decay=0.1), atol=1e-7)
    assert not torch.allclose(_adam_run(L2(0.1, "anchor")), _adam_run(None, weight_decay=0.1), atol=1e-4)


def test_clipping_barely_changes_adams_steps():
    """Adam divides each step by a running gradient scale: shrinking every gradient by the same factor cancels."""
    clipped, plain = _adam_run(GradClip(1e-3)), _adam_run(None)
    torch.manual_seed(0)
    start = torch.cat([p.detach().reshape(-1) for p in torch.nn.Linear(4, 3).parameters()])
    assert (clipped - plain).norm() < 0.05 * (plain - start).norm()


def test_clipping_leaves_a_small_gradient_alone():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    GradClip(1.0).before_step(SimpleNamespace(model=model))
    assert all(torch.equal(p.grad, torch.full_like(p, 1e-3)) for p in model.parameters())
