"""Shipping an update (cl_lab.lm.serving): embeddings, capability matrix, release rule, canary, router, adapters."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cl_lab import lm
from cl_lab.lm import cpt, serving
from cl_lab.lm.lab import LMClassifier


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0, progress=False, **lm.SMOKE_CONFIG)


@pytest.fixture(scope="module")
def domain(lab):
    return lab.world.new_domain(4)


@pytest.fixture(scope="module")
def extended(lab, domain):
    return cpt.continual_pretrain(lab, domain, steps=20, batch_tokens=160, peak_lr=1e-2, eval_every=20).lab


def test_prompt_embeddings_are_the_mean_over_real_tokens_whatever_the_padding(lab):
    prompts = [f.prompt for f in lab.world.train_facts[:5]]
    together = serving.prompt_embeddings(lab.model, lab.tokenizer, prompts)
    alone = torch.cat([serving.prompt_embeddings(lab.model, lab.tokenizer, [p]) for p in prompts])
    assert together.shape == (5, lab.model.config.n_embd) and torch.allclose(together, alone, atol=1e-5)
    ids = lab.encode(prompts[:1])
    with torch.no_grad():
        h = lab.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [L, d]
    assert torch.allclose(alone[0], h.mean(0), atol=1e-5)


def test_capability_matrix_gives_the_base_zero_on_words_it_cannot_read(lab, domain, extended):
    m = serving.capability_matrix({"base": lab, "cand": extended}, lab.world, domain, old_facts=50)
    assert list(m.columns) == list(serving.CAPABILITIES) and list(m.index) == ["base", "cand"]
    assert m.loc["base", "new"] == 0 and m.loc["base", "new_paraphrase"] == 0
    ppl = lm.perplexity(lab.model, lab.tokenizer, lab.world.general_test)
    assert m.loc["base", "general_ppl"] == pytest.approx(ppl)


def test_router_serves_each_query_with_the_model_that_can_read_it(lab, domain, extended):
    router = serving.DomainRouter(lab, extended)
    assert router.routes([domain.texts[0], lab.world.general_test[0]]) == [True, False]
    m = serving.capability_matrix({"base": lab, "cand": extended, "routed": router}, lab.world, domain, old_facts=50)
    assert m.loc["routed", ["old", "old_paraphrase", "general_ppl"]].equals(m.loc["base", ["old", "old_paraphrase",
                                                                                         "general_ppl"]])
    assert m.loc["routed", ["new", "new_paraphrase"]].equals(m.loc["cand", ["new", "new_paraphrase"]])
    mixed = lab.world.general_test[:3] + domain.texts[:2]  # perplexity of a mix pools the tokens of both models
    parts = (lm.perplexity(lab.model, lab.tokenizer, mixed[:3]),
             lm.perplexity(extended.model, extended.tokenizer, mixed[3:]))
    assert min(parts) <= router.perplexity(mixed) <= max(parts)


def test_ship_applies_the_gain_and_every_guard():
    m = pd.DataFrame({"old": [1.0, 0.97, 0.9, 1.0], "general_ppl": [4.0, 4.5, 4.5, 6.0], "new": [0.0, 0.5, 0.5, 0.5]},
                     index=["base", "good", "forgets", "perplexed"])
    assert serving.ship(m, "good", "base")["ship"]
    bad = serving.ship(m, "forgets", "base")
    assert not bad["ship"] and "old" in bad["reasons"]
    assert "general_ppl" in serving.ship(m, "perplexed", "base")["reasons"]
    assert "new" in serving.ship(m, "base", "base")["reasons"]
    with pytest.raises(ValueError, match="row"):
        serving.ship(m, "nope", "base")


def test_canary_never_rolls_back_an_identical_candidate_and_counts_its_errors():
    rng = np.random.default_rng(0)
    control = rng.random(1000) < 0.9
    same = serving.canary(control, control.copy(), share=0.1, checks=20, margin=0.0, z=3.0, seed=1)
    assert not same["rolled back"] and same["extra errors"] == 0
    assert 20 * 500 * 0.05 < same["candidate requests"] < 20 * 500 * 0.15
    broken = serving.canary(control, np.zeros(1000, dtype=bool), share=0.1, checks=20, seed=1)
    assert broken["rolled back"] and broken["at check"] == 1
    assert broken["extra errors"] == pytest.approx(0.9 * broken["candidate requests"], rel=0.25)


def test_canary_rollback_rate_grows_with_the_drop():
    rng = np.random.default_rng(0)
    control = rng.random(2000) < 0.95
    table = serving.canary_table(control, {"−2 %": control & (rng.random(2000) > 0.02),
                                           "−20 %": control & (rng.random(2000) > 0.2)},
                                 runs=30, margin=0.05, z=3.0)
    assert table.loc["−2 %", "rolled back"] == 0 and table.loc["−20 %", "rolled back"] == 1
    with pytest.raises(ValueError, match="one shape"):
        serving.canary(control, control[:10])


def _trainer(lab, steps=15, shuffle=False):
    task = lm.fact_stream(lab, 1, "format", n_subjects=10).tasks[0]

    def fit(model):
        clf, gen = LMClassifier(model, 0), torch.Generator().manual_seed(0)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        y = task.y_train[torch.randperm(len(task.y_train), generator=gen)] if shuffle else task.y_train
        for _ in range(steps):
            loss = F.cross_entropy(clf(task.x_train), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fit, task


def test_adapter_registry_isolates_tenants_and_rolls_back_exactly(lab):
    reg = serving.AdapterRegistry(lab, rank=4)
    fit, task = _trainer(lab)
    before = lab.model.state_dict()["transformer.h.0.mlp.c_fc.weight"].clone()

    def logits(tenant):
        with torch.no_grad():
            return LMClassifier(reg.serve(tenant), 0).eval()(task.x_test)

    assert reg.publish("a", fit) == "a_v1"
    a1 = logits("a")
    assert reg.publish("b", _trainer(lab, steps=5)[0]) == "b_v1"
    assert torch.equal(logits("a"), a1)  # publishing b leaves a's outputs bit-identical
    b1 = logits("b")
    assert reg.publish("a", _trainer(lab, shuffle=True)[0]) == "a_v2"
    assert not torch.equal(logits("a"), a1) and torch.equal(logits("b"), b1)
    assert reg.rollback("a") == "a_v1" and torch.equal(logits("a"), a1)
    assert reg.versions == {"a": ["a_v1", "a_v2"], "b": ["b_v1"]}
    assert reg.n_adapter_parameters("a_v1") == sum(4 * (i + o) for i, o in _projection_shapes(lab))
    assert torch.equal(lab.model.state_dict()["transformer.h.0.mlp.c_fc.weight"], before)  # the lab is untouched
    with pytest.raises(ValueError, match="earlier version"):
        reg.rollback("a")
    with pytest.raises(KeyError, match="tenant"):
        reg.serve("c")
    with pytest.raises(ValueError, match="identifier"):
        reg.publish("a-b", fit)


def _projection_shapes(lab):
    """(in, out) of every projection LoRA adapts (GPT-2 Conv1D weights are [in, out])."""
    return [tuple(m.weight.shape) for name, m in lab.model.named_modules()
            if name.endswith(("c_attn", "c_fc", "c_proj"))]


def test_serialized_bytes_round_trip():
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    blob = serving.serialized_bytes(state)
    import io
    assert torch.equal(torch.load(io.BytesIO(blob))["w"], state["w"]) and len(blob) > 24
