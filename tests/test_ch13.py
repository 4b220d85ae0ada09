"""Chapter 13 helpers, on the 1-layer SMOKE lab: the runs, tables and plots the notebook draws."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from cl_lab import cost, drift
from cl_lab.chapters import ch13
from cl_lab.lm import cpt

SEED = 0


@pytest.fixture(scope="module")
def lab():
    return ch13.lab_of(SEED, True)


@pytest.fixture(scope="module")
def runs():
    return {s: ch13.cpt_point(SEED, s, 0.25, steps=12, eval_every=4, smoke=True)
            for s in ("rewarm", "constant", "rewarm-flat")}


def _history(probe, new):
    return pd.DataFrame({"step": range(0, 10 * len(probe), 10), "probe_ppl": probe, "new": new,
                         "old": [1.0] * len(probe), "test_ppl": probe})


def test_early_stop_keeps_the_checkpoint_before_the_first_rise():
    h = _history([4.0, 4.2, 4.5, 4.1], [0, 0.1, 0.2, 0.3])
    assert ch13.early_stop(h, 0.1).step == 10  # 4.5 > 4.4 first at step 20
    assert ch13.early_stop(h, 0.2).step == 30  # never above 4.8: the last
    assert ch13.early_stop(_history([4.0, 5.0], [0, 0]), 0.1).step == 0


def test_cpt_point_and_its_tables(runs):
    run = runs["rewarm"]
    assert list(run.history.step) == [0, 4, 8, 12] and run.config["schedule"] == "rewarm"
    table = ch13.summary(runs)
    assert list(table.index) == list(runs) and table.loc["rewarm", "old"] == run.final.old
    assert table.loc["rewarm", "mean(old, new)"] == pytest.approx((run.final.old + run.final.new) / 2)
    grid = ch13.replay_table({("rewarm", 0.25): run, ("constant", 0.25): runs["constant"]})
    assert grid.schedule.tolist() == ["rewarm", "constant"] and grid.share.tolist() == [0.25, 0.25]
    ckpt = ch13.checkpoint_table(runs)
    assert len(ckpt) == 6 and set(ckpt.rule) == {"early stop (probe +10%)", "last"}
    assert (ckpt["probe / its peak"] <= 1 + 1e-12).all()
    again = ch13.cpt_point(SEED, "rewarm", 0.25, steps=12, eval_every=4, smoke=True)
    assert again.history.equals(run.history)  # seeded: the same configuration gives the same run


def test_plots_draw_one_line_per_schedule(runs):
    fig = ch13.plot_schedules(runs, steps=12)
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3, 3]
    assert fig.axes[0].lines[0].get_ydata()[-1] == pytest.approx(cpt.lr_at(11, 12, "rewarm"))
    plt.close(fig)
    fig = ch13.plot_checkpoints(runs)
    assert len(fig.axes[1].lines) == 3
    plt.close(fig)
    grid = ch13.replay_table({("rewarm", 0.25): runs["rewarm"], ("constant", 0.25): runs["constant"]})
    fig = ch13.plot_replay(grid)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2]
    plt.close(fig)
    fig = ch13.plot_point(runs["constant"])
    assert "constant 3e-4, replay 25%" in fig.axes[0].get_title()
    plt.close(fig)


def test_drift_pools_are_disjoint_random_splits_and_the_experiment_reports_both_rules(lab):
    pools = ch13.drift_pools(lab, SEED, n_reference=32, n_calibration=64)
    known = len(lab.world.train_facts) + len(lab.world.heldout_facts)
    assert len(pools["reference"]) + len(pools["calibration"]) + len(pools["pool"]) == known
    equal = ch13.drift_pools(lab, SEED, n_reference=32)
    assert abs(len(equal["calibration"]) - len(equal["pool"])) <= 1  # calibrated on windows drawn like the stream's
    assert set(pools["shifted"]) == {"question format", "new people"}
    table = ch13.drift_experiment(pools, shares=(0.5,), runs=5, windows=6, shift_at=3, window=8)
    assert len(table) == 2 * len(drift.RULES) and set(table["rule"]) == set(drift.RULES)
    still = table.groupby("rule")["false alarms per window"].nunique()
    assert (still == 1).all()  # the stationary streams are drawn once and shared
    fig = ch13.plot_drift(table)
    assert len(fig.axes[0].patches) == len(table)
    plt.close(fig)


def test_guard_outcomes_flip_exactly_the_tolerance(lab):
    facts = lab.world.train_facts[:200]
    out = ch13.guard_outcomes({"base": lab}, facts, tolerance=0.05, seed=0)
    control = out["base"]
    at, twice = out["synthetic, −5% (at tolerance)"], out["synthetic, −10%"]
    assert control.sum() - at.sum() == min(10, control.sum()) and not (at & ~control).any()
    assert control.sum() - twice.sum() == min(20, control.sum())


def test_tenants_isolate_and_roll_back(lab):
    result = ch13.tenants(lab, steps=3, n_subjects=10, seed=SEED)
    log = result["log"]
    assert list(log.index) == ["publish city v1", "publish job v1", "publish city v2 (bad data)",
                               "roll city back to v1"]
    assert log["other tenant unchanged"].dropna().all() and result["restored"]
    assert log.city.iloc[3] == log.city.iloc[1]
    costs = ch13.rollback_costs(result, repeats=2)
    assert costs.bytes.iloc[0] == 0 and costs.bytes.iloc[1] < costs.bytes.iloc[2]
    assert result["registry"].versions["city"] == ["city_v1", "city_v2"]


def test_ema_experiment_rows_and_the_null_differs_only_by_data_order():
    table = ch13.ema_experiment(SEED, steps=5, methods=("naive", "naive (other order)", "EMA β=0.995"),
                                device="cpu")
    assert list(table.index) == ["naive", "naive (other order)", "EMA β=0.995"]
    assert ((table.AA >= 0) & (table.AA <= 1)).all()
    assert table.AA["naive"] != table.AA["naive (other order)"]


def test_cost_inputs_count_and_time_the_same_operations(lab):
    inputs = ch13.cost_inputs(SEED, repeats=1, smoke=True)
    for costs in inputs.values():
        assert set(cost.SECONDS) <= set(costs)
        assert all(costs[k] > 0 for k in ("pretrain_step", "update_step", "adapter_step", "evaluation", "request"))
        assert list(costs["requests by live adapters"]) == list(ch13.LIVE_ADAPTERS)
    work = inputs["work"]
    assert work == ch13.cost_inputs(SEED, repeats=1, smoke=True)["work"]  # counted, not timed
    requests = work["requests by live adapters"]
    per_adapter = np.diff([requests[k] for k in ch13.LIVE_ADAPTERS]) / np.diff(ch13.LIVE_ADAPTERS)
    assert per_adapter == pytest.approx([work["adapter_overhead"]] * 3) and work["adapter_overhead"] > 0  # linear
    assert work["adapter_step"] < work["update_step"]  # frozen weights need no weight gradients
    assert work["pretrain_step"] > work["update_step"]  # 64 sentences against 80 tokens
    growth = ch13.corpus_growth(SEED, True)
    assert 0 < growth < 1
    total = cost.cumulative(cost.monthly_costs(work, growth=growth))  # timed slopes can be negative under load
    fig = ch13.plot_costs({"FLOPs": total, "seconds": total}, 1000)
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    plt.close(fig)


def test_null_point_trains_known_sentences_outside_the_scored_old_facts(lab, monkeypatch):
    seen = {}
    real = cpt.continual_pretrain

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpt, "continual_pretrain", spy)
    run = ch13.null_point(SEED, "rewarm", 0.05, steps=4, eval_every=2, smoke=True)
    texts = seen["new_texts"]
    assert len(texts) == 16 * 4 and set(texts) <= set(lab.world.pretraining_texts())
    scored = {f.sentence for f in cpt.old_sample(lab.world)}
    assert not set(texts) & scored and run.config["new_texts"] == "given"
    assert run.history["step"].tolist() == [0, 2, 4]


def test_step0_perplexity_of_both_starts_is_finite(lab):
    values = [ch13.step0_perplexity(SEED, init, True) for init in ("mean", "random")]
    assert all(np.isfinite(values)) and values[0] != values[1]
