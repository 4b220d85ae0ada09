"""Chapter 12: the DPO loss, the KL penalty and its Fisher quadratic, the MNIST update, the chapter's LM helpers,
figures and playground, and argument checks."""

import math

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

from cl_lab.chapters import ch12
from cl_lab.lm import align, nulls, tiny_lm
from cl_lab.methods.alignment import dpo_loss, fisher_quadratic, full_fisher, kl_along, kl_to_reference

matplotlib.use("Agg")
TINY = dict(n_layer=1, n_head=2, n_embd=32, n_subjects=20, n_general=100, n_general_test=20, steps=30,
            batch_size=16)


def _tiny(seed=0, n_out=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out))


@pytest.fixture(scope="module")
def chain():
    lab = tiny_lm(0, progress=False, use_cache=False, **TINY)
    data = align.alignment_data(lab.world, n_sft_subjects=10, seed=0)
    model = align.sft(lab, data, steps=3, batch_size=8)
    holdout = nulls.hold_out(lab.world, 3, seed=0, among=data.heldout_subjects)
    probe = align.Probe(lab, data, model, n_facts=40, n_texts=10, unseen=holdout.facts)
    return ch12.LMChain(lab, data, model, probe, probe(lab.model), probe(model), holdout)


def test_dpo_loss_by_hand():
    # margin = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1; β = 0.5: loss = −log σ(0.5) = log(1 + e^−0.5)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)


@pytest.mark.parametrize("direction", ["policy||ref", "ref||policy"])
def test_kl_penalty_is_zero_with_zero_gradient_at_the_reference(direction):
    torch.manual_seed(1)
    ref_logits = torch.randn(8, 5)
    logits = ref_logits.clone().requires_grad_(True)
    kl = kl_to_reference(logits, ref_logits, direction)
    (grad,) = torch.autograd.grad(kl, logits)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    assert grad.abs().max().item() < 1e-7
    assert kl_to_reference(ref_logits + torch.randn(8, 5), ref_logits, direction).item() > 0


def test_fisher_quadratic_equals_the_explicit_full_fisher():
    model, x = _tiny(), torch.randn(7, 3)
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    flat = torch.cat([d.reshape(-1) for d in delta.values()])
    explicit = 0.5 * flat @ full_fisher(model, x) @ flat
    assert fisher_quadratic(model, delta, x) == pytest.approx(explicit.item(), rel=1e-4)


def test_quadratic_error_shrinks_as_the_step_shrinks():
    model, x = _tiny(3).double(), torch.randn(20, 3, dtype=torch.float64)  # float32 KLs of tiny steps are noise
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    errors = []
    for t in (0.3, 0.03, 0.003):
        kl, quad = kl_along(model, delta, x, t), fisher_quadratic(model, delta, x, t)
        errors.append(abs(kl - quad) / quad)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.002
    # both KL directions agree with the same quadratic to second order
    assert kl_along(model, delta, x, 0.01, "policy||ref") == pytest.approx(fisher_quadratic(model, delta, x, 0.01),
                                                                         rel=0.02)


def test_mnist_update_and_seeded_test_sample():
    pre, sft_model = ch12.mnist_sft_update(hidden=(8,), pretrain_steps=5, sft_steps=5)
    assert not all(torch.equal(a, b) for a, b in zip(pre.parameters(), sft_model.parameters()))
    sample = ch12.mnist_test_sample(200, seed=0)
    assert torch.equal(sample, ch12.mnist_test_sample(200, seed=0))
    assert torch.equal(ch12.mnist_test_sample(200, seed=0, inverted=True), 1 - sample)
    y = ch12.mnist().y_test
    labels = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:200]]
    assert set(labels.tolist()) == set(range(10))  # a fair draw, not the digits of a sorted prefix
    table = ch12.kl_versus_quadratic(pre, sft_model, sample[:50], scales=(0.01, 1.0))
    assert table.loc[0.01, "KL / full quadratic"] == pytest.approx(1.0, abs=0.02)


