"""Generative replay on the LM (cl_lab.lm.generative): the sampler against the model's own distribution and greedy
decoding, seeding, the words it may write, and SelfReplay's per-task writers."""

import copy

import pytest
import torch

from cl_lab import lm, train
from cl_lab.lm.generative import SelfReplay, sample_texts
from cl_lab.lm.tokenizer import BOS, EOS, encode
from cl_lab.methods.base import Method


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0, progress=False, **lm.SMOKE_CONFIG)


def test_samples_are_seeded_words_of_the_vocabulary(lab):
    texts = sample_texts(lab.model, lab.tokenizer, 64, seed=3)
    assert texts == sample_texts(lab.model, lab.tokenizer, 64, seed=3)
    assert texts != sample_texts(lab.model, lab.tokenizer, 64, seed=4)
    assert 0 < len(texts) <= 64 and all(texts)
    ids = encode(lab.tokenizer, texts)  # raises on any word outside the vocabulary
    assert not (ids[:, 1:] == BOS).any()  # <bos> only where the tokenizer puts it
    assert all(len(t.split()) <= 16 for t in texts)


def test_a_cold_temperature_is_greedy_decoding(lab):
    bos = torch.tensor([[BOS]])
    greedy = lab.model.generate(input_ids=bos, attention_mask=torch.ones_like(bos), max_new_tokens=16,
                                do_sample=False, eos_token_id=EOS, pad_token_id=lab.tokenizer.pad_token_id)
    expected = lab.tokenizer.decode(greedy[0].tolist(), skip_special_tokens=True).strip()
    assert set(sample_texts(lab.model, lab.tokenizer, 8, temperature=1e-4, seed=0)) == {expected}


def test_the_first_word_follows_the_models_distribution(lab):
    with torch.no_grad():
        p = lab.model(input_ids=torch.tensor([[BOS]])).logits[0, -1].softmax(-1)  # [V]
    top = int(p.argmax())
    texts = sample_texts(lab.model, lab.tokenizer, 4000, max_tokens=1, seed=0)
    share = sum(t.split()[0] == lab.tokenizer.convert_ids_to_tokens(top) for t in texts) / 4000
    assert share == pytest.approx(float(p[top]), abs=4 * (float(p[top]) * (1 - float(p[top])) / 4000) ** 0.5 + 0.01)


class _Snapshot(Method):
    """Keeps a copy of the LM at every task start (placed after SelfReplay, it sees the writer's weights)."""

    def __init__(self) -> None:
        self.models = []

    def on_task_start(self, ctx) -> None:
        self.models.append(copy.deepcopy(ctx.model.lm))


def test_self_replay_writes_with_the_model_of_each_task_start(lab):
    stream = lm.fact_stream(lab, 2, "subjects", n_subjects=4)
    model, method, snapshot = lab.copy().as_classifier(), SelfReplay(lab, 0.5, n_texts=32, seed=1), _Snapshot()
    train.fit(model, stream, [method, snapshot], steps=20, lr=3e-3, batch_size=8, seed=0, device="cpu",
              progress=False)
    assert len(method.samples) == 2
    assert method.samples[0] == sample_texts(lab.model, lab.tokenizer, 32, seed=1)  # the pretrained model wrote it
    assert method.samples[1] == sample_texts(snapshot.models[1], lab.tokenizer, 32, seed=2)  # the trained one
    assert method.samples[1] != sample_texts(lab.model, lab.tokenizer, 32, seed=2)
    assert method.share == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("kwargs, message", [({"n": 0}, "n must be"), ({"n": 4, "max_tokens": 0}, "max_tokens"),
                                             ({"n": 4, "temperature": 0.0}, "temperature")])
def test_bad_sampling_arguments_are_named(lab, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_texts(lab.model, lab.tokenizer, **kwargs)
