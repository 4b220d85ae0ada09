"""EWC, SI and MAS: each penalty, gradient and importance against a hand computation, the online recursion, the
seeded Fisher sample, the penalty holding the weights in the training loop, argument errors."""

import copy

import pytest
import torch
from torch import nn

from cl_lab import data, fisher, models, train
from cl_lab.data.streams import Stream, Task
from cl_lab.methods.regularization import EWC, MAS, SI, _quadratic, output_sensitivity


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    return models.MLP(10, (8,), 3), torch.randn(40, 10), torch.randint(0, 3, (40,))


def _line(weight, bias):
    """nn.Linear(2, 1) with the given weights [2] and bias [1]."""
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.copy_(torch.tensor(bias))
    return layer


class _Ctx:
    def __init__(self, model):
        self.model = model


# ---------------------------------------------------------------- EWC
def test_ewc_penalty_and_its_gradient_equal_the_hand_computation():
    layer = _line([1.0, -2.0], [0.5])
    ewc = EWC(lam=4.0)
    ewc.fishers = [{"weight": torch.tensor([[3.0, 0.5]]), "bias": torch.tensor([2.0])},
                   {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([0.0])}]
    ewc.anchors = [{"weight": torch.tensor([[0.0, -1.0]]), "bias": torch.tensor([0.0])},
                   {"weight": torch.tensor([[2.0, 7.0]]), "bias": torch.tensor([9.0])}]
    # (λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²: task 1 gives 3·1² + 0.5·(−1)² + 2·0.5² = 4, task 2 gives 1·(−1)² = 1
    assert ewc.penalty(layer).item() == pytest.approx(0.5 * 4.0 * (4.0 + 1.0))
    layer.zero_grad()
    ewc.before_step(_Ctx(layer))  # adds λ Σ_k F_k (θ − θ*_k) to p.grad
    assert torch.allclose(layer.weight.grad, torch.tensor([[4.0 * (3.0 * 1.0 + 1.0 * -1.0), 4.0 * 0.5 * -1.0]]))
    assert torch.allclose(layer.bias.grad, torch.tensor([4.0 * 2.0 * 0.5]))


def test_ewc_consolidates_the_fisher_of_the_data_and_the_current_weights():
    model, x, y = _model_and_data()
    ewc = EWC(fisher="empirical")
    ewc.consolidate(model, x, y)
    expected = fisher.fisher_diagonal(model, x, y, estimate="empirical")
    for n, p in model.named_parameters():
        assert torch.equal(ewc.fishers[0][n], expected[n])
        assert torch.equal(ewc.anchors[0][n], p.detach())
        assert ewc.anchors[0][n].data_ptr() != p.data_ptr()  # a copy: training on must not move the anchor
    assert ewc.penalty(model).item() == 0.0


def test_online_ewc_follows_the_gamma_recursion_and_keeps_the_latest_anchor():
    model, x, y = _model_and_data()
    online, per_task = EWC(mode="online", gamma=0.5), EWC()
    fishers = []
    for shift in (0.0, 1.0, -0.7):
        with torch.no_grad():
            model.head.bias.add_(shift)
        fishers.append(online.estimate(model, x))
        for ewc in (online, per_task):
            ewc.consolidate(model, x)
    # F̃ ← γF̃ + F_k (Schwarz et al. 2018): γ²F₁ + γF₂ + F₃
    for n in fishers[0]:
        assert torch.allclose(online.fishers[0][n], 0.25 * fishers[0][n] + 0.5 * fishers[1][n] + fishers[2][n])
        assert torch.equal(online.anchors[0][n], dict(model.named_parameters())[n].detach())
    assert (len(online.fishers), len(online.anchors), len(per_task.fishers)) == (1, 1, 3)
    assert per_task.stored_floats() == 3 * online.stored_floats()


def test_online_ewc_at_gamma_one_has_the_per_task_curvature():
    model, x, _ = _model_and_data()
    online, per_task = EWC(lam=2.0, mode="online", gamma=1.0), EWC(lam=2.0)
    for shift in (0.0, 0.4):
        with torch.no_grad():
            model.head.weight.add_(shift)
        for ewc in (online, per_task):
            ewc.consolidate(model, x)
    curvature_online, _ = online._merged()
    curvature_per_task, _ = per_task._merged()
    for n in curvature_online:
        assert torch.allclose(curvature_online[n], curvature_per_task[n])


