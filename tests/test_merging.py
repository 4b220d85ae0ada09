"""Model merging (chapter 10): the merge operations on hand-made state dicts, DARE's unbiasedness, argument
checks, the barrier, and the playground callback."""

import math

import matplotlib
import numpy as np
import pytest
import torch

from cl_lab.chapters import ch10
from cl_lab.methods import merging

matplotlib.use("Agg")


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_averaging_identical_models_returns_the_model():
    theta = _state(0)
    assert _same(merging.average([theta, theta, theta]), theta, atol=1e-6)
    assert _same(merging.average([theta]), theta)


def test_average_is_the_mean_and_takes_weights():
    a, b = _state(0), _state(1)
    assert _same(merging.average([a, b]), {k: (a[k] + b[k]) / 2 for k in a}, atol=1e-6)
    assert _same(merging.average([a, b], weights=[1.0, 0.0]), a, atol=1e-7)


def test_task_arithmetic_at_lambda_zero_returns_theta0_and_soup_is_lambda_one_over_k():
    base, fts = _state(0), [_state(1), _state(2), _state(3)]
    taus = [merging.task_vector(ft, base) for ft in fts]
    assert _same(merging.task_arithmetic(base, taus, 0.0), base)
    assert _same(merging.task_arithmetic(base, taus, 1 / 3), merging.average(fts), atol=1e-6)
    assert _same(merging.task_arithmetic(base, taus[:1], 1.0), fts[0], atol=1e-6)  # θ0 + τ = θ_ft


def test_negation_undoes_addition_and_flips_the_sign():
    base, ft = _state(0), _state(1)
    tau = merging.task_vector(ft, base)
    neg = merging.negate(tau)
    assert _same(neg, {k: -v for k, v in tau.items()})
    assert _same(merging.task_arithmetic(ft, [neg], 1.0), base, atol=1e-6)
    assert _same(merging.negate(neg), tau)


def test_inputs_are_not_modified():
    base, ft = _state(0), _state(1)
    copies = [{k: v.clone() for k, v in s.items()} for s in (base, ft)]
    tau = merging.task_vector(ft, base)
    merging.ties_merge(base, [tau, merging.negate(tau)], 0.5, 1.0)
    merging.dare_merge(base, [tau], 0.5)
    merging.wise_ft(base, ft, 0.3)
    assert _same(base, copies[0]) and _same(ft, copies[1])


def test_ties_trim_elect_and_disjoint_mean_on_a_hand_made_example():
    # three task vectors over four parameters
    t1 = {"w": torch.tensor([4.0, -1.0, 0.5, 2.0])}
    t2 = {"w": torch.tensor([-3.0, -2.0, 0.1, 3.0])}
    t3 = {"w": torch.tensor([-2.0, 5.0, -0.2, -1.0])}
    # density 0.5 keeps the two largest magnitudes of each vector
    trimmed = [merging.ties_trim(t, 0.5) for t in (t1, t2, t3)]
    assert torch.equal(trimmed[0]["w"], torch.tensor([4.0, 0.0, 0.0, 2.0]))
    assert torch.equal(trimmed[1]["w"], torch.tensor([-3.0, 0.0, 0.0, 3.0]))
    assert torch.equal(trimmed[2]["w"], torch.tensor([-2.0, 5.0, 0.0, 0.0]))
    # sums: 4 − 3 − 2 = −1 → −; 5 → +; 0 → 0; 2 + 3 = 5 → +
    sign = merging.elect_sign(trimmed)
    assert torch.equal(sign["w"], torch.tensor([-1.0, 1.0, 0.0, 1.0]))
    # disjoint mean: param 0 averages the agreeing −3 and −2 (not the +4); param 3 averages 2 and 3
    merged = merging.disjoint_mean(trimmed, sign)
    assert torch.allclose(merged["w"], torch.tensor([-2.5, 5.0, 0.0, 2.5]))
    base = {"w": torch.ones(4)}
    out = merging.ties_merge(base, [t1, t2, t3], density=0.5, lam=2.0)
    assert torch.allclose(out["w"], torch.tensor([-4.0, 11.0, 1.0, 6.0]))


def test_ties_at_full_density_with_agreeing_vectors_is_their_mean():
    base = _state(0)
    tau = {k: v.abs() for k, v in _state(1).items()}
    tau2 = {k: 3 * v for k, v in tau.items()}
    out = merging.ties_merge(base, [tau, tau2], density=1.0, lam=1.0)
    assert _same(out, {k: base[k] + 2 * tau[k] for k in base}, atol=1e-6)


def test_dare_keeps_the_expected_task_vector_and_its_drop_rate():
    tau = {"w": torch.linspace(-1, 1, 200).reshape(2, 100)}
    p = 0.7
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([merging.dare(tau, p, gen)["w"] for _ in range(3000)])  # [3000, 2, 100]
    dropped = (draws == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=0.01)
    survivors = draws[draws != 0]
    kept_value = draws / tau["w"]  # every survivor is scaled by exactly 1/(1 − p)
    assert torch.allclose(kept_value[draws != 0], torch.full_like(survivors, 1 / (1 - p)), atol=1e-4)
    # E[DARE(τ)] = τ: the mean over 3,000 draws is within a few standard errors, sqrt(p / (1 − p) / 3000) ≈ 2.8 %
    mean = draws.mean(0)
    assert (mean - tau["w"]).abs().mean().item() < 0.05 * tau["w"].abs().mean().item()
    assert (mean - tau["w"]).abs().mean().item() > 0  # random, not a copy
    assert _same(merging.dare(tau, 0.0), tau)


