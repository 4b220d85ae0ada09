"""Parameter isolation: old tasks' outputs are bit-identical after later tasks; PackNet's masks are disjoint."""

from itertools import pairwise

import matplotlib
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_lab import data, models, train
from cl_lab.chapters import ch06
from cl_lab.methods.isolation import FREE, PackNet, ProgNN, ProgressiveNet, prognn_parameter_count
from cl_lab.models import count_parameters

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def stream():
    return data.split(data.load("digits"), n_tasks=5, scenario="task", n_train=120)


def _fit_recording(model, stream, method, steps=15):
    x0 = stream.tasks[0].x_test
    recorder = ch06.OutputRecorder(method, 0, x0)
    run = train.fit(model, stream, [method, recorder], steps=steps, batch_size=32, progress=False)
    return run, recorder.outputs


def test_prognn_old_outputs_are_bit_identical(stream):
    method = ProgNN()
    model = ProgressiveNet(stream.input_dim, (16, 16), stream.n_out)
    run, outputs = _fit_recording(model, stream, method)
    assert model.n_columns == len(stream)
    assert all(torch.equal(outputs[0], later) for later in outputs[1:])
    assert run.R[:, 0].min() == run.R[0, 0]


def test_packnet_old_outputs_are_bit_identical_and_masks_disjoint(stream):
    method = PackNet(prune_ratio=0.5, retrain_steps=5)
    model = models.MLP(stream.input_dim, (16, 16), stream.n_out)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run, outputs = _fit_recording(model, stream, method)
    assert all(torch.equal(outputs[0], later) for later in outputs[1:])
    for name, owner in method.owner.items():
        owned = [owner == k for k in range(len(stream))]
        for a in range(len(owned)):
            for b in range(a + 1, len(owned)):
                assert not (owned[a] & owned[b]).any()
        assert torch.all(dict(model.named_parameters())[name][owner == FREE] == 0)
    # task 0 keeps (1 - p) of every layer, task k about (1 - p)·p^k
    assert method.owned_fraction(0) == pytest.approx(0.5, abs=0.01)
    assert method.owned_fraction(1) == pytest.approx(0.25, abs=0.01)
    assert method.free_fraction() == pytest.approx(0.5 ** len(stream), abs=0.01)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_packnet_task_mask_grows_with_task_id(stream):
    method = PackNet(prune_ratio=0.5, retrain_steps=2)
    train.fit(models.MLP(stream.input_dim, (8,), stream.n_out), stream, method, steps=3, progress=False)
    name = next(iter(method.owner))
    masks = [method.task_mask(name, k) for k in range(len(stream))]
    for small, big in pairwise(masks):
        assert torch.all(big[small])  # task k's sub-network sits inside task k+1's
        assert big.sum() > small.sum()


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_prune_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="prune_ratio"):
        PackNet(prune_ratio=ratio)


def test_unseen_task_id_is_rejected(stream):
    method = PackNet(retrain_steps=1)
    model = models.MLP(stream.input_dim, (8,), stream.n_out)
    with pytest.raises(ValueError, match="task_id"):
        method.task_logits(model, stream.tasks[0].x_test, 0)  # nothing trained yet
    net = ProgressiveNet(stream.input_dim, (8,), stream.n_out)
    with pytest.raises(ValueError, match="task_id"):
        net(stream.tasks[0].x_test, task_id=3)


def test_isolation_needs_task_il():
    class_il = data.split(data.load("digits"), n_tasks=5, scenario="class", n_train=40)
    with pytest.raises(ValueError, match="scenario"):
        train.fit(ProgressiveNet(class_il.input_dim, (8,), class_il.n_out), class_il, ProgNN(), steps=1)
    with pytest.raises(ValueError, match="scenario"):
        train.fit(models.MLP(class_il.input_dim, (8,), class_il.n_out), class_il, PackNet(), steps=1)


@settings(max_examples=15, deadline=None)
@given(hidden=st.lists(st.integers(1, 6), min_size=1, max_size=3), n_tasks=st.integers(1, 4),
       lateral=st.booleans())
def test_parameter_count_formula_matches_the_built_net(hidden, n_tasks, lateral):
    net = ProgressiveNet(5, hidden, 3, lateral=lateral)
    for _ in range(n_tasks - 1):
        net.add_column()
    assert count_parameters(net, trainable_only=False) == prognn_parameter_count(5, hidden, 3, n_tasks, lateral)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100))
