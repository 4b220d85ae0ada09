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
from cl_lab.methods.base import Method
from cl_lab.methods.isolation import FREE, PackNet, ProgNN, ProgressiveNet, prognn_parameter_count
from cl_lab.methods.lora import lora_parameter_count
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


class _TaskEndSnapshots(Method):
    """After the method before it in the list: every parameter and PackNet's owner map at each task end."""

    def __init__(self, packnet: PackNet) -> None:
        self.packnet, self.params, self.owners = packnet, [], []

    def on_task_end(self, ctx) -> None:
        self.params.append({n: p.detach().clone() for n, p in ctx.model.named_parameters()})
        self.owners.append({n: o.clone() for n, o in self.packnet.owner.items()})


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


def test_packnet_freezes_each_tasks_weights_and_owners_bit_exactly(stream):
    """Once task j ends, the weights it owns, its owner entries and the hidden biases (task 0's) never change
    again, and a later task owns only weights that were free when it started."""
    method = PackNet(prune_ratio=0.5, retrain_steps=5)
    snapshots = _TaskEndSnapshots(method)
    model = models.MLP(stream.input_dim, (16, 16), stream.n_out)
    train.fit(model, stream, [method, snapshots], steps=15, batch_size=32, optimizer="sgd", lr=0.5, progress=False)
    for j, (params_j, owners_j) in enumerate(zip(snapshots.params, snapshots.owners, strict=True)):
        for later_params, later_owners in zip(snapshots.params[j + 1:], snapshots.owners[j + 1:], strict=True):
            for name, owner in owners_j.items():
                kept = owner == j
                assert torch.equal(later_owners[name][kept], owner[kept])  # the mask of task j is frozen
                assert torch.equal(later_params[name][kept], params_j[name][kept])  # and so are its weights
                newly = (later_owners[name] > j) & (later_owners[name] != FREE)
                assert not (newly & (owner != FREE) & (owner <= j)).any()  # taken only from free weights
            for name in params_j:
                if name.startswith("features") and name.endswith("bias"):
                    assert torch.equal(later_params[name], params_j[name])
    assert method._trainable == {} and method._snapshot == {}  # between tasks only the owner map is kept


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


def test_parameter_growth_counts_built_models_and_agrees_with_the_closed_forms():
    table = ch06.parameter_growth(n_tasks=4, in_dim=20, hidden=(6, 5), n_out=3, prune_ratio=0.5, rank=2)
    for k, row in zip(range(1, 5), table.itertuples(index=False), strict=True):
        assert row[1] == prognn_parameter_count(20, (6, 5), 3, k, lateral=True)
        assert row[2] == prognn_parameter_count(20, (6, 5), 3, k, lateral=False)
        assert row[3] == count_parameters(models.MLP(20, (6, 5), 3))
        assert row[5] == row[3] + k * lora_parameter_count([20, 6, 5, 3], 2)
    assert table["PackNet free share"].tolist() == [0.5, 0.25, 0.125, 0.0625]


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


def test_prune_ratio_point_and_its_figure():
    result = ch06.prune_ratio_point(0.5, n_tasks=2, steps=5, retrain_steps=2, hidden=(16,))
    assert result["just_learned"].shape == (2,) and result["final"].shape == (2,)
    assert result["trainable_share"] == pytest.approx([1.0, 0.5], abs=0.01)  # read from the owner map
    assert result["free_left"] == pytest.approx(0.25, abs=0.01)
    fig = ch06.plot_prune_ratio(result)
    ax = fig.axes[0]
    bars = [[p.get_height() for p in container] for container in ax.containers]
    assert bars == [pytest.approx(result["just_learned"]), pytest.approx(result["final"])]
    assert [c.get_label() for c in ax.containers] == ["just learned", "after the last task"]
    (share,) = ax.lines
    assert list(share.get_xdata()) == [1, 2] and share.get_ydata() == pytest.approx(result["trainable_share"])
    assert ax.get_xlabel() == "task" and ax.get_ylim() == (0, 1.05)
    assert "prune ratio 0.50" in ax.get_title() and "25.0% weights free" in ax.get_title()
    with pytest.raises(ValueError, match="prune_ratio"):
        ch06.prune_ratio_point(1.0)


