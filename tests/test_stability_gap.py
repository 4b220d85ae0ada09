"""Stability-gap metrics through chapter 08's lens: Min-ACC / WC-ACC on hand-made curves, the hidden dip,
exact subsampling of continual evaluation, and the widget's argument checks."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from cl_lab import data, models, train
from cl_lab.chapters import ch08
from cl_lab.device import seed_everything
from cl_lab.train import Run

matplotlib.use("Agg")


def _hand_made_run() -> Run:
    """Three tasks of 4 steps each, evaluated every step. Task 0 dips to 0.2 right after the switch (step 5)
    and recovers to 0.8 by the next task end; task 1 dips to 0.5 at step 9, recovers to 0.7."""
    acc = {  # task -> accuracy at steps 0..12
        0: [0.1, 0.5, 0.8, 0.9, 0.9, 0.2, 0.4, 0.7, 0.8, 0.6, 0.7, 0.75, 0.8],
        1: [0.1, 0.1, 0.1, 0.1, 0.1, 0.5, 0.8, 0.9, 0.95, 0.5, 0.6, 0.7, 0.7],
        2: [0.1] * 9 + [0.6, 0.8, 0.9, 0.9],
    }
    boundaries = [0, 4, 8]
    rows = [(step, min(step // 4, 2), task, a) for task, accs in acc.items() for step, a in enumerate(accs)]
    curves = pd.DataFrame(rows, columns=["step", "train_task", "task", "accuracy"])
    # R[i, j] at task ends: steps 4, 8, 12
    R = np.array([[acc[j][s] for j in range(3)] for s in (4, 8, 12)])
    return Run(R, np.full(3, 0.1), curves, pd.DataFrame(), boundaries, 0.0, {})


def test_min_acc_and_wc_acc_on_hand_made_curves():
    run = _hand_made_run()
    assert run.min_acc(0) == 0.2  # the dip at step 5, invisible at the task ends (0.8, 0.8)
    assert run.min_acc(1) == 0.5
    assert run.wc_acc() == pytest.approx(0.9 / 3 + (2 / 3) * (0.2 + 0.5) / 2)
    assert run.wc_acc(1) == pytest.approx(0.95 / 2 + 0.5 * 0.2)
    with pytest.raises(ValueError, match="task"):
        run.min_acc(2)  # the last task has no later task


def test_min_acc_is_strictly_after_the_task_end_and_wc_acc_stops_at_task_k():
    run = _hand_made_run()
    c = run.curves
    # The evaluation at step 4 is taken before task 1's first update: it is task 0's end model, n = t_0.
    c.loc[(c.task == 0) & (c.step == 4), "accuracy"] = 0.05
    # A deeper dip of task 0 during task 2 (step 10) belongs to WC-ACC after task 2, not after task 1.
    c.loc[(c.task == 0) & (c.step == 10), "accuracy"] = 0.1
    assert run.min_acc(0) == 0.1  # n > t_0 over the whole run: step 4's 0.05 is excluded
    assert run.min_acc(0, until_task=1) == 0.2  # up to the end of task 1 (step 8)
    assert run.wc_acc(1) == pytest.approx(0.95 / 2 + 0.5 * 0.2)
    assert ch08.gap_metrics(run).iloc[0]["Min-ACC"] == 0.1
    with pytest.raises(ValueError, match="until_task must be in 1..2"):
        run.min_acc(0, until_task=0)


def test_gap_metrics_separate_the_hidden_dip_from_end_of_task_forgetting():
    table = ch08.gap_metrics(_hand_made_run())
    row = table.iloc[0]
    assert row["end of its task"] == 0.9 and row["lowest at later task ends"] == 0.8
    assert row["Min-ACC"] == 0.2 and row["hidden dip"] == pytest.approx(0.6)
    assert row["forgetting (end-of-task view)"] == pytest.approx(0.1)
    assert row["forgetting (worst case)"] == pytest.approx(0.7)
    summary = ch08.summary(_hand_made_run())
    assert summary["WC-ACC from task ends"] > summary["WC-ACC"]


def test_a_coarse_schedule_misses_the_dip():
    run = _hand_made_run()
    coarse = ch08.gap_metrics(run, eval_every=4)  # evaluations at 0, 4, 8, 12 only: the task ends
    assert coarse.loc[0, "Min-ACC"] == 0.8
    assert ch08.summary(run, eval_every=4)["WC-ACC"] >= ch08.summary(run)["WC-ACC"]


@pytest.mark.parametrize("bad", [0, -3])
def test_evaluation_interval_must_be_positive(bad):
    with pytest.raises(ValueError, match="eval_every"):
        ch08.gap_point(eval_every=bad, replay_ratio=0.5)
    with pytest.raises(ValueError, match="eval_every"):
        ch08.subsample_curves(_hand_made_run().curves, bad)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        ch08.make_method("si")


def test_subsampling_an_every_step_run_equals_a_coarser_schedule():
    stream = data.split(data.load("digits"), n_tasks=5, scenario="class", n_train=60)
    runs = {}
    for k in (1, 3):
        seed_everything(0)
        model = models.MLP(stream.input_dim, (16,), stream.n_out)
        runs[k] = train.fit(model, stream, ch08.make_method("er", buffer_size=30), steps=6, batch_size=16,
                            eval_every=k, progress=False)
    sub = ch08.subsample_curves(runs[1].curves, 3).reset_index(drop=True)
    pd.testing.assert_frame_equal(sub, runs[3].curves.reset_index(drop=True))


@pytest.fixture(scope="module")
def gap_result():
    return ch08.gap_point(eval_every=5, replay_ratio=0.5, steps=3, hidden=(8,))


def test_widget_point_sees_only_its_schedule(gap_result):
    assert set(gap_result["curves"].step % 5) <= {0, gap_result["curves"].step.max() % 5}
    assert gap_result["seen"]["WC-ACC"] >= gap_result["truth"]["WC-ACC"]


def test_gap_figure_draws_each_task_the_switches_and_both_wc_accs(gap_result):
    ax = ch08.plot_gap_point(gap_result).axes[0]
    run, curves = gap_result["run"], gap_result["curves"]
    task_lines = [line for line in ax.lines if line.get_label().startswith("task")]
    assert [line.get_label() for line in task_lines] == [f"task {j + 1}" for j in range(5)]
    for j, line in enumerate(task_lines):
        assert list(line.get_xdata()) == curves[curves.task == j].step.tolist()  # only the schedule's evaluations
    switches = [line.get_xdata()[0] for line in ax.lines if not line.get_label().startswith("task")]
    assert switches == run.boundaries[1:]
    title = ax.get_title()
    assert f"WC-ACC {gap_result['seen']['WC-ACC']:.3f}" in title and "evaluated every 5 steps" in title
    assert f"(every step: {gap_result['truth']['WC-ACC']:.3f})" in title


def test_switch_figure_has_one_line_per_run_centred_on_the_switch(gap_result):
    run = gap_result["run"]
    ax = ch08.plot_switch({"a": run, "b": run}, task=1, window=(-2, 4))
    curves = [line for line in ax.lines if line.get_label() in ("a", "b")]
    assert [line.get_label() for line in curves] == ["a", "b"]
    switch = run.boundaries[2]
    expected = run.curves[(run.curves.task == 1) & run.curves.step.between(switch - 2, switch + 4)]
    assert list(curves[0].get_xdata()) == (expected.step - switch).tolist()
    assert list(curves[0].get_ydata()) == expected.accuracy.tolist()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert "task 3" in ax.get_xlabel() and "task 2" in ax.get_ylabel()


def test_worst_case_figure_pairs_the_two_views_per_method():
    table = ch08.gap_metrics(_hand_made_run())
    ax = ch08.plot_worst_case({"hand": table, "twice": table * 2})
    heights = [bar.get_height() for bar in ax.patches]
    end_view, worst = table["forgetting (end-of-task view)"].mean(), table["forgetting (worst case)"].mean()
    assert heights == pytest.approx([end_view, 2 * end_view, worst, 2 * worst])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hand", "twice"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["seen at task ends", "worst case during training"]


def test_gap_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch08.gap_point, ch08.plot_gap_point, fixed={"steps": 3, "hidden": (8,)},
                           eval_every=w.SelectionSlider(options=[1, 5], value=1),
                           replay_ratio=w.SelectionSlider(options=[0.25, 0.5], value=0.5))
    truth = widget.result["seen"]["WC-ACC"]
    widget.children[0].value = 5
    assert widget.result["eval_every"] == 5 and widget.result["seen"]["WC-ACC"] >= truth
    assert widget.result["run"] is widget.cache.get(ch08.gap_point, {"steps": 3, "hidden": (8,), "eval_every": 1,
                                                                      "replay_ratio": 0.5})["run"]


def test_null_stream_repeats_one_task_with_a_fair_test_draw():
    digits = data.load("digits")
    null = ch08.null_stream(digits, 3, test_samples=40, seed=1)
    assert null.scenario == "domain" and len(null) == 3 and null.n_out == 10
    first = null.tasks[0]
    key = torch.randn(first.x_train.shape[1], dtype=first.x_train.dtype)

    def in_one_order(task):
        order = (task.x_train @ key).argsort()
        return task.x_train[order], task.y_train[order]

    for task in null.tasks[1:]:  # the same training images (each task in its own order): nothing changes at a switch
        assert not torch.equal(task.x_train, first.x_train)
        assert all(torch.equal(a, b) for a, b in zip(in_one_order(task), in_one_order(first), strict=True))
    assert [len(task.y_test) for task in null.tasks] == [40, 40, 40]
    assert len(torch.unique(first.y_test)) >= 8  # a random draw, not the first digits of a sorted set
    assert not torch.equal(null.tasks[0].y_test, null.tasks[1].y_test)  # each task draws its own
    assert null.eval_tasks == null.tasks
    with pytest.raises(ValueError, match="test_samples must be a positive int"):
        ch08.null_stream(digits, 2, test_samples=0)


def test_evaluation_overhead_times_both_sides_on_seeded_draws():
    stream = data.split(data.load("digits"), n_tasks=5, scenario="class", n_train=60)
    cost = ch08.evaluation_overhead(stream, (16,), batch_size=32, eval_samples=20, repeats=3)
    assert cost["evaluated images"] == 5 * 20
    assert cost["train step"] > 0 and cost["evaluation"] > 0
    assert cost["ratio"] == pytest.approx(cost["evaluation"] / cost["train step"])
    with pytest.raises(ValueError, match="repeats"):
        ch08.evaluation_overhead(stream, (16,), repeats=0)
