"""Knowledge editing: ROME's closed form is exact and minimal, the batch form contains it, arguments are checked."""

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_lab.chapters import ch11
from cl_lab.methods.editing import batch_update, finetune_on_fact, key_covariance, rome_edit, rome_update

matplotlib.use("Agg")


def _problem(seed: int, d_v: int = 4, d_k: int = 6, n_keys: int = 30):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_v, d_k, generator=gen, dtype=torch.float64)
    K = torch.randn(n_keys, d_k, generator=gen, dtype=torch.float64)  # [N, d_k] keys the layer must keep
    k_star = torch.randn(d_k, generator=gen, dtype=torch.float64)
    v_star = torch.randn(d_v, generator=gen, dtype=torch.float64)
    return W, K, k_star, v_star


def _least_squares_edit(W, K, k_star, v_star):
    """Reference by a different route: min ‖Δ Kᵀ‖² s.t. Δ k* = r, row by row, over the constraint's null space
    (δ = δ₀ + N z, δ₀ = r k*/‖k*‖², N ⟂ k*), each row an ordinary least-squares solve for z."""
    r = v_star - W @ k_star
    null = torch.linalg.svd(k_star[None, :]).Vh[1:].T  # [d_k, d_k − 1], columns ⟂ k*
    rows = []
    for r_i in r:
        particular = r_i * k_star / k_star.dot(k_star)
        z = torch.linalg.lstsq(K @ null, -(K @ particular)[:, None]).solution[:, 0]
        rows.append(particular + null @ z)
    return torch.stack(rows)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_constraint_holds_exactly_and_the_change_is_rank_one(seed):
    W, K, k_star, v_star = _problem(seed)
    C = key_covariance(K)
    W_hat = rome_edit(W, C, k_star, v_star)
    assert torch.allclose(W_hat @ k_star, v_star, atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(W_hat - W).item() == 1
    assert torch.equal(W, _problem(seed)[0])  # W itself is untouched


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_closed_form_is_the_minimum_change_solution(seed):
    W, K, k_star, v_star = _problem(seed)
    delta = rome_update(W, key_covariance(K), k_star, v_star)
    reference = _least_squares_edit(W, K, k_star, v_star)
    assert torch.allclose(delta, reference, atol=1e-8, rtol=1e-6)
    # any other Δ meeting the constraint disturbs the stored keys more
    gen = torch.Generator().manual_seed(seed + 1)
    null = torch.linalg.svd(k_star[None, :]).Vh[1:].T
    other = delta + torch.randn(W.shape[0], null.shape[1], generator=gen, dtype=W.dtype) @ null.T
    assert torch.allclose(other @ k_star, delta @ k_star, atol=1e-10)
    assert (other @ K.T).norm() > (delta @ K.T).norm()


def test_a_value_the_layer_already_writes_changes_nothing():
    W, K, k_star, _ = _problem(3)
    delta = rome_update(W, key_covariance(K), k_star, W @ k_star)
    assert torch.allclose(delta, torch.zeros_like(delta), atol=1e-12)


def test_keys_orthogonal_in_c_inverse_are_untouched():
    W, K, k_star, v_star = _problem(4)
    C = key_covariance(K)
    delta = rome_update(W, C, k_star, v_star)
    u = torch.linalg.solve(C, k_star)
    other = torch.linalg.svd(u[None, :]).Vh[1]  # a key with (C⁻¹k*)ᵀ k = 0
    assert torch.allclose(delta @ other, torch.zeros(W.shape[0], dtype=W.dtype), atol=1e-12)


def test_batch_form_reduces_to_the_single_edit_for_one_fact():
    W, K, k_star, v_star = _problem(5)
    C = key_covariance(K)
    single = rome_update(W, C, k_star, v_star)
    assert torch.allclose(batch_update(W, C, k_star[None], v_star[None], mode="exact"), single, atol=1e-12)
    # MEMIT's soft form is the same direction, shrunk by s / (1 + s) with s = k*ᵀ C⁻¹ k* (Sherman–Morrison)
    s = k_star @ torch.linalg.solve(C, k_star)
    memit = batch_update(W, C, k_star[None], v_star[None], mode="memit")
    assert torch.allclose(memit, single * s / (1 + s), atol=1e-12)


def test_exact_batch_meets_every_constraint():
    W, K, _, _ = _problem(6, d_k=8)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(5, 8, generator=gen, dtype=W.dtype), torch.randn(5, 4, generator=gen, dtype=W.dtype)
    W_hat = W + batch_update(W, key_covariance(K), keys, values, mode="exact")
    assert torch.allclose(keys @ W_hat.T, values, atol=1e-10)


def test_float32_on_the_layers_device_and_dtype():
    W, K, k_star, v_star = (t.float() for t in _problem(7))
    delta = rome_update(W, key_covariance(K), k_star, v_star)
    assert delta.dtype == torch.float32 and delta.device == W.device
    assert torch.allclose((W + delta) @ k_star, v_star, atol=1e-4)


def test_arguments_are_checked_with_their_shapes_named():
    W, K, k_star, v_star = _problem(8)
    C = key_covariance(K)
    with pytest.raises(ValueError, match=r"k_star must have d_k = 6"):
        rome_update(W, C, k_star[:5], v_star)
    with pytest.raises(ValueError, match=r"v_star must have d_v = 4"):
        rome_update(W, C, k_star, torch.ones(3, dtype=W.dtype))
    with pytest.raises(ValueError, match=r"C must be \[d_k, d_k\] = \[6, 6\]"):
        rome_update(W, C[:5, :5], k_star, v_star)
    with pytest.raises(ValueError, match="W must have 2 dimension"):
        rome_update(W[0], C, k_star, v_star)
    with pytest.raises(TypeError, match="k_star must be a torch.Tensor"):
        rome_update(W, C, k_star.tolist(), v_star)
    with pytest.raises(ValueError, match="k_star must be a non-zero key"):
        rome_update(W, C, torch.zeros_like(k_star), v_star)
    with pytest.raises(ValueError, match=r"keys must be \[N, d_k = 6\]"):
        batch_update(W, C, K[:3, :5], torch.ones(3, 4, dtype=W.dtype))
    with pytest.raises(ValueError, match="mode must be one of"):
        batch_update(W, C, K[:1], torch.ones(1, 4, dtype=W.dtype), mode="rome")
    with pytest.raises(ValueError, match="at most d_k = 6 edits"):
        batch_update(W, C, K[:7], torch.ones(7, 4, dtype=W.dtype), mode="exact")
    with pytest.raises(ValueError, match="ridge must be ≥ 0"):
        key_covariance(K, ridge=-1.0)


def test_singular_covariance_is_refused_and_a_ridge_fixes_it():
    W, K, k_star, v_star = _problem(9)
    few = K[:3]  # 3 keys in 6 dimensions: C has rank 3
    with pytest.raises(ValueError, match="ridge"):
        rome_update(W, key_covariance(few), k_star, v_star)
    W_hat = rome_edit(W, key_covariance(few, ridge=1e-3), k_star, v_star)
    assert torch.allclose(W_hat @ k_star, v_star, atol=1e-9)


def test_finetune_stops_once_the_fact_is_learned():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.full((5,), 2)
    finetune_on_fact(model, x, y, steps=200, lr=0.1)
    assert (model(x).argmax(-1) == y).all() and 0 < model.steps_taken < 200
    with pytest.raises(ValueError, match="same N"):
        finetune_on_fact(model, x, y[:2])


@pytest.fixture(scope="module")
def small():
    task = ch11.make_facts(n_subjects=40, n_train=3, n_para=2, seed=0)
    model = ch11.train_facts(task, key_dim=32, steps=60)
    return task, {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_value_targets_and_the_three_axes(small):
    task, state = small
    model = ch11.load_model(task, state)
    ids = torch.tensor([0, 1])
    new = ch11.new_objects_for(task, ids)
    assert (new != task.objects[ids]).all()
    values = ch11.value_targets(model, task, ids, new)
    with torch.no_grad():
        assert (model.logits_from_value(task.x_train[ids], values[:, None]).argmax(-1) == new[:, None]).all()
    before = ch11.predictions(model, task)
    axes = ch11.three_axes(before, before, ids, task.objects[ids])
    assert axes == {"reliability": 1.0, "generalisation": axes["generalisation"], "locality": 1.0}
    with pytest.raises(ValueError, match="n_objects"):
        ch11.make_facts(n_objects=1)


def test_edit_sequence_rows_and_limits(small):
    task, state = small
    table = ch11.edit_sequence(task, state, 6, (1, 3))
    assert set(table.method) == set(ch11.SEQUENTIAL_METHODS)
    one = table[table.edits == 1].set_index("method")
    axes = ["reliability", "generalisation", "locality"]
    assert one.loc["sequential ROME", axes].equals(one.loc["batch (exact)", axes])  # one edit: the same Δ
    assert one.loc["sequential ROME", "‖ΔW‖ / ‖W‖"] == pytest.approx(one.loc["batch (exact)", "‖ΔW‖ / ‖W‖"])
    with pytest.raises(ValueError, match="n_edits"):
        ch11.edit_sequence(task, state, 30)


def test_edits_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch11.edits_point, ch11.plot_edits_point,
                           fixed={"n_subjects": 40, "key_dim": 32, "train_steps": 20},
                           n_edits=w.IntSlider(value=4, min=1, max=8), memit_weight=w.FloatSlider(value=1.0))
    slider = widget.children[0]
    slider.value = 2
    assert widget.result["n_edits"] == 2 and set(widget.result["table"].index) == set(ch11.SEQUENTIAL_METHODS)
    slider.value = 4
    assert widget.cache.hits == 1 and len(widget.figures) == 3