def test_adding_a_column_leaves_old_columns_unchanged(seed):
    torch.manual_seed(seed)
    net = ProgressiveNet(6, (5, 4), 3)
    x = torch.randn(7, 6)
    before = net(x, 0)
    net.add_column()
    net.columns[1].head.weight.data.add_(1.0)
    assert torch.equal(net(x, 0), before)
    assert not any(p.requires_grad for p in net.columns[0].parameters())


def test_prune_ratio_widget_point_and_parameter_growth():
    result = ch06.prune_ratio_point(0.5, n_tasks=2, steps=5, retrain_steps=2, hidden=(16,))
    assert result["just_learned"].shape == (2,) and 0 <= result["free_left"] <= 1
    assert ch06.plot_prune_ratio(result) is not None
    table = ch06.parameter_growth(n_tasks=4, prune_ratio=0.5)
    steps = table["independent columns"].diff().dropna()
    assert steps.nunique() == 1  # independent columns: linear growth
    assert table["ProgNN"].diff().diff().dropna().gt(0).all()  # laterals: quadratic growth
    assert table["PackNet"].nunique() == 1
    with pytest.raises(ValueError, match="prune_ratio"):
        ch06.prune_ratio_point(1.0)


def test_prune_ratio_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch06.prune_ratio_point, ch06.plot_prune_ratio,
                           fixed={"n_tasks": 2, "steps": 2, "retrain_steps": 1, "hidden": (8,)},
                           prune_ratio=w.FloatSlider(value=0.5, min=0.0, max=0.9, step=0.1))
    slider = widget.children[0]
    slider.value = 0.2
    assert widget.result["prune_ratio"] == pytest.approx(0.2)
    slider.value = 0.5
    assert widget.cache.hits == 1 and len(widget.figures) == 3


def test_task_inference_with_a_perfect_router_and_a_head_that_knows_its_task(stream):
    def oracle_logits(x, task_id):  # [N, n_out]: each task's head names the true class of its own inputs
        logits = torch.zeros(len(x), stream.n_out)
        for task in stream.tasks:
            own = (x[:, None, :] == task.x_test[None]).all(-1).any(1)  # [N]: x is one of this task's images
            labels = [task.y_test[(task.x_test == xi).all(1)][0] for xi in x[own]]
            if task.id == task_id and labels:
                logits[own, torch.stack(labels)] = 10.0
        return logits

    table = ch06.task_inference(oracle_logits, stream)
    assert table.loc["true task id (Task-IL)", "accuracy"] == 1.0
    assert table.loc["true task id (Task-IL)", "task id right"] == 1.0
    assert table.loc["most confident head", "task id right"] == 1.0  # only the right head is sure


def test_class_mean_router_returns_the_owner_of_the_nearest_class_mean(stream):
    means = [(task.id, task.x_train[task.y_train == c].mean(0)) for task in stream.tasks for c in task.classes]
    routed = ch06.route_by_class_means(stream, torch.stack([m for _, m in means]))
    assert routed.tolist() == [owner for owner, _ in means]


@pytest.mark.parametrize("name, setting, stored_per_param", [
    ("naive", None, 0), ("EWC", 1.0, 10 * 6730), ("SI", 1.0, 2 * 6730), ("ER", 50, 50 * 785),
    ("A-GEM", 10, 5 * 10 * 785), ("PackNet", 0.5, 784 * 8)])
def test_family_point_counts_what_each_method_stores(name, setting, stored_per_param):
    point = ch06.family_point(name, setting, steps=2, hidden=(8,))  # 784·8 + 8 + 8·50 + 50 = 6,730 (five 10-way heads)
    assert point["stored / network"] == pytest.approx(stored_per_param / 6730)
    assert point["keeps raw data"] == (name in ("ER", "A-GEM"))


def test_family_point_prognn_stores_its_extra_columns_and_plot_draws():
    point = ch06.family_point("ProgNN", steps=2, hidden=(8,))
    assert point["stored / network"] > 4 and point["BWT"] == 0.0
    fig = ch06.plot_three_families(pd.DataFrame([point, ch06.family_point("naive", steps=2, hidden=(8,))]))
    assert len(fig.axes[0].lines) >= 2


def test_family_point_names_the_allowed_methods():
    with pytest.raises(ValueError, match="PackNet"):
        ch06.family_point("LwF")