# --- the LM chain ----------------------------------------------------------------------------------------------

def test_remedy_configs_change_one_setting_each():
    base = align.DPOConfig(steps=7, lr=1e-3, seed=2)
    configs = ch12.remedy_configs(base)
    assert configs["DPO (plain)"] == base
    assert configs["null control"] == align.DPOConfig(steps=7, lr=1e-3, seed=102)
    for name, field in (("KL on text", "kl_coef"), ("replay", "replay_share"), ("LoRA only", "lora_rank")):
        changed = {k for k, v in configs[name].__dict__.items() if v != base.__dict__[k]}
        assert field in changed and changed <= {field, "lora_lr"}


def test_capability_matrix_matched_table_and_estimators(chain):
    model, path = ch12.run_dpo(chain, align.DPOConfig(steps=4, batch_size=8, lr=1e-3, probe_every=2))
    R = ch12.capability_matrix(chain, model)
    assert list(R.index) == ["base", "SFT", "DPO"]
    assert R.loc["DPO"].to_dict() == pytest.approx(path.iloc[-1][R.columns].to_dict())
    paths = {"DPO (plain)": path, "averaging": align.averaging_path(chain.sft_model, model, chain.probe, [0, 0.5, 1])}
    table = ch12.matched(paths, 0.0)
    assert table.loc["DPO (plain)", "step"] == 0 and table.loc["averaging", "alpha"] == 0
    kl = ch12.kl_estimator_tables(chain, {"DPO": model, "SFT": chain.sft_model}, n_samples=200)
    assert set(kl.index.get_level_values(1)) == {"questions", "general text"}
    assert (kl.loc["SFT"]["exact KL"] == 0).all() and (kl.loc["SFT"]["mean"] == 0).all()
    assert (kl.xs("k3", level="estimator")["negative"] == 0).all()


def test_lm_chain_holds_people_out_of_every_remedy_text():
    chain = ch12.lm_chain(seed=0, sft_steps=2, n_sft_subjects=10, lab_config=TINY)
    held = set(chain.holdout.subjects)
    assert held <= set(chain.data.heldout_subjects) and len(held) == round(ch12.UNSEEN_SHARE * 10)
    assert not any(s in text for s in held for text in chain.holdout.texts)
    assert {"unseen recall", "unseen paraphrase"} <= set(chain.sft_row)
    recall_prompts = {f.prompt for f in chain.lab.world.train_facts if f.subject in held}
    x = chain.probe.x[chain.probe.slices["recall"]]
    assert not {chain.lab.tokenizer.decode(ids[ids != 0][1:]) for ids in x} & recall_prompts


def test_stage_nulls_train_outside_the_held_out_people(chain):
    config = align.DPOConfig(steps=4, batch_size=8, lr=1e-3, probe_every=2)
    paths = ch12.stage_nulls(chain, config, sft_steps=3, sft_batch=8, n_facts=5, require_known=False)
    assert paths["SFT"]["step"].tolist() == [0, 3] and paths["DPO"]["step"].tolist() == [0, 4]
    assert paths["DPO"].iloc[0].drop("step").to_dict() == pytest.approx(chain.probe(chain.sft_model))  # from SFT
    facts = ch12.null_task(chain, chain.sft_model, 5, seed=1, require_known=False)
    assert not {f.subject for f in facts} & set(chain.holdout.subjects)
    R = ch12.capability_matrix(chain, chain.sft_model, paths)
    assert list(R.index) == ["base", "SFT", "SFT's null", "DPO", "DPO's null"]
    assert R.loc["DPO's null", "unseen recall"] == paths["DPO"]["unseen recall"].iloc[-1]


# --- figures ---------------------------------------------------------------------------------------------------

