"""Merging on the tiny LM (cl_lab.lm.merge and chapter 10's LM helpers), on an LM small enough to pretrain in a
second: weights as state dicts, the task set, the probe, LoRA deltas, and each measurement of the chapter."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from cl_lab import lm
from cl_lab.chapters import ch10
from cl_lab.lm import merge
from cl_lab.methods import merging

matplotlib.use("Agg")

CONFIG = ch10.smoke_config(0)
TINY = CONFIG.lab


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0, progress=False, **dict(TINY))


@pytest.fixture(scope="module")
def setup():
    return ch10.lm_setup(CONFIG)


# ---------------------------------------------------------------- weights as state dicts


def test_params_of_counts_the_tied_head_once_and_round_trips(lab):
    state = merge.params_of(lab.model)
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state
    assert sum(v.numel() for v in state.values()) == lab.n_parameters
    twin = merge.model_with(lab, {k: v + 0.01 for k, v in state.items()})
    assert torch.equal(twin.lm_head.weight, twin.transformer.wte.weight)  # still tied
    assert torch.allclose(merge.params_of(twin)["transformer.h.0.mlp.c_fc.weight"],
                          state["transformer.h.0.mlp.c_fc.weight"] + 0.01)
    assert torch.equal(merge.params_of(lab.model)["transformer.wte.weight"], state["transformer.wte.weight"])


def test_load_params_names_missing_extra_and_misshapen_parameters(lab):
    state = merge.params_of(lab.model)
    missing = {k: v for k, v in state.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match=r"missing \['transformer.ln_f.bias'\], extra \[\]"):
        merge.model_with(lab, missing)
    with pytest.raises(ValueError, match=r"missing \[\], extra \['lm_head.weight'\]"):
        merge.model_with(lab, {**state, "lm_head.weight": state["transformer.wte.weight"]})
    with pytest.raises(ValueError, match=r"state\['transformer.ln_f.bias'\] must have shape \(64,\), got \(31,\)"):
        merge.model_with(lab, {**state, "transformer.ln_f.bias": torch.zeros(31)})


def test_mean_abs_over_matrices_or_everything():
    tau = {"w": torch.tensor([[1.0, -3.0]]), "b": torch.tensor([10.0])}
    assert merge.mean_abs(tau) == pytest.approx(2.0)
    assert merge.mean_abs(tau, matrices_only=False) == pytest.approx(14 / 3)


# ---------------------------------------------------------------- tasks and the probe


def test_merge_stream_pads_every_task_to_one_length_with_its_own_size(lab):
    stream = merge.merge_stream(lab, ("subjects", "relation", "subjects"), (2, 4, 3))
    assert [t.name for t in stream.tasks] == ["new people 1", "plays", "new people 2"]
    assert [len(t.y_train) for t in stream.tasks] == [2 * 4 * 4, 4 * 4, 3 * 4 * 4]  # people × relations × templates
    assert len({t.x_train.shape[1] for t in stream.tasks} | {t.x_test.shape[1] for t in stream.tasks}) == 1
    clf = lab.as_classifier()
    short = lm.fact_stream(lab, 1, "relation", n_subjects=4).tasks[0]
    assert torch.equal(clf(stream.tasks[1].x_train).argmax(1), clf(short.x_train).argmax(1))  # padding is inert
    with pytest.raises(ValueError, match="kinds"):
        merge.merge_stream(lab, "subjects")
    with pytest.raises(ValueError, match="one per task"):
        merge.merge_stream(lab, ("subjects", "relation"), (2, 3, 4))


def test_balanced_union_gives_every_task_the_same_share(lab):
    stream = merge.merge_stream(lab, ("subjects", "relation"), (2, 4))  # 32 and 16 prompts
    union = merge.balanced_union(stream, seed=0)
    x, y = union.tasks[0].x_train, union.tasks[0].y_train
    assert len(y) == 64 and union.eval_tasks == stream.tasks
    rows = {tuple(r) for r in stream.tasks[1].x_train.tolist()}
    assert sum(tuple(r) in rows for r in x.tolist()) == 32  # the small task tiled twice
    assert not torch.equal(x[:32], torch.cat([stream.tasks[0].x_train]))  # shuffled


def test_probe_splits_each_test_set_into_disjoint_halves_and_scores(lab):
    stream = merge.merge_stream(lab, ("subjects", "relation"), (2, 4))
    probe = merge.make_probe(lab, stream, n_pretrained=12, n_general=5, seed=0)
    for task, (xv, _), (xt, _) in zip(stream.tasks, probe.val, probe.test):
        assert len(xv) + len(xt) == len(task.x_test) and len(xv) == len(task.x_test) // 2
        both = sorted(map(tuple, torch.cat([xv, xt]).tolist()))
        assert both == sorted(map(tuple, task.x_test.tolist()))
    assert len(probe.pretrained_facts) == 12 and set(probe.pretrained_facts) <= set(lab.world.train_facts)
    assert torch.equal(probe.pretrained[1], lm.fact_batch(lab.tokenizer, probe.pretrained_facts)[1])
    row = probe.score(lab.model)
    assert list(row) == ["new people 1", "plays", "mean", "pretrained", "perplexity"]
    assert row["perplexity"] == pytest.approx(lm.perplexity(lab.model, lab.tokenizer, list(probe.general)))
    x, y = probe.test[1]
    assert row["plays"] == pytest.approx((lab.as_classifier()(x).argmax(1) == y).float().mean().item())
    assert row["mean"] == pytest.approx((row["new people 1"] + row["plays"]) / 2)
    with pytest.raises(ValueError, match="split"):
        probe.recall(lab.model, "train")


def test_lora_delta_is_low_rank_and_only_on_the_projections(lab):
    state = merge.params_of(lab.model)
    stream = merge.one_task(merge.merge_stream(lab, ("subjects",), 2), 0)
    delta = merge.lora_delta(lab, state, stream, rank=2, alpha=4.0, steps=3, lr=1e-2, seed=0)
    assert delta.keys() == state.keys()
    for name, d in delta.items():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert 0 < torch.linalg.matrix_rank(d).item() <= 2, name
        else:
            assert not d.any(), name  # embeddings, norms and biases untouched
    with pytest.raises(ValueError, match="rank"):
        merge.lora_delta(lab, state, stream, rank=0, steps=1, lr=1e-3)


# ---------------------------------------------------------------- the chapter's LM measurements


def test_lm_setup_fine_tunes_one_model_per_task_and_caches(setup):
    assert setup.names == ["new people 1", "plays", "Q&A lives_in"]
    assert len(setup.finetuned) == 3 and ch10.lm_setup(CONFIG) is setup
    for ft, tau in zip(setup.finetuned, setup.task_vectors):
        assert _same(merging.add_task_vector(setup.base, tau), ft)
        assert merging.flatten(tau).abs().sum() > 0
    for fn in (ch10.lm_setup, ch10.delta_sizes, ch10.multitask_and_sequential, ch10.lora_deltas):
        with pytest.raises(TypeError, match="config must be a ch10.LMConfig, got dict"):
            fn({"seed": 0})
    with pytest.raises(ValueError, match="replay"):
        ch10.LMConfig(replay=1.0)


def _same(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_lambda_curve_starts_at_the_base_and_own_recall_reads_the_diagonal(setup):
    curve = ch10.lm_lambda_curve(setup, [0.0, 1.0])
    base = setup.score(setup.base)
    assert curve.iloc[0].drop("lam").to_dict() == pytest.approx(base)
    own = ch10.own_recall(setup)
    assert own[1] == pytest.approx(setup.score(setup.finetuned[1])["plays"])
    fig = ch10.plot_lm_lambda_curve(curve, setup.names, own=own.mean())
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:5] == [*setup.names, "mean over the tasks", "pretraining facts"]
    assert list(ax.get_lines()[3].get_ydata()) == pytest.approx(list(curve["mean"]))


def test_matched_noise_has_each_tensors_norm_and_is_not_tau(setup):
    tau = setup.task_vectors[0]
    noise = ch10.matched_noise(tau, seed=0)
    for k in tau:
        assert noise[k].norm().item() == pytest.approx(tau[k].norm().item(), rel=1e-4)
    assert abs(merging.cosine_similarity(tau, noise)) < 0.1


def test_negation_rows_and_the_start_row(setup):
    table = ch10.negation(setup, setup.finetuned[0], lams=(1.0,))
    assert table.loc[("nothing", 0.0)].to_dict() == pytest.approx(setup.score(setup.finetuned[0]))
    # the fine-tune minus its own vector is θ0
    assert table.loc[("τ of new people 1", 1.0)].to_dict() == pytest.approx(setup.score(setup.base), abs=1e-6)
    assert len(table) == 1 + 2 * len(setup.names)


def test_merge_grid_picks_lambda_on_the_validation_halves(setup):
    lams = (0.5, 1.0)
    grid = ch10.merge_grid(setup, lams, densities=(0.5,), drop_rates=(0.5,))
    assert list(grid.index) == ["task arithmetic", "TIES, density 0.5", "DARE, p = 0.5", "DARE-TIES, p = 0.5"]
    lam = grid.loc["task arithmetic", "λ (validation)"]
    val = {x: setup.recall(merging.task_arithmetic(setup.base, setup.task_vectors, x), "val").mean() for x in lams}
    assert val[lam] == max(val.values())
    assert grid.loc["task arithmetic", "mean"] == pytest.approx(
        setup.score(merging.task_arithmetic(setup.base, setup.task_vectors, lam))["mean"])


def test_dare_sweep_at_p_zero_is_the_fine_tune_and_safe_rate_scans_upwards(setup):
    sweep = ch10.dare_sweep(setup, {"own": (0, setup.task_vectors[0])}, drop_rates=(0.0, 0.5), draws=1)
    x = torch.cat([setup.probe.val[0][0], setup.probe.test[0][0]])
    y = torch.cat([setup.probe.val[0][1], setup.probe.test[0][1]])
    clf = lm.LMClassifier(merge.model_with(setup.lab, setup.finetuned[0]), setup.lab.tokenizer.pad_token_id)
    assert sweep.loc["own", 0.0] == pytest.approx((clf(x).argmax(1) == y).float().mean().item())
    assert sweep.loc["own", "mean |τ|"] == pytest.approx(merge.mean_abs(setup.task_vectors[0]))
    fig = ch10.plot_dare_sweep(sweep)
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [0.0, 0.5] and list(line.get_ydata()) == pytest.approx([sweep.loc["own", 0.0],
                                                                                             sweep.loc["own", 0.5]])
    assert line.get_label().startswith("own: mean |τ| = ")
    hand = pd.DataFrame({0.0: [0.9, 0.9], 0.5: [0.88, 0.7], 0.9: [0.86, 0.9], "mean |τ|": [1e-3, 1e-2]},
                        index=pd.Index([1e-4, 1e-3], name="lr"))
    assert ch10.safe_drop_rate(hand).tolist() == [0.9, 0.0]  # the second breaks at 0.5 and is not revived at 0.9


def test_routed_vs_summed_with_one_adapter_per_task(setup):
    zero = {k: torch.zeros_like(v) for k, v in setup.base.items()}
    table = ch10.routed_vs_summed(setup, [setup.task_vectors[0], zero, zero])
    base, ft = setup.score(setup.base), setup.score(setup.finetuned[0])
    routed = table.loc["routed (own adapter per task)"]
    assert routed["new people 1"] == pytest.approx(ft["new people 1"])
    assert routed["plays"] == pytest.approx(base["plays"])
    assert routed["perplexity"] == pytest.approx((ft["perplexity"] + 2 * base["perplexity"]) / 3)
    assert table.loc["summed (one merged model)"].to_dict() == pytest.approx(ft)


def test_wise_curve_ends_are_the_base_and_the_fine_tune(setup):
    curve = ch10.lm_wise_curve(setup, setup.finetuned[0], alphas=(0.0, 0.5, 1.0))
    assert curve.task.iloc[0] == pytest.approx(setup.score(setup.base)["new people 1"])
    assert curve.perplexity.iloc[-1] == pytest.approx(setup.score(setup.finetuned[0])["perplexity"])
    fig = ch10.plot_wise({"default": curve}, base_perplexity=4.0)
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == pytest.approx(list(curve.task))


def test_merge_point_and_what_its_plot_shows(setup):
    result = ch10.merge_point(lam=0.0, density=0.5, config=CONFIG)
    assert result["task arithmetic"] == pytest.approx(setup.score(setup.base))  # λ = 0 is θ0
    result = ch10.merge_point(lam=1.0, density=0.5, config=CONFIG)
    fig = ch10.plot_merge_point(result)
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    k = len(result["tasks"]) + 1
    assert heights[:k] == pytest.approx([*result["own fine-tune"], result["base"]["pretrained"]])
    assert heights[k:2 * k] == pytest.approx([result["task arithmetic"][n] for n in result["tasks"]]
                                             + [result["task arithmetic"]["pretrained"]])
    ties = result["TIES"]
    assert heights[2 * k:] == pytest.approx([ties[n] for n in result["tasks"]] + [ties["pretrained"]])
    assert [t.get_text() for t in ax.get_xticklabels()] == [*result["tasks"], "pretraining facts"]
    assert f"TA {result['task arithmetic']['perplexity']:.2f}" in ax.get_title()
    for density in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            ch10.merge_point(lam=1.0, density=density, config=CONFIG)


def test_merge_widget_moves_headlessly_and_caches(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch10.merge_point, ch10.plot_merge_point, fixed={"config": CONFIG},
                           lam=w.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.1),
                           density=w.FloatSlider(value=0.5, min=0.1, max=1.0, step=0.1))
    lam_slider = widget.children[0]
    lam_slider.value = 1.2
    assert widget.result["lam"] == pytest.approx(1.2)
    lam_slider.value = 0.8
    assert widget.cache.hits == 1 and len(widget.figures) == 3


def test_multitask_and_sequential_train_from_the_base(setup):
    out = ch10.multitask_and_sequential(CONFIG)
    assert out["R"].shape == (3, 3)
    assert out["multi-task"].keys() == setup.base.keys()
    assert not _same(out["multi-task"], setup.base) and not _same(out["sequential"], out["multi-task"])
    assert np.all((out["R"] >= 0) & (out["R"] <= 1))


# ---------------------------------------------------------------- the optimizer null


def test_null_stream_draws_known_facts_apart_from_the_probe_s(setup):
    from cl_lab.lm import nulls

    null = ch10.null_stream(setup)
    scored = nulls.fact_keys(setup.probe.pretrained_facts)
    keys = [nulls.fact_keys(t.train_facts) for t in null.tasks]
    assert len(null.tasks) == len(setup.stream.tasks)
    assert all(not (k & scored) for k in keys) and sum(map(len, keys)) == len(set().union(*keys))
    assert [len(t.y_train) for t in null.tasks] == [16, 16, 8]  # the tasks hold 16, 16 and 6 prompts: 4 a fact
    assert all(lm.recall(setup.lab.model, setup.lab.tokenizer, t.train_facts) == 1.0 for t in null.tasks)


def test_null_finetunes_train_like_the_fine_tunes_and_are_cached(setup):
    states = ch10.null_finetunes(CONFIG)
    assert len(states) == 3 and ch10.null_finetunes(CONFIG) is states
    null = ch10.null_stream(setup)
    again = setup.fine_tune(merge.one_task(null, 1), seed=CONFIG.seed + 1)  # task 1's settings and seed
    assert _same(again, states[1])
    assert not _same(states[0], setup.base)
    sequential = ch10.null_sequential(CONFIG)
    assert _same(sequential, setup.fine_tune(null, seed=CONFIG.seed)) and not _same(sequential, states[2])
