"""Chapter 02/03 widget callbacks and helpers, headless: set a slider, read the result and the figure."""

from unittest import mock

import ipywidgets as w
import numpy as np
import pytest
import torch

from cl_lab import widgets
from cl_lab.chapters import ch02, ch03
from cl_lab.fisher import ESTIMATES

SMALL = dict(hidden=(8,), steps=5, seed=0)


def _slider(widget, description):
    return next(c for c in widget.children if getattr(c, "description", None) == description)


def test_lambda_widget_answers_and_caches():
    with mock.patch("matplotlib.pyplot.show"):
        fixed = dict(scenario="domain", curve_lams=(0.0,), **SMALL)
        widget = widgets.sweep(ch02.sweep_point, ch02.plot_sweep, fixed=fixed,
                               lam=widgets.log_slider("λ", 1e-1, 1e10, 1e4),
                               estimate=w.Dropdown(options=ESTIMATES, value="exact", description="Fisher"))
        _slider(widget, "λ").value = 1e6
        _slider(widget, "Fisher").value = "batch_squared"
        hits = widget.cache.hits
        _slider(widget, "λ").value = 1e4
        _slider(widget, "λ").value = 1e6  # seen before: served from the cache
    assert widget.cache.hits > hits
    point = widget.result["point"]
    assert point["lam"] == pytest.approx(1e6) and point["estimate"] == "batch_squared"
    assert 0 <= point["old"] <= 1 and 0 <= point["new"] <= 1
    assert widget.figures and widget.figures[-1].axes


def test_c_widget_answers():
    with mock.patch("matplotlib.pyplot.show"):
        fixed = dict(scenario="domain", curve_cs=(0.0,), **SMALL)
        widget = widgets.sweep(ch03.c_sweep_point, ch03.plot_c_sweep, fixed=fixed,
                               c=widgets.log_slider("c", 1e-2, 1e4, 10.0))
        _slider(widget, "c").value = 100.0
    assert widget.result["point"]["c"] == pytest.approx(100.0)
    assert widget.figures[-1].axes


def test_lambda_point_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lam must be ≥ 0"):
        ch02.lambda_point(-1.0, **SMALL)
    with pytest.raises(ValueError, match="estimate must be one of"):
        ch02.lambda_point(1.0, "true", **SMALL)
    with pytest.raises(ValueError, match="c must be ≥ 0"):
        ch03.c_point(-1.0, **SMALL)


def test_toy_full_quadratic_matches_loss_near_optimum_and_kl():
    land = ch02.toy_landscape(rho=0.9, resolution=5)
    direction = torch.tensor([0.6, 0.8])
    kl = ch02.kl_vs_quadratic(land, direction, np.array([0.01]))
    assert kl["kl"][0] == pytest.approx(kl["quadratic"][0], rel=0.02)


def test_summed_batch_recipe_is_predicted_fisher_at_batch_one_and_grows_with_b():
    from cl_lab import fisher, models

    torch.manual_seed(0)
    model = models.MLP(20, (16,), 5)
    x = torch.randn(64, 20) + 0.5  # a shared offset: the mean gradient is not zero
    predicted = fisher.flatten(fisher.fisher_diagonal(model, x, estimate="predicted")).sum().item()
    assert ch02.summed_batch_recipe(model, x, 1) == pytest.approx(predicted, rel=1e-5)
    assert ch02.summed_batch_recipe(model, x, 64) > ch02.summed_batch_recipe(model, x, 8) > predicted
    with pytest.raises(ValueError, match="batch_size"):
        ch02.summed_batch_recipe(model, x, 0)


def test_empirical_vs_exact_agree_untrained_and_part_once_the_model_has_fitted_its_samples():
    table = ch02.empirical_vs_exact((0, 800), hidden=(32,), n_samples=200)
    ratio = table.pivot(index="steps", columns="samples", values="empirical / exact")
    assert list(ratio.columns) == ["held-out", "training"]
    assert 0.8 <= ratio.loc[0, "training"] <= 1.25  # near-uniform p: any label is as likely as a sampled one
    assert ratio.loc[800, "training"] < 0.5 * ratio.loc[0, "training"]  # fitted samples: ε² against ε
    with pytest.raises(ValueError, match="label_noise must be in \\[0, 1\\]"):
        ch02.empirical_vs_exact((0,), label_noise=1.5)


def test_mean_top_probability_is_one_over_c_for_a_constant_model_and_near_one_for_a_sure_one():
    model = torch.nn.Linear(4, 5)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    assert ch03.mean_top_probability(model, torch.randn(10, 4)) == pytest.approx(0.2)
    with torch.no_grad():
        model.bias[2] = 50.0
    assert ch03.mean_top_probability(model, torch.randn(10, 4)) == pytest.approx(1.0)


def test_label_sorted_prefix_holds_the_first_labels_and_a_random_draw_does_not():
    stream = ch02.two_task_stream("domain")
    task = stream.tasks[0]
    _, y, _ = ch02.label_sorted_prefix(task, 500)
    assert y.unique().tolist() == [0, 1]  # 400 zeros, then ones
    assert len(task.sample(500, seed=0)[1].unique()) == len(task.classes)


def test_fisher_sample_bias_the_sorted_prefix_lands_further_than_random_draws():
    stream, model = ch02.after_first_task("domain", (16,), 60, 0)
    bias = ch02.fisher_sample_bias(model, stream, n=300, seeds=(0, 1, 2))
    prefix, draws = bias.iloc[0], bias.iloc[1:]
    assert prefix["classes"] == 1 and (draws["classes"] == 5).all()
    assert prefix["relative L2 error"] > draws["relative L2 error"].max()
    whole = ch02.fisher_sample_bias(model, stream, n=len(stream.tasks[0].y_train), seeds=(0,))
    assert whole.iloc[1]["relative L2 error"] < 1e-5 and whole.iloc[1]["mass"] == pytest.approx(1.0, rel=1e-5)


def test_backward_calls_counts_grad_and_backward():
    x = torch.ones(3, requires_grad=True)
    assert ch02.backward_calls(lambda: None) == 0

    def twice():
        torch.autograd.grad((x ** 2).sum(), x)
        (x ** 3).sum().backward()

    assert ch02.backward_calls(twice) == 2
    assert x.grad is not None and torch.allclose(x.grad, 3 * torch.ones(3))  # the real backward still ran


def test_floats_held_counts_every_reachable_tensor_once():
    class Holder:
        def __init__(self):
            shared = torch.zeros(4)
            self.a = [{"w": torch.zeros(2, 3), "b": shared}, (shared, torch.zeros(5))]
            self.n = 7
            self.ids = torch.zeros(9, dtype=torch.long)  # not floats

    assert ch02.floats_held(Holder()) == 6 + 4 + 5


def test_consolidation_costs_count_the_backward_passes():
    costs = ch03.consolidation_costs(hidden=(8,), n_samples=50, repeats=1)
    assert costs["backward passes"].to_dict() == {"SI": 0, "EWC (exact Fisher)": 5, "MAS": 1}
    assert (costs["ms (best of interleaved runs)"] > 0).all()
