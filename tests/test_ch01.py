"""Chapter 01's experiment functions and probes, on small settings."""

from types import SimpleNamespace
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_lab import data, models, probes, seed_everything, train, widgets
from cl_lab.chapters import ch01

FAST = {"first_steps": 20, "hidden": (32, 32)}


def test_second_task_point_measures_retention_against_drift():
    still = ch01.second_task_point(1e-7, 10, seed=0, **FAST)  # barely moves: task 1 exactly as before
    assert still["drift"] < 1e-3 and still["old"] == still["old_before"]
    short, long = ch01.second_task_point(1e-2, 10, seed=0, **FAST), ch01.second_task_point(1e-2, 40, seed=0, **FAST)
    assert short["old_before"] == still["old_before"] > 0.9  # the same cached task-1 model every time
    assert long["drift"] > short["drift"] > still["drift"]
    assert long["new"] > 0.9 and long["old"] < long["old_before"] - 0.1  # task 2 learned, task 1 lost


def test_the_first_task_is_trained_once_and_copied():
    a = ch01.first_task_model(0, (32, 32), first_steps=20)
    b = ch01.first_task_model(0, (32, 32), first_steps=20)
    assert a is not b and torch.equal(models.flat_params(a), models.flat_params(b))


def test_zero_learning_rate_is_refused():
    with pytest.raises(ValueError, match="lr must be > 0"):
        ch01.second_task_point(0.0, 10, **FAST)


def test_playground_slider_trains_a_new_point_and_caches_it():
    import ipywidgets as w

    with mock.patch.object(plt, "show"):
        playground = widgets.sweep(ch01.second_task_point, ch01.plot_second_task_point, fixed={"seed": 0, **FAST},
                                   lr=widgets.log_slider("lr", 1e-4, 1e-2, 1e-3),
                                   steps=w.IntSlider(value=10, min=10, max=50, step=10))
        first = playground.result
        playground.children[1].value = 40
        assert playground.result["steps"] == 40 and playground.result["drift"] > first["drift"]
        playground.children[1].value = 10
    assert playground.result is first and playground.cache.hits == 1
    title = playground.figures[-1].axes[0].get_title()
    assert "steps=10" in title and "drift" in title


def test_gradient_interference_is_negative_when_class_il_pushes_old_logits_down():
    stream = data.split(data.load("digits", verbose=False), 5, "class").first(2)
    seed_everything(0)
    model = models.MLP(64, (32,), 10)
    probe = probes.GradientInterference(old_task=0, every=1)
    train.fit(model, stream, probe, steps=30, batch_size=32, device="cpu")
    cosines = [c for _, task, c in probe.records if task == 1]
    assert len(cosines) == 30 and sum(cosines[:10]) / 10 < 0


def test_gradient_interference_records_the_cosine_with_the_old_task_gradient_on_a_fair_random_sample():
    stream = data.split(data.load("digits", verbose=False), 5, "class").first(2)
    probe = probes.GradientInterference(old_task=0, every=1, n_samples=100, seed=3)
    x_old, y_old, t_old = probe.old_sample(stream)
    assert len(y_old) == 100 and 0.35 < (y_old == 0).float().mean() < 0.65  # both digits, near their share
    assert torch.equal(probe.old_sample(stream)[0], x_old)  # one fixed draw
    seed_everything(0)
    model = models.MLP(64, (16,), 10)
    forward = lambda x, t: stream.mask_logits(model(x), t)  # noqa: E731
    task = stream.tasks[1]
    F.cross_entropy(model(task.x_train[:32]), task.y_train[:32]).backward()
    batch_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    ctx = SimpleNamespace(task=task, task_step=0, task_index=1, step=7, stream=stream, device="cpu", model=model,
                          forward=forward)
    probe.before_step(ctx)
    old_grad = torch.autograd.grad(F.cross_entropy(model(x_old), y_old), list(model.parameters()))
    expected = F.cosine_similarity(batch_grad, torch.cat([g.reshape(-1) for g in old_grad]), dim=0).item()
    assert probe.records == [(7, 1, pytest.approx(expected, abs=1e-6))]


def test_weight_drift_starts_at_zero_and_grows():
    stream = data.split(data.load("digits", verbose=False), 5, "domain").first(2)
    seed_everything(0)
    model = models.MLP(64, (32,), 2)
    probe = probes.WeightDrift(anchor_task=0, every=5)
    train.fit(model, stream, probe, steps=20, batch_size=32, device="cpu")
    drifts = [d for _, _, d in probe.records]
    assert drifts[0] == 0.0 and drifts[-1] > drifts[1] > 0


def test_prediction_share_counts_where_predictions_land():
    stream = data.split(data.load("digits", verbose=False), 5, "class")
    model = models.MLP(64, (8,), 10)
    share = ch01.class_il_prediction_share(model, stream)
    assert share.shape == (5,) and share.sum() == pytest.approx(1.0)
    with torch.no_grad():
        model.head.bias[9] = 1e3  # every image predicted as a 9: all of it in the last task
    assert ch01.class_il_prediction_share(model, stream).tolist() == [0, 0, 0, 0, 1]


def test_hygiene_table_anchor_pull_keeps_task_one_and_decay_does_not():
    table = ch01.hygiene_table(0, steps=100, **FAST)
    old = {(m, s): o for m, s, o in zip(table.method, table.strength, table.old, strict=True)}
    naive = table[table.method == "naive"].old.item()
    assert old[("L2 to θ*", 0.1)] > naive + 0.15  # 0.885 against 0.67 here
    assert old[("weight decay", 0.1)] < naive - 0.1  # 0.51: decay towards 0 costs task 1


def test_linear_cka_is_one_under_rotation_and_scale_and_small_for_unrelated_inputs():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 20, generator=gen, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    assert probes.linear_cka(a, 3.0 * a @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert probes.linear_cka(a, torch.randn(500, 30, generator=gen, dtype=torch.float64)) < 0.1
    with pytest.raises(ValueError, match="same N"):
        probes.linear_cka(a, a[:10])


def test_layer_outputs_name_every_linear_layer_of_an_mlp():
    model, x = models.MLP(6, (5, 4), 3), torch.randn(7, 6)
    outputs = probes.layer_outputs(model, x)
    assert {name: tuple(v.shape) for name, v in outputs.items()} == {"features.0": (7, 5), "features.2": (7, 4),
                                                                    "head": (7, 3)}
    assert torch.equal(outputs["head"], model(x).detach())


def test_layer_report_has_a_row_per_layer_and_patches_exactly_one_layer():
    report = ch01.layer_report(0, steps=20, **FAST)
    assert list(report.index) == ["features.0", "features.2", "head"]
    assert (report["relative weight change"] > 0).all()
    a, b = models.MLP(6, (5,), 3), models.MLP(6, (5,), 3)
    patched = ch01._with_layers(a, b.state_dict(), "head")
    assert torch.equal(patched.head.weight, b.head.weight)
    assert torch.equal(patched.features[0].weight, a.features[0].weight)


def test_layer_report_sees_no_change_when_nothing_moves():
    report = ch01.layer_report(0, steps=5, lr=1e-9, **FAST)
    before = report.attrs["task 1 before"]
    assert report.attrs["task 1 after"] == before
    assert (report["relative weight change"] < 1e-6).all()
    assert np.allclose(report["CKA before/after"], 1.0, atol=1e-4)
    assert (report["task 1, this layer restored"] == before).all()
    assert (report["task 1, only this layer changed"] == before).all()
