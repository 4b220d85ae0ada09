"""LoRA for continual learning on an MLP and chapter 09's helpers: the adapted model starts as the base model, only
B learns at the first step, per-task adapters leave old tasks bit-identical, merging equals summing, O-LoRA's penalty
vanishes exactly for orthogonal rows; the chapter's LM stream, learners, paths, ranks of ΔW, measured optimizer state
and playground; figures show what they claim; every public function rejects bad arguments by name."""

import copy

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl_lab import data, lm, models, train
from cl_lab.chapters import ch09
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Method
from cl_lab.methods.lora import (
    LoRALinear,
    LoRAModel,
    OLoRA,
    PerTaskLoRA,
    SharedLoRA,
    lora_parameter_count,
    orthogonality_penalty,
    subspace_overlap,
)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def stream():
    """Permuted digits (64 pixels), Domain-IL, 3 tasks: a small stand-in for permuted MNIST."""
    return data.permuted(data.load("digits"), 3, "domain", n_train=200)


@pytest.fixture(scope="module")
def backbone(stream):
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, (16, 16), stream.n_out)
    train.fit(model, stream.first(1), steps=30, batch_size=32, progress=False)
    return model


def _after_base(stream):
    return Stream(stream.name, stream.scenario, stream.tasks[1:], stream.n_out, stream.input_shape,
                  eval_tasks=stream.tasks)


def test_lora_at_initialisation_equals_the_base_bit_for_bit(stream, backbone):
    x = stream.tasks[0].x_test
    lora = LoRAModel(backbone, rank=4, alpha=8.0, seed=3)
    with torch.no_grad():
        assert torch.equal(lora(x), backbone(x))
    adapter = {id(p) for p in lora.adapter_parameters(0)}
    assert all(p.requires_grad == (id(p) in adapter) for p in lora.parameters())


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=4), st.integers(1, 8))
def test_parameter_count_is_r_times_d_in_plus_d_out_per_layer(dims, rank):
    layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    base = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())][:-1])
    lora = LoRAModel(base, rank=rank)
    expected = sum(rank * (a + b) for a, b in zip(dims[:-1], dims[1:]))
    assert lora.adapter_size(0) == lora_parameter_count(dims, rank) == expected
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected


def test_first_step_moves_only_b_then_a_learns(stream, backbone):
    lora = LoRAModel(backbone, rank=4, alpha=4.0)
    x, y = stream.tasks[1].x_train[:64], stream.tasks[1].y_train[:64]
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(lora(x), y).backward()
    for layer in lora.lora_layers():
        assert torch.count_nonzero(layer.A[0].grad) == 0
        assert torch.count_nonzero(layer.B[0].grad) > 0
        assert layer.base.weight.grad is None
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(lora(x), y).backward()
    assert any(torch.count_nonzero(layer.A[0].grad) > 0 for layer in lora.lora_layers())


def test_layer_matches_the_formula_with_a_non_zero_b():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(6, 5))
    i = layer.add_adapter(rank=2, alpha=3.0)
    with torch.no_grad():
        layer.B[i].normal_()
    layer.active = (i,)
    x = torch.randn(7, 6)
    expected = x @ layer.base.weight.T + layer.base.bias + 1.5 * (x @ layer.A[i].T) @ layer.B[i].T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight(i), 1.5 * layer.B[i] @ layer.A[i])


def test_orthogonality_penalty_is_zero_for_orthogonal_rows_and_positive_otherwise():
    lora = LoRAModel(nn.Sequential(nn.Linear(6, 3)), rank=2)
    lora.add_adapter()
    layer = lora.lora_layers()[0]
    eye = torch.eye(6)
    with torch.no_grad():
        layer.A[0].copy_(3 * eye[:2])
        layer.A[1].copy_(-2 * eye[2:4])
    assert orthogonality_penalty(lora, 1, [0]).item() == 0.0
    assert subspace_overlap(layer.A[0], layer.A[1]) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        layer.A[1][0] = eye[0] + eye[3]
    penalty = orthogonality_penalty(lora, 1, [0])
    assert penalty.item() == pytest.approx(9.0)  # ⟨3e₀, e₀ + e₃⟩² = 9
    assert 0 < subspace_overlap(layer.A[0], layer.A[1]) < 1
    assert subspace_overlap(layer.A[0], 5 * layer.A[0]) == pytest.approx(1.0)