def test_parameter_growth_figure_draws_every_count_and_the_free_share():
    table = ch06.parameter_growth(n_tasks=3, prune_ratio=0.5)
    fig = ch06.plot_parameter_growth(table)
    counts, free = fig.axes
    assert [line.get_label() for line in counts.lines] == ["ProgNN", "independent columns", "PackNet",
                                                          "MLP + LoRA r=4"]
    assert counts.lines[0].get_ydata() == pytest.approx(table["ProgNN"] / 1e6)
    assert free.get_yscale() == "log" and free.lines[0].get_ydata() == pytest.approx([0.5, 0.25, 0.125])


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
    first_share = len(stream.tasks[0].y_test) / sum(len(task.y_test) for task in stream.tasks)
    assert table.loc["true task id (Task-IL)", "sent to task 1"] == pytest.approx(first_share)
    assert table.loc["most confident head", "sent to task 1"] == pytest.approx(first_share)


def test_class_mean_router_returns_the_owner_of_the_nearest_class_mean(stream):
    means = [(task.id, task.x_train[task.y_train == c].mean(0)) for task in stream.tasks for c in task.classes]
    routed = ch06.route_by_class_means(stream, torch.stack([m for _, m in means]))
    assert routed.tolist() == [owner for owner, _ in means]


P_8 = 784 * 8 + 8 + 8 * 50 + 50  # 6,730: MLP 784-8 with five 10-way heads


@pytest.mark.parametrize("name, setting, held", [
    ("naive", None, 0),
    ("EWC", 1.0, 12 * P_8),  # a Fisher and an anchor per task (10 P) + the merged pair it steps with (2 P)
    ("SI", 1.0, 7 * P_8),  # Ω, θ̃, last ω, task-start θ, the step's g and θ, the cached Ω⊙θ̃
    ("ER", 50, 50 * (784 + 1 + 1)),  # x, y, t of 50 samples
    ("A-GEM", 10, 5 * 10 * (784 + 1 + 1)),  # 10 per task, held once (per-task memories are views)
    ("PackNet", 0.5, 784 * 8)])  # one owner id per hidden weight; no training state between tasks
def test_family_point_measures_what_each_method_holds(name, setting, held):
    point = ch06.family_point(name, setting, steps=2, hidden=(8,))
    assert point["held / network"] * P_8 == pytest.approx(held)
    assert point["keeps raw data"] == (name in ("ER", "A-GEM"))


def test_held_numbers_counts_each_storage_once_and_skips_excluded_tensors():
    base = torch.zeros(10, 4)
    holder = type("Holder", (), {})()  # not a cl_lab object: its attributes are not walked
    holder.x = base
    assert ch06.held_numbers(holder) == 0
    method = PackNet()
    method.owner = {"a": base, "b": base[:5], "c": [base[5:], (torch.ones(3),)]}
    assert ch06.held_numbers(method) == 40 + 3
    assert ch06.held_numbers(method, exclude=[base]) == 3


def test_family_point_prognn_holds_its_extra_columns_and_plot_draws():
    point = ch06.family_point("ProgNN", steps=2, hidden=(8,))
    extra = prognn_parameter_count(784, (8,), 50, 5) - P_8  # four more columns and their laterals
    assert point["held / network"] * P_8 == pytest.approx(extra) and point["BWT"] == 0.0
    fig = ch06.plot_three_families(pd.DataFrame([point, ch06.family_point("naive", steps=2, hidden=(8,))]))
    assert len(fig.axes[0].lines) >= 2


def test_family_point_names_the_allowed_methods():
    with pytest.raises(ValueError, match="PackNet"):
        ch06.family_point("LwF")


class _FirstColumnSnapshots(Method):
    def __init__(self) -> None:
        self.weights = []

    def on_task_end(self, ctx) -> None:
        self.weights.append(ctx.model.columns[0].layers[0].weight.detach().clone())


def test_random_first_column_control_reinitialises_column_one_once_then_freezes_it(stream):
    snapshots = _FirstColumnSnapshots()
    torch.manual_seed(0)
    net = ProgressiveNet(stream.input_dim, (8,), stream.n_out)
    train.fit(net, stream, [ch06.ProgNNRandomFirstColumn(), snapshots], steps=3, batch_size=16, progress=False)
    first, *later = snapshots.weights
    assert not torch.equal(first, later[0])  # re-initialised when task 2 started
    assert all(torch.equal(later[0], w) for w in later[1:])  # then frozen like any old column


def test_lateral_transfer_runs_three_arms_per_seed(stream):
    table = ch06.lateral_transfer(stream, seeds=(0, 1), n_few=10, hidden=(8,), steps=3)
    assert list(table.index) == [0, 1] and list(table.columns) == list(ch06.LATERAL_ARMS)
    assert ((table >= 0) & (table <= 1)).all().all()
    again = ch06.lateral_transfer(stream, seeds=(1,), n_few=10, hidden=(8,), steps=3)
    assert again.loc[1].tolist() == table.loc[1].tolist()  # each seed's runs are reproducible on their own
