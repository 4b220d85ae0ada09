"""Chapter 16's helpers on the SMOKE lab: orders trained with shared prefixes (and equal to each order trained alone),
the order table's bookkeeping on a hand-made R, the last task's share of the variance, prompts without labels, the
teachers' targets routed or averaged, the distillation loss, and the three routes to one model."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cl_lab import train
from cl_lab.chapters import ch09, ch10, ch16

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def stream(lab):
    return ch09.lm_stream(lab, ch09.SMOKE_TASKS, n_pretrained=30)


def test_reordered_keeps_the_evaluation_order_and_rejects_a_non_permutation(stream):
    moved = ch16.reordered(stream, (2, 0, 1))
    assert [t.name for t in moved.tasks] == [stream.tasks[k].name for k in (2, 0, 1)]
    assert [t.name for t in moved.eval_tasks] == [t.name for t in stream.eval_tasks]
    with pytest.raises(ValueError, match="order must be a permutation"):
        ch16.reordered(stream, (0, 0, 1))


def test_six_orders_cost_fifteen_task_trainings(lab, stream, monkeypatch):
    calls = []
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: calls.append(1) or fit(*a, **k))
    runs = ch16.run_orders(lab, stream, "full fine-tuning", steps=1)
    assert len(runs) == 6 and len(calls) == 15
    assert all(r.R.shape == (3, 4) for r in runs)


@pytest.mark.parametrize("setup", ch16.SETUPS)
def test_a_shared_prefix_gives_what_the_order_trained_alone_gives(lab, stream, setup):
    together = ch16.run_orders(lab, stream, setup, [(0, 1, 2), (0, 2, 1)], steps=2)
    alone = ch16.run_orders(lab, stream, setup, [(0, 2, 1)], steps=2)
    assert np.array_equal(together[0].R[0], together[1].R[0])  # the shared first task
    assert np.allclose(together[1].R, alone[0].R)


def test_order_table_reads_final_recall_forgetting_and_the_pretraining_column():
    R = np.array([[0.9, 0.2, 1.0, 0.0],   # after task 1 (column 2)
                  [0.8, 0.6, 0.5, 0.0],   # after task 0 (column 1)
                  [0.7, 0.4, 0.3, 0.9]])  # after task 2 (column 3)
    run = ch16.OrderRun("full fine-tuning", (1, 0, 2), 0, R)
    row = ch16.order_table([run], ["a", "b", "c"]).iloc[0]
    assert row["order"] == "b → a → c" and row["last task"] == "c"
    assert math.isclose(row["final mean"], (0.4 + 0.3 + 0.9) / 3)
    assert math.isclose(row["forgetting"], ((1.0 - 0.3) + (0.6 - 0.4)) / 2)  # b, then a; c is last
    assert math.isclose(row["pretraining facts"], 0.7)


def test_last_task_share_is_one_when_the_last_task_decides_and_zero_when_it_does_not():
    last = pd.Series(["a", "a", "b", "b"])
    assert math.isclose(ch16.last_task_share(pd.Series([0.1, 0.1, 0.5, 0.5]), last), 1.0)
    assert math.isclose(ch16.last_task_share(pd.Series([0.1, 0.5, 0.1, 0.5]), last), 0.0, abs_tol=1e-12)


def _run(order, seed, final):
    R = np.zeros((3, 4))
    R[-1, 1:] = final
    return ch16.OrderRun("full fine-tuning", order, seed, R)


def test_spreads_compare_the_orders_with_the_reseeds():
    finals = [0.3, 0.1, 0.6, 0.9, 0.0, 0.6]  # one per order of ch16.ORDERS: mean final 0.1, 1/30, 0.2, 0.3, 0, 0.2
    runs = [_run(o, 0, [f, 0, 0]) for o, f in zip(ch16.ORDERS, finals)] + [_run((0, 1, 2), 5, [0.45, 0, 0])]
    names = ["a", "b", "c"]
    table = ch16.order_table(runs, names)
    row = ch16.spreads(table, "a → b → c").loc[("full fine-tuning", "final mean")]
    assert row["orders"] == 6 and row["seeds"] == 2
    assert math.isclose(row["order range"], 0.3) and math.isclose(row["seed range"], 0.05)
    assert math.isclose(row["range ratio"], 6.0)
    ch16.plot_orders(table, "a → b → c")
    plt.close("all")


def test_prompts_only_carries_row_numbers_and_tasks_never_answers():
    stream = ch10.lm_setup(ch10.smoke_config(0)).stream
    union = ch16.prompts_only(stream, seed=3)
    task = union.tasks[0]
    size = max(len(t.y_train) for t in stream.tasks)
    assert len(task.y_train) == size * len(stream.tasks)
    assert torch.equal(task.y_train, torch.arange(len(task.y_train)))
    assert torch.equal(torch.bincount(task.t_train), torch.full((len(stream.tasks),), size))
    assert [t.name for t in union.eval_tasks] == [t.name for t in stream.tasks]


def _constant(logits):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits.expand(len(x), -1)
    return Fixed()


def test_teacher_targets_route_by_task_or_average():
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    x, t = torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1, 1])
    routed = ch16.teacher_targets([_constant(a), _constant(b)], x, t, temperature=2.0)
    assert torch.allclose(routed[0], F.softmax(a[0] / 2, -1)) and torch.allclose(routed[2], F.softmax(b[0] / 2, -1))
    mean = ch16.teacher_targets([_constant(a), _constant(b)], x, t, routing="mean")
    assert torch.allclose(mean[1], (F.softmax(a[0], -1) + F.softmax(b[0], -1)) / 2)
    with pytest.raises(ValueError, match="t must name a teacher"):
        ch16.teacher_targets([_constant(a)], x, t)
    with pytest.raises(ValueError, match="routing"):
        ch16.teacher_targets([_constant(a)], x, t, routing="vote")


def test_distil_loss_is_zero_at_the_targets_and_reads_rows_not_answers():
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    targets = F.softmax(z / 3.0, -1)
    method = ch16.Distil(targets, temperature=3.0)
    assert method.task_loss(None, z, torch.arange(4), torch.zeros(4, dtype=torch.long)).abs().item() < 1e-6
    shuffled = method.task_loss(None, z, torch.tensor([1, 0, 3, 2]), torch.zeros(4, dtype=torch.long))
    assert shuffled.item() > 1e-3  # y picks the target row
    with pytest.raises(ValueError, match="targets must be probabilities"):
        ch16.Distil(torch.ones(3))


def test_train_fit_without_baseline_trains_the_same(lab, stream):
    model_a, method_a = ch09.learner(lab, "full fine-tuning")
    model_b, method_b = ch09.learner(lab, "full fine-tuning")
    one = ch16.reordered(stream, (0, 1, 2))
    with_b = train.fit(model_a, one, method_a, steps=2, batch_size=8, device="cpu", progress=False)
    without = train.fit(model_b, one, method_b, steps=2, batch_size=8, device="cpu", progress=False, baseline=False)
    assert np.isnan(without.b).all() and not np.isnan(with_b.b).any()
    assert np.array_equal(with_b.R, without.R)


def test_the_three_routes_on_the_smoke_config():
    config = ch10.smoke_config(0)
    out = ch16.combined(config, 3)
    assert set(out["states"]) == {"task arithmetic", "multi-task", "distilled"}
    setup = ch10.lm_setup(config)
    for state in out["states"].values():
        assert set(state) == set(setup.base)
    scores = ch10.score_table(setup, out["states"])
    ch16.plot_combined(scores)
    plt.close("all")
    right = ch16.target_accuracy(setup)
    assert list(right.columns) == ["routed", "averaged"] and len(right) == len(setup.stream.tasks) + 1
    assert ((right >= 0) & (right <= 1)).all().all()
    costs = ch16.counted_costs(setup, out, 3)
    assert costs.loc["task arithmetic", "training steps"] == 0
    assert costs.loc["distilled", "expert forward passes (prompts)"] == 3 * len(
        ch16.prompts_only(setup.stream).tasks[0].y_train)


def test_the_playground_point_on_the_smoke_lab(lab):
    result = ch16.order_point((2, 0, 1), "shared LoRA", steps=1, smoke=True)
    assert result["R"].shape == (3, 4) and result["trained"][0] == result["evaluated"][3]
    stream = ch16.playground_stream(lab, smoke=True)  # the notebook's own run, handed to the playground's cache
    again = ch16.point_of(ch16.run_orders(lab, stream, "shared LoRA", [(2, 0, 1)], steps=1)[0], stream)
    assert np.array_equal(again["R"], result["R"]) and again["trained"] == result["trained"]
    ch16.plot_order_point(result)
    plt.close("all")


def test_the_diagram_names_the_three_routes_and_what_each_needs():
    from cl_lab.diagrams import ch16 as diagram

    fig = diagram.experts_to_one()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for name, needs, _ in diagram.ROUTES:
        assert name in texts and needs in texts
    assert texts.count("expert θ") == 3
    plt.close(fig)