class _LogitsAtTaskEnds(Method):
    """The predictor's logits on each task's test inputs at every task end (for tasks trained so far)."""

    def __init__(self, predictor, inputs):
        self.predictor, self.inputs = predictor, inputs
        self.outputs = {task_id: [] for task_id in inputs}

    @torch.no_grad()
    def on_task_end(self, ctx):
        for task_id, x in self.inputs.items():
            if task_id <= ctx.task.id:
                t = torch.full((len(x),), task_id, dtype=torch.long)
                self.outputs[task_id].append(self.predictor.logits(ctx.model, ctx.stream, x, t))


def test_per_task_adapters_leave_old_tasks_bit_identical(stream, backbone):
    method = PerTaskLoRA()
    log = _LogitsAtTaskEnds(method, {task.id: task.x_test for task in stream.tasks})
    model = LoRAModel(backbone, rank=2, alpha=2.0)
    run = train.fit(model, _after_base(stream), [method, log], steps=10, batch_size=32, progress=False)
    assert all(torch.equal(outs[0], later) for outs in log.outputs.values() for later in outs[1:])
    assert len(log.outputs[0]) == 2 and len(log.outputs[1]) == 2 and len(log.outputs[2]) == 1
    assert (run.R[:, 0] == run.R[0, 0]).all() and (run.R[:, 1] == run.R[0, 1]).all()
    assert model.n_adapters == 2 and sorted(method.adapter_of) == [1, 2]
    assert any(torch.count_nonzero(layer.B[1]) > 0 for layer in model.lora_layers())


def test_shared_adapter_keeps_one_adapter_and_changes_old_outputs(stream, backbone):
    model = LoRAModel(backbone, rank=2, alpha=2.0)
    train.fit(model, _after_base(stream), SharedLoRA(), steps=10, batch_size=32, progress=False)
    x = stream.tasks[0].x_test
    with torch.no_grad():
        assert model.n_adapters == 1 and not torch.equal(model(x), backbone(x))
    frozen = [layer.base.weight for layer in model.lora_layers()]
    original = [m.weight for m in backbone.modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(a, b) for a, b in zip(frozen, original, strict=True))


def test_merged_equals_summed_and_olora_trains_on_top_of_frozen_adapters(stream, backbone):
    method = OLoRA(lam=1.0)
    model = LoRAModel(backbone, rank=2, alpha=2.0)
    train.fit(model, _after_base(stream), method, steps=10, batch_size=32, progress=False)
    x = stream.tasks[0].x_test
    with torch.no_grad(), model.using(0, 1):
        summed = model(x)
    merged = model.merged(0, 1)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged(x), summed, atol=1e-5)
    assert model.active == (0, 1)  # stacked while training the last task
    table = ch09.summed_vs_routed(model, method.adapter_of, _after_base(stream))
    assert (table["all adapters summed"] == table["merged into backbone"]).all()


