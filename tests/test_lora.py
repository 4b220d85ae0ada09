"""LoRA for continual learning: the adapted model starts as the base model, only B learns at the first step,
per-task adapters leave old tasks bit-identical, merging equals summing, O-LoRA's penalty vanishes exactly for
orthogonal rows, and every public function rejects bad arguments by name."""

import copy

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl_lab import data, models, train
from cl_lab.chapters import ch09
from cl_lab.data.streams import Stream
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


def test_per_task_adapters_leave_old_tasks_bit_identical(stream, backbone):
    method = PerTaskLoRA()
    log = ch09.OutputLog(method, {task.id: task.x_test for task in stream.tasks})
    model = LoRAModel(backbone, rank=2, alpha=2.0)
    run = train.fit(model, _after_base(stream), [method, log], steps=10, batch_size=32, progress=False)
    assert log.unchanged()
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


def test_cost_table_counts():
    table = ch09.cost_table(784, (100, 100), 10, n_tasks=4, ranks=(16,))
    network = 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert table.loc["LoRA adapter set, r = 16", "numbers"] == 16 * (884 + 200 + 110)
    assert table.loc["per-task EWC: Fisher + anchor", "numbers"] == 2 * network
    assert table.loc["ProgNN column (task 4, with laterals)", "numbers"] == network + 3 * (100 * 100 + 100 * 10)


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


def test_rank_alpha_widget_point_and_headless_slider(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    fixed = {"steps": 3, "base_steps": 3, "hidden": (8,)}
    result = ch09.rank_alpha_point(2, 4.0, **fixed)
    assert result["adapter parameters"] == lora_parameter_count([784, 8, 10], 2)
    assert 0 <= result["new task"] <= 1 and 0 <= result["base task"] <= 1
    assert ch09.plot_rank_alpha(result) is not None
    widget = widgets.sweep(ch09.rank_alpha_point, ch09.plot_rank_alpha, fixed=fixed,
                           rank=w.SelectionSlider(options=[1, 2, 4], value=2), alpha=w.FloatSlider(value=4.0))
    widget.children[0].value = 4
    assert widget.result["rank"] == 4
    widget.children[0].value = 2
    assert widget.cache.hits == 1 and len(widget.figures) == 3
    with pytest.raises(ValueError, match="rank"):
        ch09.rank_alpha_point(0, 4.0)
