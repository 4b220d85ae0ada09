"""Knowledge editing's algebra: ROME's closed form is exact and minimal, MEMIT's contains it, arguments are checked."""

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_lab.methods.editing import key_covariance, memit_update, rome_update

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
    W_hat = W + rome_update(W, C, k_star, v_star)
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


def test_memit_with_one_edit_is_rome_shrunk_by_s_over_1_plus_s():
    W, K, k_star, v_star = _problem(5)
    C = key_covariance(K)
    single = rome_update(W, C, k_star, v_star)
    memit = memit_update(C, k_star[None], (v_star - W @ k_star)[None])
    s = k_star @ torch.linalg.solve(C, k_star)  # Sherman–Morrison: (C + k kᵀ)⁻¹ k = C⁻¹k / (1 + s)
    assert torch.allclose(memit, single * s / (1 + s), atol=1e-12)


def test_memit_is_the_minimum_of_its_soft_objective():
    W, K, _, _ = _problem(6, d_k=8)
    C = key_covariance(K)
    gen = torch.Generator().manual_seed(0)
    keys, residuals = torch.randn(5, 8, generator=gen, dtype=W.dtype), torch.randn(5, 4, generator=gen, dtype=W.dtype)
    delta = memit_update(C, keys, residuals)

    def objective(d):
        return torch.trace(d @ C @ d.T) + ((keys @ d.T - residuals) ** 2).sum()

    for _ in range(5):  # any other Δ costs more
        assert objective(delta + 1e-3 * torch.randn(delta.shape, generator=gen, dtype=W.dtype)) > objective(delta)
    # a heavy weight on the preserved keys shrinks the edit towards 0; a light one meets the constraints
    assert memit_update(1e6 * C, keys, residuals).abs().max() < 1e-4
    assert torch.allclose(keys @ memit_update(1e-9 * C, keys, residuals).T, residuals, atol=1e-5)


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
    with pytest.raises(ValueError, match=r"C must be \[d_k, d_k\] = \[5, 5\]"):
        memit_update(C, K[:3, :5], torch.ones(3, 4, dtype=W.dtype))
    with pytest.raises(ValueError, match="same N"):
        memit_update(C, K[:0], torch.ones(0, 4, dtype=W.dtype))
    with pytest.raises(ValueError, match="ridge must be ≥ 0"):
        key_covariance(K, ridge=-1.0)


def test_singular_covariance_is_refused_and_a_ridge_fixes_it():
    W, K, k_star, v_star = _problem(9)
    few = K[:3]  # 3 keys in 6 dimensions: C has rank 3
    with pytest.raises(ValueError, match="ridge"):
        rome_update(W, key_covariance(few), k_star, v_star)
    W_hat = W + rome_update(W, key_covariance(few, ridge=1e-3), k_star, v_star)
    assert torch.allclose(W_hat @ k_star, v_star, atol=1e-9)


# ---------------------------------------------------------------- chapter 11's helpers on the default tiny LM

@pytest.fixture(scope="module")
def lab():
    from cl_lab import lm
    return lm.tiny_lm(0, progress=False)


def _trace(values):
    from cl_lab.lm import tracing
    p = torch.tensor(values, dtype=torch.float32)[None]  # [1, L, T]
    tokens = [["<bos>", "A", "B", "x", "y"]]
    return tracing.Trace("mlp", 1, 1.0, list(range(p.shape[1])), tokens, [(1, 3)], torch.tensor([0.9]),
                         torch.tensor([0.1]), p)


def test_known_facts_are_a_seeded_draw_of_recalled_facts(lab):
    from cl_lab.chapters import ch11
    from cl_lab.lm.evaluate import hits
    facts = ch11.known_facts(lab, 20, seed=1)
    assert len(set(facts)) == 20 and facts == ch11.known_facts(lab, 20, seed=1) != ch11.known_facts(lab, 20, seed=2)
    assert hits(lab.model, lab.tokenizer, facts).all()
    with pytest.raises(ValueError, match="n must be at most"):
        ch11.known_facts(lab, 10_000)


def test_fact_site_is_the_largest_average_mlp_effect():
    from cl_lab.chapters import ch11
    nan = float("nan")
    trace = _trace([[nan, 0.1, 0.2, 0.1, 0.3], [nan, 0.1, 0.1, 0.1, 0.7]])  # layer 1, last token: 0.6
    assert ch11.fact_site({"mlp": trace}) == ("last token", 1)


def test_collapse_point_and_row_at_read_the_many_edits_table():
    import pandas as pd

    from cl_lab.chapters import ch11
    table = pd.DataFrame({"method": ["before", "m", "m", "m"], "edits": [0, 1, 10, 100],
                          "other facts": [0.9, 0.8, 0.44, 0.2], "perplexity": [4.0, 4.0, 4.1, 6.0]})
    assert ch11.collapse_point(table, "m") == 10  # first below half of 0.9
    assert ch11.collapse_point(table, "m", "other facts", 0.1) is None
    assert ch11.row_at(table, "m", 50).edits == 10
    with pytest.raises(ValueError, match="n must reach"):
        ch11.row_at(table, "m", 0)


