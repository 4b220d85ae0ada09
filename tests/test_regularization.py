"""EWC, SI and MAS: penalties, path integral, label-free importance, argument errors."""

import pytest
import torch
from torch import nn

from cl_lab import data, models, train
from cl_lab.methods.regularization import EWC, MAS, SI, output_sensitivity


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    return models.MLP(10, (8,), 3), torch.randn(40, 10), torch.randint(0, 3, (40,))


def test_ewc_penalty_zero_at_anchor_and_positive_away():
    model, x, y = _model_and_data()
    ewc = EWC(lam=10.0, fisher="empirical")
    ewc.consolidate(model, x, y)
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        model.head.weight.add_(0.1)
    assert ewc.penalty(model).item() > 0


def test_online_ewc_uses_schwarz_running_sum_and_constant_memory():
    model, x, y = _model_and_data()
    online, per_task = EWC(fisher="exact", mode="online", gamma=0.5), EWC(fisher="exact")
    f1 = online.estimate(model, x)
    for ewc in (online, per_task):
        ewc.consolidate(model, x)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    f2 = online.estimate(model, x)
    for ewc in (online, per_task):
        ewc.consolidate(model, x)
    assert torch.allclose(online.fishers[0]["head.bias"], 0.5 * f1["head.bias"] + f2["head.bias"])
    assert per_task.stored_floats() == 2 * online.stored_floats()


def test_si_path_integral_equals_loss_decrease_on_quadratic():
    torch.manual_seed(0)
    h = torch.diag(torch.tensor([1.0, 3.0, 0.5]))
    target = torch.tensor([1.0, -2.0, 0.5])
    model = nn.Linear(3, 1, bias=False)

    def loss_fn():
        d = model.weight[0] - target
        return 0.5 * d @ h @ d

    si = SI(c=0.0)
    si.begin_task(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    start = loss_fn().item()
    for _ in range(3000):
        opt.zero_grad()
        loss_fn().backward()
        si.record_gradient(model)
        opt.step()
        si.record_step(model)
    decrease = start - loss_fn().item()
    assert si.omega["weight"].sum().item() == pytest.approx(decrease, rel=2e-3)


def test_penalty_gradients_applied_in_before_step_equal_autograd():
    model, x, y = _model_and_data()
    si, ewc, mas = SI(c=5.0), EWC(lam=3.0, fisher="empirical"), MAS(lam=2.0)
    si.begin_task(model)
    si.consolidate(model)
    ewc.consolidate(model, x, y)
    with torch.no_grad():
        model.head.weight.add_(0.3)
    ewc.consolidate(model, x, y)  # two tasks: the merged update must equal the per-task sum
    mas.consolidate(model, x)
    with torch.no_grad():
        model.head.weight.add_(-0.5)
        model.features[0].bias.add_(0.2)
    for method in (si, ewc, mas):
        model.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + method.penalty(model)).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        task_grad = model.head.weight.grad.clone()
        if isinstance(method, SI):
            method.record_gradient(model)
            assert torch.allclose(method._grads[-2], task_grad)  # ω uses the task-loss gradient
        else:
            method.before_step(type("Ctx", (), {"model": model})())
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], atol=1e-6), (type(method).__name__, n)


def test_mas_needs_no_labels_and_matches_a_loop():
    model, x, _ = _model_and_data()
    batched = output_sensitivity(model, x)
    params = dict(model.named_parameters())
    loop = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(len(x)):
        grads = torch.autograd.grad(model(x[b:b + 1]).pow(2).sum(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            loop[n] += g.abs() / len(x)
    for n in loop:
        assert torch.allclose(batched[n], loop[n], rtol=1e-5, atol=1e-7)
    mas = MAS(lam=1.0)
    mas.consolidate(model, x)  # no labels anywhere
    assert mas.penalty(model).item() == 0.0


def test_methods_train_in_the_loop():
    stream = data.split_mnist(5, "task", n_train=100)
    for method in (EWC(lam=100.0, n_samples=50), SI(c=0.5), MAS(lam=1.0, n_samples=50)):
        run = train.fit(models.MLP(784, (16,), stream.n_out), stream, method, steps=3, batch_size=16,
                        progress=False)
        assert run.R.shape == (5, 5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lam must be ≥ 0"):
        EWC(lam=-1.0)
    with pytest.raises(ValueError, match="fisher must be one of 'exact', 'sampled', 'empirical', 'predicted'"):
        EWC(fisher="true")
    with pytest.raises(ValueError, match="c must be ≥ 0"):
        SI(c=-0.1)
    with pytest.raises(ValueError, match="xi must be > 0"):
        SI(xi=0.0)
    with pytest.raises(ValueError, match="lam must be ≥ 0"):
        MAS(lam=-2.0)
    model, x, y = _model_and_data()
    for method in (EWC(), SI(), MAS()):
        with pytest.raises(ValueError, match="consolidated"):
            method.penalty(model)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="model must have trainable parameters"):
        EWC().consolidate(frozen, torch.randn(4, 3))
    with pytest.raises(ValueError, match="model must have trainable parameters"):
        SI().begin_task(frozen)
