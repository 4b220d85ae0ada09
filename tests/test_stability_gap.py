"""Stability-gap metrics through chapter 08's lens: Min-ACC / WC-ACC on hand-made curves, the hidden dip,
exact subsampling of continual evaluation, and the widget's argument checks."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

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


def test_widget_point_and_plots():
    result = ch08.gap_point(eval_every=5, replay_ratio=0.5, steps=3, hidden=(8,))
    assert set(result["curves"].step % 5) <= {0, result["curves"].step.max() % 5}
    assert result["seen"]["WC-ACC"] >= result["truth"]["WC-ACC"]
    assert ch08.plot_gap_point(result) is not None
    runs = {"er": result["run"]}
    assert ch08.plot_switch(runs) is not None
    assert ch08.plot_worst_case({"er": ch08.gap_metrics(result["run"])}) is not None


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
