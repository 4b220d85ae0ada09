"""Model merging (chapter 10): the merge operations on hand-made state dicts, every merge against
``peft.utils.merge_utils`` on the same inputs, DARE's unbiasedness, argument checks, and the MLP's barrier."""

import math

import matplotlib
import pytest
import torch
from peft.utils import merge_utils

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


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_density_must_be_in_zero_one(density):
    base = _state(0)
    message = rf"density must be in \(0, 1\] \(the share of entries kept\), got {density}"
    with pytest.raises(ValueError, match=message):
        merging.ties_merge(base, [base], density)
    with pytest.raises(ValueError, match=message):
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
    with pytest.raises(ValueError, match=r"task_vectors\[0\] must have the same keys as base: missing \[\], "
                                         r"extra \['c'\]"):
        merging.ties_merge(base, [{**base, "c": base["b"]}], 0.5)
    with pytest.raises(ValueError, match=r"task_vectors\[0\]\['b'\] must have shape \(4,\) like base, got \(5,\)"):
        merging.dare_merge(base, [{"w": base["w"], "b": torch.zeros(5)}], 0.5)
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




# ---------------------------------------------------------------- trim counts and scope


def test_trim_keeps_exactly_floor_density_n_entries_per_tensor_or_over_the_whole_vector():
    gen = torch.Generator().manual_seed(0)
    tau = {"big": 10 + torch.rand(10, generator=gen), "small": torch.rand(30, generator=gen)}  # 40 entries
    per_tensor = merging.ties_trim(tau, 0.25, per_tensor=True)
    assert [int((per_tensor[k] != 0).sum()) for k in tau] == [2, 7]  # ⌊0.25·10⌋, ⌊0.25·30⌋
    whole = merging.ties_trim(tau, 0.25)
    assert int((whole["big"] != 0).sum()) == 10 and int((whole["small"] != 0).sum()) == 0  # the 10 largest of 40
    kept = per_tensor["small"][per_tensor["small"] != 0]
    assert kept.min() >= tau["small"].sort(descending=True).values[6]  # the largest ones survive, unchanged
    assert merging.ties_trim(tau, 1.0)["small"].equal(tau["small"])


def test_dare_at_p_zero_draws_nothing_as_peft_does_at_density_one():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert _same(merging.dare(_state(1), 0.0, gen), _state(1))
    assert torch.equal(gen.get_state(), state)


# ---------------------------------------------------------------- equal to PEFT's merge_utils on the same inputs

SHAPES = {"attn.weight": (12, 8), "attn.bias": (8,), "mlp.weight": (5, 3, 4), "scale": (1,)}


