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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000), st.sampled_from([0.0, 0.5]))
def test_gem_projection_meets_the_kkt_conditions_of_its_qp(k, seed, margin):
    """g̃ = g + Gᵀv is the QP's minimiser iff v ≥ margin, Gg̃ ≥ 0 (primal feasible for margin 0) and
    (v − margin)·Gg̃ = 0 (complementary slackness; the dual's gradient is Gg̃ + eps·v)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(k, 12, generator=gen, dtype=torch.float64)  # [K, P], full row rank
    g = torch.randn(12, generator=gen, dtype=torch.float64)
    g_tilde = gem_project(g, G, margin=margin, eps=0.0)
    v = torch.linalg.lstsq(G.T, (g_tilde - g)[:, None]).solution[:, 0]  # the multipliers [K]
    assert torch.allclose(G.T @ v, g_tilde - g, atol=1e-9)  # the step stays in the span of the g_k
    assert (v >= margin - 1e-9).all()
    assert (G @ g_tilde >= -1e-9).all()  # every old task: ⟨g̃, g_k⟩ ≥ 0
    assert torch.allclose((v - margin) * (G @ g_tilde), torch.zeros(k, dtype=torch.float64), atol=1e-8)
    if margin == 0 and (G @ g >= 0).all():
        assert torch.allclose(g_tilde, g, atol=1e-12)  # nothing to fix: g is its own projection


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, 7, elements=st.floats(-10, 10)), arrays(np.float64, 7, elements=st.floats(-10, 10)))
def test_agem_is_gem_with_one_constraint_and_the_closed_form(g, g_ref):
    g, g_ref = torch.from_numpy(g), torch.from_numpy(g_ref)
    if g_ref.norm() < 1e-3:
        return
    g_tilde = agem_project(g, g_ref)
    dot = float(g @ g_ref)
    expected = g if dot >= 0 else g - dot / float(g_ref @ g_ref) * g_ref  # A-GEM eq. 11, written out
    assert torch.allclose(g_tilde, expected, rtol=1e-12, atol=1e-12)
    scale = float(g.norm() * g_ref.norm()) + 1.0
    assert torch.allclose(g_tilde, gem_project(g, g_ref[None], margin=0.0, eps=0.0), atol=1e-8 * scale)


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
    table = widget.result["table"]
    assert widget.result["memory_per_task"] == 16 and list(table.method) == ["GEM", "A-GEM"]
    ax = widget.figures[-1].axes[0]
    acc, bwt = ([p.get_height() for p in bars] for bars in ax.containers)
    assert acc == pytest.approx(table.ACC.tolist()) and bwt == pytest.approx(table.BWT.tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GEM", "A-GEM"]
    assert ax.get_title() == "16 memories per task"


def test_step_cost_remeasures_while_a_bound_is_missed_and_keeps_the_fastest(capsys):
    from cl_lab.chapters import ch05

    table = ch05.step_cost([1], memory_per_task=10, repeats=2, remeasure_above={"GEM": 0.0}, max_rounds=3)
    assert capsys.readouterr().out.count("measuring again") == 2  # an unmeetable bound: every round, then give up
    assert set(table.method) == {"naive", "ER", "A-GEM", "GEM", "GEM (10 memories per task per step)"}
    assert (table[table.method == "naive"]["ratio to naive"] == 1.0).all()
    ch05.step_cost([1], memory_per_task=10, repeats=2, remeasure_above={"GEM": 1e9})
    assert "measuring again" not in capsys.readouterr().out


def test_step_cost_counts_the_samples_each_step_sends_through_the_network():
    from cl_lab.chapters import ch05

    table = ch05.step_cost([1, 3], memory_per_task=24, batch_size=10, repeats=1)
    samples = table.pivot(index="K", columns="method", values="samples per step")
    assert samples.loc[1].to_dict() == {"naive": 10, "ER": 10, "A-GEM": 20, "GEM": 10 + 24,
                                        "GEM (10 memories per task per step)": 10 + 10}
    assert samples.loc[3].to_dict() == {"naive": 10, "ER": 10, "A-GEM": 20, "GEM": 10 + 3 * 24,
                                        "GEM (10 memories per task per step)": 10 + 3 * 10}
    ax = ch05.plot_step_cost(table).axes[0]  # one line per method: its seconds ratio against K
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == set(table.method) and ax.get_xlabel() == "old tasks in memory K"
    gem = table[table.method == "GEM"]
    assert list(lines["GEM"].get_xdata()) == [1, 3]
    assert lines["GEM"].get_ydata() == pytest.approx(gem["ratio to naive"].tolist())


def test_agem_holds_its_memory_once_and_draws_g_ref_from_every_task():
    stream = data.permuted_mnist(3, n_train=60)
    method = AGEM(memory_per_task=20, seed=1)
    train.fit(models.MLP(784, (8,), 10), stream, method, steps=3, batch_size=10, optimizer="sgd", lr=0.1,
              progress=False)
    union_x = method._union[0]
    assert len(method.memories) == 3 and len(union_x) == 60
    for k, (x, _y, t) in enumerate(method.memories):
        assert x.untyped_storage().data_ptr() == union_x.untyped_storage().data_ptr()  # a view, not a copy
        assert torch.equal(x, union_x[20 * k:20 * (k + 1)]) and (t == k).all()
    drawn = torch.cat([method.reference_batch(30)[2] for _ in range(20)])
    assert set(drawn.tolist()) == {0, 1, 2} and len(method.reference_batch(30)[1]) == 30


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
    return [t.sample(per_group, seed=t.id) for t in stream.tasks[:3]]


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