def test_many_edits_rows_and_sequential_methods(lab):
    from cl_lab.chapters import ch11
    from cl_lab.lm import rome
    covs = rome.layer_covariances(lab.model, lab.tokenizer, lab.world.pretraining_texts()[::4])
    edits = rome.world_edits(lab.world, 3, seed=5)
    weights = {n: p.clone() for n, p in lab.model.named_parameters()}
    table = ch11.many_edits(lab, edits, covs, rome_layer=0, memit_layers=(2, 3), checkpoints=(1, 3))
    assert all(torch.equal(p, weights[n]) for n, p in lab.model.named_parameters())  # the lab's model untouched
    assert list(table.method) == ["before"] + [m for m in ch11.MANY_METHODS for _ in (1, 3)]
    assert table.loc[table.method == "before", "efficacy"].item() == 0
    assert (table[table.method != "before"].efficacy > 0).all()  # every method makes some of its edits


def test_plots_draw_what_they_say(lab):
    import matplotlib.pyplot as plt
    import pandas as pd

    from cl_lab.chapters import ch11
    nan = float("nan")
    traces = {s: _trace([[nan, 0.1, 0.2, 0.1, 0.3], [nan, 0.1, 0.1, 0.1, 0.7]]) for s in ("hidden", "mlp", "attn")}
    fig = ch11.plot_traces(traces)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["restore hidden state", "restore MLP output",
                                                        "restore attention output"]
    table = traces["hidden"].by_category()  # rows: position classes, columns: layers
    assert len(fig.axes[0].images) == 1 and fig.axes[0].images[0].get_array().shape == table.shape
    sweep = pd.DataFrame({"token": ["last", "last"], "layer": [0, 1], "efficacy": [1.0, 1.0], "paraphrase": [1.0, 0.9],
                          "neighbourhood": [0.8, 0.9], "score": [0.9, 0.95]}).set_index(["token", "layer"])
    fig = ch11.plot_layer_sweep(sweep, traces)
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]
    many = pd.DataFrame({"method": ["before", "a", "a"], "edits": [0, 1, 5], "efficacy": [0, 1, 1],
                         "paraphrase": [0, 1, 1], "other facts": [1, 0.9, 0.5], "perplexity": [4, 4, 5]})
    fig = ch11.plot_many_edits(many)
    assert [ax.get_title() for ax in fig.axes] == ["efficacy", "paraphrase", "other facts", "perplexity"]
    assert len(fig.axes[2].lines) == 2  # method + the level before editing
    plt.close("all")


def test_edit_point_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets
    from cl_lab.chapters import ch11

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch11.edit_point, ch11.plot_edit_point, fixed={"seed": 0},
                           layer=w.IntSlider(value=2, min=0, max=3), n_edits=w.SelectionSlider(options=[1, 2], value=1))
    layer, n_edits = widget.children[:2]
    n_edits.value = 2
    assert widget.result["n_edits"] == 2 and widget.result["after"]["efficacy"] > widget.result["before"]["efficacy"]
    layer.value = 3
    assert widget.result["layer"] == 3
    layer.value = 2
    assert widget.cache.hits == 1 and len(widget.figures) == 4
    with pytest.raises(ValueError, match=r"layers must be layer indices in 0\.\.3, got \[9\]"):
        ch11.edit_point(9, 1)


def test_real_trace_plot_shows_both_tokens_and_both_sites():
    import matplotlib.pyplot as plt

    from cl_lab.chapters import ch11
    from cl_lab.lm import tracing
    p = torch.rand(1, 3, 6)
    trace = tracing.Trace("hidden", 1, 1.0, [0, 3, 6], [["The", " E", "iffel", " Tower", " in", " of"]], [(1, 4)],
                          torch.tensor([0.7]), torch.tensor([0.04]), p)
    mlp = tracing.Trace("mlp", 10, 1.0, [0, 3, 6], trace.tokens, trace.spans, trace.p_clean, trace.p_corrupt, p)
    fig = ch11.plot_real_trace({"name": "a model", "traces": {"hidden": trace, "mlp": mlp}})
    assert [ax.get_title() for ax in fig.axes] == ["restore hidden state", "restore MLP output"]
    assert fig.axes[1].get_xlabel() == "layer (window 10)"
    lines = fig.axes[0].lines
    assert len(lines) == 4 and list(lines[0].get_ydata()) == p[0, :, 3].tolist()  # last subject token ' Tower'
    assert list(lines[1].get_ydata()) == p[0, :, 5].tolist()  # last token
    plt.close("all")