def _inputs(seed: int, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    taus = [{name: torch.randn(shape, generator=gen) * 0.1 for name, shape in SHAPES.items()} for _ in range(k)]
    return base, taus


def _peft_merge(base, taus, fn, lam, seed=None, **kwargs):
    """θ_0 + PEFT's merge of each tensor's task tensors, tensor by tensor in key order, weights λ."""
    if seed is not None:
        torch.manual_seed(seed)
    weights = torch.full((len(taus),), lam)
    return {k: base[k] + fn([t[k] for t in taus], weights, **kwargs) for k in base}


def _assert_equal_states(ours, theirs):
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("seed, lam", [(0, 1.0), (1, 0.4), (2, -0.7)])
def test_task_arithmetic_equals_peft(seed, lam):
    base, taus = _inputs(seed)
    _assert_equal_states(merging.task_arithmetic(base, taus, lam),
                         _peft_merge(base, taus, merge_utils.task_arithmetic, lam))


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize("seed, density, lam", [(0, 0.2, 1.0), (1, 0.5, 1.7), (2, 0.9, 0.6), (3, 1.0, 1.0)])
def test_ties_per_tensor_equals_peft(seed, density, lam):
    base, taus = _inputs(seed)
    _assert_equal_states(merging.ties_merge(base, taus, density, lam, per_tensor=True),
                         _peft_merge(base, taus, merge_utils.ties, lam, density=density))


def test_ties_on_one_tensor_is_the_same_either_way_and_differs_on_many():
    base, taus = _inputs(4)
    one = [{"attn.weight": t["attn.weight"]} for t in taus]
    base_one = {"attn.weight": base["attn.weight"]}
    _assert_equal_states(merging.ties_merge(base_one, one, 0.3), _peft_merge(base_one, one, merge_utils.ties, 1.0,
                                                                            density=0.3))
    assert not _same(merging.ties_merge(base, taus, 0.3), merging.ties_merge(base, taus, 0.3, per_tensor=True),
                     atol=1e-6)


@pytest.mark.parametrize("seed, p, lam", [(0, 0.5, 1.0), (1, 0.9, 0.8), (7, 0.3, 2.0)])
def test_dare_linear_equals_peft_with_the_same_seed(seed, p, lam):
    base, taus = _inputs(seed)
    theirs = _peft_merge(base, taus, merge_utils.dare_linear, lam, seed=seed, density=1 - p)
    _assert_equal_states(merging.dare_merge(base, taus, p, lam, seed=seed), theirs)
    assert not _same(merging.dare_merge(base, taus, p, lam, seed=seed + 1), theirs, atol=1e-6)  # the seed matters


@pytest.mark.parametrize("seed, p, lam", [(0, 0.5, 1.0), (1, 0.9, 0.8), (7, 0.3, 2.0)])
def test_dare_ties_equals_peft_with_the_same_seed(seed, p, lam):
    base, taus = _inputs(seed)
    theirs = _peft_merge(base, taus, merge_utils.dare_ties, lam, seed=seed, density=1 - p)
    _assert_equal_states(merging.dare_ties_merge(base, taus, p, lam, seed=seed), theirs)


def test_dare_ties_drops_then_keeps_only_the_elected_sign():
    base = {"w": torch.zeros(3)}
    taus = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([-4.0, 1.0, 3.0])}]
    # p = 0 drops nothing: the elected signs are −, −, + and the disjoint means −4, −2, 3
    assert torch.allclose(merging.dare_ties_merge(base, taus, 0.0)["w"], torch.tensor([-4.0, -2.0, 3.0]))


# ---------------------------------------------------------------- the MLP: barrier and linear paths (ch10)


def test_barrier_of_a_straight_line_is_zero_and_of_a_bump_is_its_height():
    assert ch10.barrier([1.0, 1.5, 2.0]) == pytest.approx(0.0)
    assert ch10.barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert ch10.barrier([0.9, 0.5, 0.9], higher_is_worse=False) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="values"):
        ch10.barrier([1.0])


SMALL = {"hidden": (16,), "pretrain_steps": 5, "steps": 3, "seed": 0}


def test_linear_path_ends_are_the_two_networks():
    stream = ch10.mnist_stream(2)
    a = ch10.random_init((16,), 0, torch.device("cpu"))
    b = ch10.random_init((16,), 1, torch.device("cpu"))
    sets = ch10.test_sets(stream)[1:2]
    path = ch10.linear_path(a, b, sets, (16,), n_points=5)
    assert list(path.alpha) == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert path.accuracy.iloc[0] == pytest.approx(ch10.evaluate(a, sets, (16,)).accuracy[0])
    assert path.loss.iloc[-1] == pytest.approx(ch10.evaluate(b, sets, (16,)).loss[0])
    with pytest.raises(ValueError, match="n_points"):
        ch10.linear_path(a, b, sets, (16,), n_points=1)


def test_mode_connectivity_paths_and_their_plot():
    paths = ch10.mode_connectivity(**SMALL)
    assert list(paths) == ["fine-tunes of θ0 (same task)", "from scratch, same init", "from scratch, different inits",
                           "fine-tunes of θ0 (tasks 1 and 2)"]
    assert all(len(p) == 11 and p.alpha.iloc[-1] == 1.0 for p in paths.values())
    fig = ch10.plot_paths(paths)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in acc_ax.get_lines()] == list(paths)
    for line, path in zip(acc_ax.get_lines(), paths.values()):
        assert list(line.get_ydata()) == pytest.approx(list(path.accuracy))
    assert acc_ax.get_ylim() == (0, 1) and loss_ax.get_ylabel() == "test loss"