@pytest.mark.parametrize("rank, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_rank_is_rejected(rank, error):
    with pytest.raises(error, match="rank"):
        LoRAModel(nn.Linear(3, 2), rank=rank)
    with pytest.raises(error, match="rank"):
        lora_parameter_count([3, 2], rank)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LoRAModel(nn.Linear(3, 2), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(3, 2)).add_adapter(2, alpha)


def test_other_bad_arguments_are_rejected(stream, backbone):
    with pytest.raises(ValueError, match="task_id"):
        PerTaskLoRA().adapter_for(3)
    with pytest.raises(TypeError, match="task_id"):
        PerTaskLoRA().adapter_for("perm 1")
    with pytest.raises(ValueError, match="routing"):
        PerTaskLoRA(routing="vote")
    with pytest.raises(ValueError, match="lam"):
        OLoRA(lam=-1.0)
    with pytest.raises(ValueError, match="adapter"):
        LoRAModel(backbone).activate(1)
    with pytest.raises(ValueError, match="nn.Linear"):
        LoRAModel(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.ReLU())
    with pytest.raises(TypeError, match="LoRAModel"):
        train.fit(copy.deepcopy(backbone), _after_base(stream), SharedLoRA(), steps=1, progress=False)
    with pytest.raises(ValueError, match="a_j and a_k"):
        subspace_overlap(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="layer_dims"):
        lora_parameter_count([5], 2)
    with pytest.raises(ValueError, match="n_new"):
        ch09.after_base(stream, 5)


# ---------------------------------------------------------------- chapter 09 on the LM

TINY_LM = dict(n_layer=2, n_head=2, n_embd=32, n_subjects=40, n_general=100, n_general_test=20, steps=30,
               batch_size=16)
SMALL_TASKS = (("subjects", 2), ("relation", 3), ("format", 4))


@pytest.fixture(scope="module")
def lab():
    from cl_lab import lm
    return lm.tiny_lm(0, progress=False, use_cache=False, **TINY_LM)


@pytest.fixture(scope="module")
def lm_stream(lab):
    return ch09.lm_stream(lab, SMALL_TASKS, n_pretrained=40, seed=3)


@pytest.fixture(scope="module")
def results(lab, lm_stream):
    return {s: ch09.run_setup(lab, lm_stream, s, rank=2, alpha=4.0, steps=3, max_facts=30) for s in ch09.SETUPS}


def test_lm_stream_trains_three_kinds_and_evaluates_a_seeded_draw_of_pretraining_facts(lab, lm_stream):
    assert [t.id for t in lm_stream.eval_tasks] == [0, 1, 2, 3] and [t.id for t in lm_stream.tasks] == [1, 2, 3]
    assert lm_stream.tasks[0].name.startswith("new people") and lm_stream.tasks[2].name.startswith("Q&A")
    assert len(lm_stream.tasks[0].y_train) == 2 * 4 * 4 and len(lm_stream.tasks[1].y_train) == 3 * 4
    widths = {t.x_test.shape[1] for t in lm_stream.eval_tasks}
    assert widths == {lm_stream.input_shape[0]}  # one padded length: batches of different tasks concatenate
    old = lm_stream.eval_tasks[0].test_facts
    assert len(old) == 40 and set(old) <= set(lab.world.train_facts)
    assert old != lab.world.train_facts[:40]  # a random draw, not the stored order's prefix
    assert ch09.lm_stream(lab, SMALL_TASKS, n_pretrained=40, seed=3).eval_tasks[0].test_facts == old
    x, y = lm.fact_batch(lab.tokenizer, old[:5])
    assert torch.equal(lm_stream.eval_tasks[0].y_test[:5], y)


def test_learners_train_what_they_say_and_per_task_lora_keeps_the_pretraining_exactly(lab, lm_stream, results):
    n = sum(p.numel() for p in lab.model.parameters())
    assert results["full fine-tuning"].trainable == n
    d, layers = lab.config.n_embd, lab.config.n_layer
    attention, mlp = layers * 2 * ((d + 3 * d) + 2 * d), layers * 2 * ((d + 4 * d) + (4 * d + d))
    assert results["attention LoRA"].trainable == attention and results["MLP LoRA"].trainable == mlp
    assert results["shared LoRA"].trainable == attention + mlp
    for r in results.values():
        assert r.run.R.shape == (3, 4)
    per_task = results["per-task LoRA"]
    assert (per_task.run.R[:, 0] == per_task.run.b[0]).all() and per_task.model.n_adapters == 3
    base_row = lm.evaluate(lab.model, lab.tokenizer, lab.world, max_facts=30)
    assert per_task.end == base_row  # routed to the bare backbone: the pretrained LM's row exactly
    assert results["full fine-tuning"].end["perplexity"] != base_row["perplexity"]
    summed = ch09.without_task_id(per_task, lab, lm_stream, max_facts=30)
    assert set(summed) == {*(t.name for t in lm_stream.tasks), "pretraining recall", "perplexity"}
    assert summed["perplexity"] != base_row["perplexity"]  # every adapter on: the general text passes through them
    with pytest.raises(TypeError, match="per-task"):
        ch09.without_task_id(results["shared LoRA"], lab, lm_stream)


def test_replay_through_adapters_counts_tokens_on_a_lora_learner(lab, lm_stream):
    replay = lm.TextReplay(lab, 0.5, seed=0)
    ch09.run_setup(lab, lm_stream, "shared LoRA", rank=2, alpha=4.0, steps=4, extra=[replay], max_facts=10)
    assert replay.share == pytest.approx(0.5, abs=0.05)
    assert replay.task_tokens == sum(4 * min(32, len(t.y_train)) for t in lm_stream.tasks)  # one token per prompt


def test_summary_rows_and_labels(results, lab):
    base = {"recall": 1.0, "paraphrase": 0.9, "perplexity": 4.0}
    table = ch09.summary(results, base)
    assert list(table.index) == [*ch09.SETUPS, "pretrained LM"]
    R = ch09.new_tasks_R(results["full fine-tuning"].run)
    assert table.loc["full fine-tuning", "learned (mean, just after)"] == pytest.approx(R.diagonal().mean())
    assert table.loc["full fine-tuning", "BWT"] == pytest.approx(np.mean([R[-1, j] - R[j, j] for j in range(2)]))
    assert table.loc["pretrained LM", "perplexity"] == 4.0
    same = [results["full fine-tuning"], results["full fine-tuning"]]
    with pytest.raises(ValueError, match="distinct labels"):
        ch09.summary(same, base)


def test_path_and_matched_learning_read_the_first_task():
    curves = pd.DataFrame([(s, 0, task, acc) for s, accs in ((0, (1.0, 0.1)), (5, (0.8, 0.5)), (10, (0.6, 0.95)))
                           for task, acc in enumerate(accs)] + [(15, 1, 0, 0.2), (15, 1, 1, 0.2)],
                          columns=["step", "train_task", "task", "accuracy"])
    run = train.Run(np.zeros((2, 2)), np.zeros(2), curves, pd.DataFrame(), [0, 10], 0.0)
    path = ch09.lm_path(run)
    assert path["step"].tolist() == [0, 5, 10] and path["new task"].tolist() == [0.1, 0.5, 0.95]
    assert ch09.kept_at(path, 0.9) == 0.6 and ch09.kept_at(path, 0.5) == 0.8
    assert np.isnan(ch09.kept_at(path, 0.99))


def test_delta_ranks_count_the_directions_that_hold_the_energy(lab):
    after = lab.copy().model
    name = "transformer.h.1.mlp.c_fc"
    q, _ = torch.linalg.qr(torch.randn(4 * 32, 3, dtype=torch.float64))  # [out, 3] orthonormal
    p, _ = torch.linalg.qr(torch.randn(32, 3, dtype=torch.float64))  # [in, 3]
    delta = q @ torch.diag(torch.tensor([6.0, 2.0, 2.0]).sqrt().double()) @ p.T  # energies 6, 2, 2: [out, in]
    with torch.no_grad():
        lm.weight_out_in(after.get_submodule(name)).add_(delta.float())
    for energy, expected in ((0.5, 1), (0.7, 2), (0.9, 3)):
        table = ch09.delta_ranks(lab.model, after, ["mlp.c_fc"], energy=energy)
        assert table.loc[name, "directions"] == expected
        assert table.loc["transformer.h.0.mlp.c_fc", "directions"] == 0  # unchanged
    assert (table["full rank"] == 32).all()
    with pytest.raises(ValueError, match="energy"):
        ch09.delta_ranks(lab.model, after, ["mlp.c_fc"], energy=1.0)


def test_optimizer_state_is_what_adam_allocated_and_the_cost_table_measures_it(lab, lm_stream):
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    row = ch09.measured_cost(net, x, y)
    assert row == {"trainable": 10, "state tensors": 6, "state numbers": 2 * 10 + 2, "state bytes": 22 * 4}
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    assert ch09.optimizer_state(sgd)["state tensors"] == 0
    table = ch09.lm_cost_table(lab, lm_stream, ranks=(1, 4))
    d, layers = lab.config.n_embd, lab.config.n_layer
    per_rank = layers * ((d + 3 * d) + 2 * d + (d + 4 * d) + (4 * d + d))
    assert table.loc["full fine-tuning", "trainable"] == sum(p.numel() for p in lab.model.parameters())
    assert table.loc["LoRA r = 4", "trainable"] == 4 * per_rank
    assert (table["state numbers"] == 2 * table["trainable"] + table["state tensors"] / 3).all()
    assert table.loc["LoRA r = 1", "state / full"] < table.loc["LoRA r = 4", "state / full"] < 1


def test_never_emitted_objects_have_untrained_rows(lab, lm_stream):
    out = ch09.never_emitted(lab, lm_stream)
    assert out["new objects' row norm"] > out["pretrained objects' row norm"] > 0
    assert 0 < out["base LM's probability on the new objects"] < 0.5


def test_lm_figures_show_the_matrices_and_the_paths(results, lm_stream):
    fig = ch09.plot_lm_R(list(results.values()), lm_stream)
    axes = fig.axes[:len(results)]
    assert [ax.get_title() for ax in axes] == list(results)
    for ax, r in zip(axes, results.values()):
        np.testing.assert_allclose(ax.images[0].get_array(), r.run.R)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["pretrain", "people", "plays", "Q&A"]
    paths = {"a": pd.DataFrame({"step": [0, 5], "new task": [0.1, 0.9], "pretraining": [1.0, 0.4]}),
             "b": pd.DataFrame({"step": [0, 5], "new task": [0.1, 0.6], "pretraining": [1.0, 0.8]})}
    fig = ch09.plot_lm_tradeoff(paths, 0.97)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["a"].get_xdata().tolist() == [0.1, 0.9] and lines["b"].get_ydata().tolist() == [1.0, 0.8]
    assert list(lines["pretrained LM"].get_ydata()) == [0.97, 0.97]
    assert "pretraining facts" in ax.get_ylabel()
    plt.close("all")


def test_lm_playground_point_figure_and_headless_slider(monkeypatch):
    import ipywidgets as w

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    fixed = {"steps": 1, "max_facts": 20, "n_pretrained": 20}
    result = ch09.lm_point(2, 4.0, 0.5, **fixed)
    assert result["adapter parameters"] == 2 * 4 * (128 * 4 + 128 * 2 + 128 * 5 + 128 * 5)  # default LM: 4 blocks
    assert 0 <= result["new people"] <= 1 and result["replayed share"] == pytest.approx(0.5, abs=0.1)
    fig = ch09.plot_lm_point(result)
    ax, bx = fig.axes
    assert [p.get_height() for p in ax.patches] == [result["new people"], result["pretraining recall"]]
    assert bx.patches[0].get_height() == result["perplexity"]
    assert list(ax.get_lines()[0].get_ydata()) == [result["base recall"]] * 2
    assert "r=2" in fig.get_suptitle() and "α=4" in fig.get_suptitle()
    widget = widgets.sweep(ch09.lm_point, ch09.plot_lm_point, fixed=fixed,
                           rank=w.SelectionSlider(options=[1, 2], value=2), alpha=w.FloatSlider(value=4.0),
                           replay_share=w.SelectionSlider(options=[0.0, 0.5], value=0.0))
    widget.children[0].value = 1
    assert widget.result["rank"] == 1 and widget.result["replayed share"] == 0.0
    widget.children[0].value = 2
    assert widget.cache.hits == 1 and len(widget.figures) == 3
    plt.close("all")


def test_learn_forget_figure_draws_ranks_and_the_full_path():
    points = pd.DataFrame({"rank": [1, 16], "new task": [0.4, 0.8], "base task": [0.7, 0.85]})
    path = pd.DataFrame({"step": [0, 5, 10], "new task": [0.1, 0.6, 0.9], "base task": [0.93, 0.85, 0.8]})
    fig = ch09.plot_learn_forget(points, path, 0.93)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["LoRA, end"].get_xdata().tolist() == [0.4, 0.8]
    assert lines["full fine-tuning, every 5 steps"].get_ydata().tolist() == [0.93, 0.85, 0.8]
    assert lines["full fine-tuning, end"].get_xdata().tolist() == [0.9]
    assert [t.get_text() for t in fig.axes[0].texts] == ["r=1", "r=16"]
    plt.close("all")


def test_chapter_helpers_reject_bad_arguments_by_name(lab, lm_stream):
    with pytest.raises(ValueError, match="setup"):
        ch09.learner(lab, "prefix tuning")
    with pytest.raises(ValueError, match="rank"):
        ch09.learner(lab, "shared LoRA", rank=0)
    with pytest.raises(ValueError, match="alpha"):
        ch09.learner(lab, "MLP LoRA", alpha=0.0)
    with pytest.raises(ValueError, match="n_pretrained"):
        ch09.lm_stream(lab, SMALL_TASKS, n_pretrained=0)
    with pytest.raises(ValueError, match="tasks"):
        ch09.lm_stream(lab, ())
    with pytest.raises(ValueError, match="rank"):
        ch09.lm_point(0, 4.0, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        ch09.lm_point(2, -1.0, 0.0)
    with pytest.raises(ValueError, match="replay_share"):
        ch09.lm_point(2, 4.0, 1.0)