def test_dare_is_reproducible_with_a_seed():
    base, tau = _state(0), merging.task_vector(_state(1), _state(0))
    assert _same(merging.dare_merge(base, [tau], 0.5, seed=3), merging.dare_merge(base, [tau], 0.5, seed=3))
    assert not _same(merging.dare_merge(base, [tau], 0.5, seed=3), merging.dare_merge(base, [tau], 0.5, seed=4))


def test_wise_ft_ends_and_middle():
    base, ft = _state(0), _state(1)
    assert _same(merging.wise_ft(base, ft, 0.0), base)
    assert _same(merging.wise_ft(base, ft, 1.0), ft)
    assert _same(merging.wise_ft(base, ft, 0.5), merging.average([base, ft]), atol=1e-6)


def test_cosine_similarity():
    tau = merging.task_vector(_state(1), _state(0))
    assert merging.cosine_similarity(tau, tau) == pytest.approx(1.0, abs=1e-6)
    assert merging.cosine_similarity(tau, merging.negate(tau)) == pytest.approx(-1.0, abs=1e-6)
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
    assert merging.cosine_similarity(a, b) == pytest.approx(0.0)


@pytest.mark.parametrize("lam", [math.nan, math.inf, "1", True])
def test_lambda_must_be_a_finite_number(lam):
    base = _state(0)
    with pytest.raises((ValueError, TypeError), match="lam"):
        merging.task_arithmetic(base, [base], lam)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_must_be_in_zero_one(density):
    base = _state(0)
    with pytest.raises(ValueError, match="density"):
        merging.ties_merge(base, [base], density)
    with pytest.raises(ValueError, match="density"):
        merging.ties_trim(base, density)


@pytest.mark.parametrize("p", [1.0, -0.1, 2.0])
def test_drop_rate_must_be_in_zero_one_open(p):
    with pytest.raises(ValueError, match="p must be in"):
        merging.dare(_state(0), p)


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_alpha_must_be_in_zero_one(alpha):
    with pytest.raises(ValueError, match="alpha"):
        merging.wise_ft(_state(0), _state(1), alpha)


def test_mismatched_keys_and_shapes_are_named():
    base = _state(0)
    with pytest.raises(ValueError, match=r"task_vectors\[1\].*missing \['b'\]"):
        merging.task_arithmetic(base, [base, {"w": base["w"]}], 1.0)
    with pytest.raises(ValueError, match=r"states\[1\]\['w'\].*shape \(4, 3\)"):
        merging.average([base, {"w": torch.zeros(3, 4), "b": base["b"]}])
    with pytest.raises(ValueError, match="finetuned"):
        merging.task_vector({"w": base["w"], "extra": base["b"]}, base)
    with pytest.raises(ValueError, match="task_vectors"):
        merging.task_arithmetic(base, [], 1.0)
    with pytest.raises(TypeError, match="task_vectors"):
        merging.task_arithmetic(base, base, 1.0)
    with pytest.raises(ValueError, match="weights"):
        merging.average([base, base], weights=[0.5, 0.6])


def test_barrier_of_a_straight_line_is_zero_and_of_a_bump_is_its_height():
    assert ch10.barrier([1.0, 1.5, 2.0]) == pytest.approx(0.0)
    assert ch10.barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert ch10.barrier([0.9, 0.5, 0.9], higher_is_worse=False) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="values"):
        ch10.barrier([1.0])


SMALL = {"hidden": (16,), "pretrain_steps": 5, "steps": 3, "n_tasks": 2, "seed": 0}


def test_merge_point_and_its_plot():
    result = ch10.merge_point(lam=0.5, density=0.2, **SMALL)
    assert result["task arithmetic"].shape == (3,) and result["TIES"].shape == (3,)
    assert np.all((0 <= result["TIES"]) & (result["TIES"] <= 1))
    assert ch10.plot_merge_point(result) is not None
    zero = ch10.merge_point(lam=0.0, density=0.2, **SMALL)
    setup = ch10.build_setup(**SMALL)
    assert np.allclose(zero["task arithmetic"], setup.test(setup.base))  # λ = 0 is θ0
    with pytest.raises(ValueError, match="density"):
        ch10.merge_point(lam=1.0, density=0.0, **SMALL)


def test_merge_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch10.merge_point, ch10.plot_merge_point, fixed=SMALL,
                           lam=w.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.1),
                           density=w.FloatSlider(value=0.2, min=0.1, max=1.0, step=0.1))
    lam_slider = widget.children[0]
    lam_slider.value = 1.2
    assert widget.result["lam"] == pytest.approx(1.2)
    lam_slider.value = 0.8
    assert widget.cache.hits == 1 and len(widget.figures) == 3


def test_merged_accuracy_matrix_first_row_is_the_first_fine_tune():
    setup = ch10.build_setup(**SMALL)
    R = ch10.merged_accuracy_matrix(setup, lam=1.0)
    assert R.shape == (2, 2)
    assert np.allclose(R[0], setup.test(setup.finetuned[0])[1:])
    summary = ch10.cl_summary({"merge": R})
    assert set(summary.columns) == {"AA", "BWT"}