def test_plot_capability_matrix_draws_each_stage_and_perplexity():
    R = pd.DataFrame({c: [0.9, 0.8, 0.3] for c in ch12.SHOWN} | {"perplexity": [4.0, 4.5, 6.0]},
                     index=["base", "SFT", "DPO"])
    R.loc["DPO", "win rate"] = 0.95
    fig = ch12.plot_capability_matrix(R)
    ax, ax_ppl = fig.axes
    bars = [b.get_height() for b in ax.patches]
    assert bars[-1] == pytest.approx(0.95) and bars[:5] == pytest.approx([0.9] * 5)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "SFT", "DPO"]
    assert [b.get_height() for b in ax_ppl.patches] == pytest.approx([4.0, 4.5, 6.0])


def test_plot_front_draws_each_path_and_its_matched_point():
    paths = {"DPO (plain)": pd.DataFrame({"win rate": [0.0, 0.5, 1.0], "recall": [0.9, 0.6, 0.4]}),
             "replay": pd.DataFrame({"win rate": [0.0, 0.4, 0.6], "recall": [0.9, 0.85, 0.8]})}
    fig = ch12.plot_front(paths, 0.5, column="recall", baseline=0.9)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["DPO (plain)"].get_ydata()) == [0.9, 0.6, 0.4]
    circles = [line for line in ax.get_lines() if line.get_label().startswith("_") and line.get_marker() == "o"]
    assert sorted(c.get_ydata()[0] for c in circles) == pytest.approx([0.6, 0.825])
    assert "0.5" in ax.get_title() and lines["after SFT"].get_ydata()[0] == 0.9


def test_plot_kl_estimators_shows_bias_and_spread_relative_to_the_kl():
    table = pd.concat({("DPO", "questions"): pd.DataFrame({"exact KL": [2.0] * 3, "bias": [0.0, 0.6, 0.01],
                                                  "relative std": [1.5, 0.9, 0.8]}, index=["k1", "k2", "k3"])},
                      names=["policy", "contexts", "estimator"])
    fig = ch12.plot_kl_estimators(table)
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx([0.0, 0.3, 0.005, 1.5, 0.9, 0.8])
    assert fig.axes[0].get_title() == "DPO, questions: KL = 2 nats"


# --- the playground ---------------------------------------------------------------------------------------------

def test_alignment_point_and_headless_sliders(chain, monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(ch12, "lm_chain", lambda **kw: chain)
    ch12.alignment_point.cache_clear()
    result = ch12.alignment_point(0.2, 0.25, steps=4)
    assert result["trajectory"]["step"].tolist() == [0, 2, 4]
    assert result["sft"] == chain.sft_row and result["last"]["win rate"] == result["trajectory"]["win rate"].iloc[-1]
    fig = ch12.plot_alignment_point(result)
    ax_t, ax_b = fig.axes
    assert list(ax_t.get_lines()[0].get_ydata()) == result["trajectory"]["win rate"].tolist()
    assert "β = 0.2" in ax_t.get_title() and "0.25" in ax_t.get_title()
    heights = [b.get_height() for b in ax_b.patches]
    assert heights == pytest.approx([chain.sft_row[c] for c in ch12.SHOWN] + [result["last"][c] for c in ch12.SHOWN])
    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch12.alignment_point, ch12.plot_alignment_point, fixed={"steps": 2},
                           beta=w.SelectionSlider(options=[0.1, 0.3], value=0.1),
                           replay_share=w.SelectionSlider(options=[0.0, 0.25], value=0.0))
    widget.children[0].value = 0.3
    assert widget.result["beta"] == pytest.approx(0.3)
    widget.children[0].value = 0.1
    assert widget.cache.hits == 1
    ch12.alignment_point.cache_clear()


def test_argument_validation():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)
    with pytest.raises(ValueError, match="direction"):
        kl_to_reference(torch.zeros(1, 2), torch.zeros(1, 2), "forward")
    with pytest.raises(ValueError, match="beta"):
        ch12.alignment_point(beta=-1.0)
    with pytest.raises(ValueError, match="replay_share"):
        ch12.alignment_point(replay_share=1.0)
    with pytest.raises(ValueError, match="n"):
        ch12.mnist_test_sample(0)
    with pytest.raises(ValueError, match="sft_steps"):
        ch12.mnist_sft_update(sft_steps=0)
