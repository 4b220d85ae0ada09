"""GEM's QP and A-GEM's closed-form projection: properties, an independent solve, the methods in the loop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import minimize

from cl_lab import data, models, train
from cl_lab.methods.base import Context
from cl_lab.methods.projection import AGEM, GEM, agem_project, gem_project, grouped_gradients, memory_gradient

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, 6, elements=finite), arrays(np.float32, 6, elements=finite))
def test_agem_projection_satisfies_its_constraint(g, g_ref):
    g, g_ref = torch.from_numpy(g).double(), torch.from_numpy(g_ref).double()
    g_tilde = agem_project(g, g_ref)
    scale = (g.norm() * g_ref.norm()).item() + 1e-12
    assert torch.dot(g_tilde, g_ref) >= -1e-9 * scale
    if torch.dot(g, g_ref) >= 0:
        assert torch.equal(g_tilde, g)  # no conflict: untouched
    else:
        assert torch.dot(g_tilde, g_ref) == pytest.approx(0, abs=1e-9 * scale)  # lands on the boundary


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000))
def test_gem_solution_satisfies_every_constraint_and_matches_scipy(k, seed):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, 8, generator=gen, dtype=torch.float64)  # [K, P]
    g = torch.randn(8, generator=gen, dtype=torch.float64)
    g_tilde = gem_project(g, G, margin=0.0, eps=1e-10)
    assert (G @ g_tilde >= -1e-6).all()
    # independent primal solve: min ½‖v − g‖² s.t. G v ≥ 0
    res = minimize(lambda v: 0.5 * np.sum((v - g.numpy()) ** 2), g.numpy(), jac=lambda v: v - g.numpy(),
                   constraints=[{"type": "ineq", "fun": lambda v: G.numpy() @ v, "jac": lambda v: G.numpy()}],
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    assert np.allclose(g_tilde.numpy(), res.x, atol=1e-4)


def test_gem_margin_pushes_towards_old_gradients():
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    g = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    plain = gem_project(g, G, margin=0.0, eps=0.0)
    strong = gem_project(g, G, margin=0.5, eps=0.0)
    assert torch.allclose(plain, torch.tensor([0.0, 2.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(strong, torch.tensor([0.0, 2.5], dtype=torch.float64), atol=1e-9)  # v = (1, 0.5)
    assert (G @ strong >= G @ plain - 1e-9).all()


def test_gem_rejects_negative_margin():
    with pytest.raises(ValueError, match="margin"):
        GEM(memory_per_task=10, margin=-0.1)
    with pytest.raises(ValueError, match="memory_per_task"):
        AGEM(memory_per_task=0)


def test_memory_larger_than_the_task_is_a_clear_error():
    stream = data.split_mnist(5, "task", n_train=50)
    with pytest.raises(ValueError, match="memory_per_task must be ≤ the 50 samples"):
        train.fit(models.MLP(784, (8,), 10), stream, GEM(memory_per_task=80), steps=2, batch_size=10)


@pytest.mark.parametrize("method_cls", [GEM, AGEM])
def test_audit_records_every_old_task(method_cls):
    stream = data.permuted_mnist(3, n_train=100)
    extra = {"eps": 1e-8} if method_cls is GEM else {}  # a tiny ridge: constraints hold to solver precision
    method = method_cls(memory_per_task=20, audit=True, **extra)
    train.fit(models.MLP(784, (16,), 10), stream, method, steps=6, batch_size=10, optimizer="sgd", lr=0.1)
    table = method.audit_table()
    assert len(table) == 6 * 1 + 6 * 2  # task 2 has one old task, task 3 two
    if method_cls is GEM:
        assert (table.dot_after >= -1e-6 * table.dot_before.abs().max()).all()
    unfired = table[~table.fired]
    assert np.allclose(unfired.dot_before, unfired.dot_after)


def test_chapter05_playground_widget_headless(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets
    from cl_lab.chapters import ch05

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    widget = widgets.sweep(ch05.playground, ch05.plot_playground, fixed={"seed": 0, "n_train": 60},
                           memory_per_task=w.SelectionSlider(options=[4, 16], value=4))
    widget.children[0].value = 16
    assert widget.result["memory_per_task"] == 16
    assert list(widget.result["table"].method) == ["GEM", "A-GEM"] and len(widget.figures) >= 1


def test_step_cost_remeasures_while_a_bound_is_missed_and_keeps_the_fastest(capsys):
    from cl_lab.chapters import ch05

    table = ch05.step_cost([1], memory_per_task=10, repeats=2, remeasure_above={"GEM": 0.0}, max_rounds=3)
    assert capsys.readouterr().out.count("measuring again") == 2  # an unmeetable bound: every round, then give up
    assert set(table.method) == {"naive", "A-GEM", "GEM", "GEM (10 memories per task per step)"}
    assert (table[table.method == "naive"]["ratio to naive"] == 1.0).all()
    ch05.step_cost([1], memory_per_task=10, repeats=2, remeasure_above={"GEM": 1e9})
    assert "measuring again" not in capsys.readouterr().out


def test_step_cost_rejects_an_unknown_bound_name():
    from cl_lab.chapters import ch05

    with pytest.raises(ValueError, match="remeasure_above.*allowed"):
        ch05.step_cost([1], memory_per_task=10, repeats=1, remeasure_above={"GEMM": 2.0})


def test_geometry_plot_returns_both_projections():
    from cl_lab.chapters import ch05

    g = torch.tensor([-1.6, -0.4], dtype=torch.float64)
    G = torch.tensor([[1.0, 0.3], [-0.3, 1.0]], dtype=torch.float64)
    _, gem, agem = ch05.plot_geometry(g, G)
    assert (G @ gem >= -1e-9).all() and float(G[0] @ agem) < 0


def _groups(stream, per_group):
    return [(t.x_train[:per_group], t.y_train[:per_group], t.t_train[:per_group]) for t in stream.tasks[:3]]


@pytest.mark.parametrize("model", [models.MLP(784, (16, 8), 10), models.SmallCNN(channels=(2, 4))],
                         ids=["mlp", "cnn"])
def test_grouped_gradients_equal_one_pass_per_group(model):
    stream = data.split_mnist(5, "task", n_train=40)  # Task-IL: the masks differ per group
    ctx = Context(model, stream, stream.tasks[3], 3, 0, 0, torch.optim.SGD(model.parameters(), lr=0.1),
                  torch.device("cpu"), 10, torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = _groups(stream, 12)
    grouped = grouped_gradients(ctx, params, groups)  # [K, P]
    if isinstance(model, models.SmallCNN):
        assert grouped is None  # conv layers: GEM falls back to one pass per task
        return
    looped = torch.stack([memory_gradient(ctx, params, *g) for g in groups])  # [K, P]
    assert torch.allclose(grouped, looped, rtol=1e-5, atol=1e-7)
    assert grouped_gradients(ctx, params, groups[:2] + [tuple(v[:5] for v in groups[2])]) is None  # unequal