def test_ewc_in_the_loop_draws_a_seeded_random_fisher_sample_not_the_sorted_prefix():
    stream = data.split(data.load("digits"), 2, "domain", n_train=200)
    first = stream.tasks[0]
    order = torch.argsort(first.y_train, stable=True)  # store task 1 sorted by label, as raw files often are
    sorted_task = Task(0, first.name, first.x_train[order], first.y_train[order], first.x_test, first.y_test,
                       first.classes)
    one = Stream(stream.name, "domain", [sorted_task], stream.n_out, stream.input_shape)
    torch.manual_seed(0)
    model = models.MLP(one.input_dim, (16,), one.n_out)
    ewc, mas = EWC(lam=1.0, n_samples=60), MAS(lam=1.0, n_samples=60)
    train.fit(model, one, [ewc, mas], steps=5, progress=False)
    x, y, _ = sorted_task.sample(60, seed=sorted_task.id)
    assert len(y.unique()) == len(first.classes)  # the draw holds every class; the prefix holds one or two
    random_fisher = fisher.flatten(fisher.fisher_diagonal(model, x, y))
    prefix_fisher = fisher.flatten(fisher.fisher_diagonal(model, sorted_task.x_train[:60], sorted_task.y_train[:60]))
    assert torch.allclose(fisher.flatten(ewc.fishers[0]), random_fisher)
    assert not torch.allclose(fisher.flatten(ewc.fishers[0]), prefix_fisher)
    assert torch.allclose(fisher.flatten(mas.importance), fisher.flatten(output_sensitivity(model, x)))


# ---------------------------------------------------------------- SI
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


def test_si_omega_uses_the_step_the_optimizer_took_and_omega_is_normalised_at_the_end():
    layer = _line([0.0, 0.0], [0.0])
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    si = SI(c=0.0, xi=0.5)
    si.begin_task(layer)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    opt.zero_grad()
    ((layer(x) - y) ** 2).sum().backward()  # g = 2(θ·x − y)·x = (−6, −12) for the weight, −6 for the bias
    si.record_gradient(layer)
    opt.step()  # Adam's first step moves every parameter by lr·sign(−g) (up to its ε)
    si.record_step(layer)
    assert torch.allclose(si.omega["weight"], torch.tensor([[0.6, 1.2]]), rtol=1e-5)  # −g·Δθ = lr·|g|
    assert torch.allclose(si.omega["bias"], torch.tensor([0.6]), rtol=1e-5)
    si.consolidate(layer)
    # Ω = ω / (Δ² + ξ) with Δ = 0.1 for every parameter
    assert torch.allclose(si.importance["weight"], torch.tensor([[0.6, 1.2]]) / (0.01 + 0.5), rtol=1e-4)
    assert torch.equal(si.anchor["weight"], layer.weight.detach())
    first = copy.deepcopy(si.importance)
    si.begin_task(layer)
    si.consolidate(layer)  # a task with no steps adds nothing: Ω sums over tasks
    assert torch.equal(si.importance["weight"], first["weight"])


# ---------------------------------------------------------------- MAS
def test_mas_importance_on_a_hand_made_linear_net():
    layer = _line([1.0, -1.0], [0.5])
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    # f(x) = w·x + b: 1.5 and −2.5. ∂f²/∂w = 2f·x, ∂f²/∂b = 2f; MAS takes the mean of the absolute values
    importance = output_sensitivity(layer, x)
    assert torch.allclose(importance["weight"], torch.tensor([[(6.0 + 0.0) / 2, (3.0 + 15.0) / 2]]))
    assert torch.allclose(importance["bias"], torch.tensor([(3.0 + 5.0) / 2]))


def test_mas_output_mask_keeps_only_the_task_outputs():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        layer.bias.zero_()
    x = torch.tensor([[1.0, 2.0]])
    importance = output_sensitivity(layer, x, output_mask=torch.tensor([[True, False]]))
    assert torch.allclose(importance["weight"], torch.tensor([[2.0, 4.0], [0.0, 0.0]]))  # |2 f₀ x|, output 1 off


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


# ---------------------------------------------------------------- all three
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
            method.before_step(_Ctx(model))
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], atol=1e-6), (type(method).__name__, n)


@pytest.mark.parametrize("make", [lambda s: EWC(lam=1e4 * s, n_samples=200), lambda s: SI(c=100.0 * s),
                                  lambda s: MAS(lam=100.0 * s, n_samples=200)], ids=["EWC", "SI", "MAS"])
def test_in_the_loop_the_penalty_holds_the_weights_near_the_task_1_anchor(make):
    stream = data.split(data.load("digits"), 2, "domain", n_train=300)
    first, second = (Stream(stream.name, "domain", tasks, stream.n_out, stream.input_shape, eval_tasks=stream.tasks)
                     for tasks in (stream.tasks[:1], stream.tasks[1:]))
    moved = {}
    for strength in (0.0, 1.0):
        torch.manual_seed(0)
        model, method = models.MLP(stream.input_dim, (32,), stream.n_out), make(strength)
        train.fit(model, first, method, steps=30, progress=False)
        importance = copy.deepcopy(method.fishers[0] if isinstance(method, EWC) else method.importance)
        anchor = copy.deepcopy(method.anchors[0] if isinstance(method, EWC) else method.anchor)
        train.fit(model, second, method, steps=30, progress=False)
        moved[strength] = _quadratic(model, importance, anchor).item()  # Σ Ω (θ − θ*)² after task 2
    assert moved[1.0] < 0.1 * moved[0.0]


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
