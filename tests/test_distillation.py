"""LwF: the distillation loss against a hand computation (value, gradient, invariances), the frozen teacher and
the heads it distils, the constraint holding the outputs in the training loop, and its errors."""

import math

import pytest
import torch

from cl_lab import data, models, train
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Context
from cl_lab.methods.distillation import LwF, distillation_loss


def test_distillation_loss_is_t_squared_kl_by_hand():
    old, new, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 2.0
    p = torch.softmax(old / t, 1)[0].tolist()  # softmax(1, 0)
    q = torch.softmax(new / t, 1)[0].tolist()  # softmax(0, 1)
    by_hand = t ** 2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert distillation_loss(new, old, t).item() == pytest.approx(by_hand, rel=1e-6)
    # in closed form KL(softmax(1, 0) ‖ softmax(0, 1)) = (2σ(1) − 1)·log(σ(1) / (1 − σ(1))) = 2σ(1) − 1
    assert by_hand == pytest.approx(t ** 2 * (2 * torch.sigmoid(torch.tensor(1.0)).item() - 1), rel=1e-6)


def test_distillation_loss_averages_over_the_batch_and_is_asymmetric():
    old, new = torch.randn(6, 4), torch.randn(6, 4)
    per_sample = [distillation_loss(new[i:i + 1], old[i:i + 1], 3.0).item() for i in range(6)]
    assert distillation_loss(new, old, 3.0).item() == pytest.approx(sum(per_sample) / 6, rel=1e-5)
    assert distillation_loss(new, old, 3.0).item() != pytest.approx(distillation_loss(old, new, 3.0).item(), rel=1e-3)


def test_distillation_zero_when_outputs_agree_up_to_a_shift_and_positive_otherwise():
    z = torch.randn(5, 4)
    assert distillation_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(z + 3.0, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    assert distillation_loss(z + torch.randn(5, 4), z, 2.0).item() > 0


def test_distillation_gradient_is_t_times_the_soft_probability_gap():
    old, t = torch.randn(3, 5), 4.0
    new = torch.randn(3, 5, requires_grad=True)
    (g,) = torch.autograd.grad(distillation_loss(new, old, t), new)
    by_hand = t * (torch.softmax(new.detach() / t, 1) - torch.softmax(old / t, 1)) / len(old)
    assert torch.allclose(g, by_hand, atol=1e-6)


def test_distillation_gradient_scale_independent_of_high_temperature():
    old = torch.randn(64, 4)
    new = (old + 0.01 * torch.randn(64, 4)).requires_grad_(True)
    grads = []
    for temperature in (4.0, 8.0):
        (g,) = torch.autograd.grad(distillation_loss(new, old, temperature), new)
        grads.append(g.norm().item())
    assert grads[1] == pytest.approx(grads[0], rel=0.1)  # the T² factor cancels the 1/T² of soft targets


def _end_of_task(lwf, model, stream, index):
    lwf.on_task_end(Context(model, stream, stream.tasks[index], index, 0, 0, None, torch.device("cpu"), 8, None))


@pytest.mark.parametrize("scenario, heads", [("task", [(0, 1), (2, 3)]), ("class", [(0, 1, 2, 3)])])
def test_lwf_keeps_a_frozen_teacher_and_distils_each_old_head(scenario, heads):
    stream = data.split(data.load("digits"), 5, scenario, n_train=20)
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, (8,), stream.n_out)
    lwf = LwF(alpha=2.0, temperature=3.0)
    _end_of_task(lwf, model, stream, 1)
    assert lwf.heads == heads
    assert not any(p.requires_grad for p in lwf.old_model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the student moves; the teacher must not
    x = stream.tasks[2].x_train[:6]
    old, new = lwf.old_model(x), model(x)
    by_hand = 2.0 * sum(distillation_loss(new[:, list(h)], old[:, list(h)], 3.0) for h in heads) / len(heads)
    assert lwf.penalty(model, x).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert lwf.penalty(lwf.old_model, x).item() == pytest.approx(0.0, abs=1e-6)


def test_lwf_in_the_loop_holds_the_outputs_on_the_new_inputs():
    stream = data.split(data.load("digits"), 2, "domain", n_train=300)
    first, second = (Stream(stream.name, "domain", tasks, stream.n_out, stream.input_shape, eval_tasks=stream.tasks)
                     for tasks in (stream.tasks[:1], stream.tasks[1:]))
    drift = {}
    for alpha in (0.0, 100.0):
        torch.manual_seed(0)
        model, lwf = models.MLP(stream.input_dim, (32,), stream.n_out), LwF(alpha=alpha)
        train.fit(model, first, lwf, steps=30, progress=False)
        teacher = lwf.old_model
        train.fit(model, second, lwf, steps=30, progress=False)
        x = stream.tasks[1].x_test
        drift[alpha] = distillation_loss(model(x), teacher(x), 1.0).item()  # KL(teacher ‖ student) on task-2 inputs
    assert drift[100.0] < 0.25 * drift[0.0]


def test_lwf_errors():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LwF(temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be ≥ 0"):
        LwF(alpha=-1.0)
    with pytest.raises(ValueError, match="consolidated"):
        LwF().penalty(models.MLP(4, (3,), 2), torch.randn(2, 4))
