"""Null controls for LM forgetting (cl_lab.lm.nulls): known-fact tasks, the scored complement, hold-outs."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lab import lm
from cl_lab.lm import nulls


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0, progress=False, **lm.SMOKE_CONFIG)


class Oracle(nn.Module):
    """A causal LM that puts its top logit on the object after each prompt of ``facts`` (and nowhere else)."""

    def __init__(self, lab, facts):
        super().__init__()
        self.vocab = len(lab.tokenizer)
        self.answers = {}
        for f in facts:
            ids = lab.tokenizer(f.prompt)["input_ids"]
            self.answers[tuple(ids)] = lab.tokenizer.convert_tokens_to_ids(f.object)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # [B, L, V]
        logits[..., 0] = 1.0  # a wrong default answer
        for b, row in enumerate(input_ids.tolist()):
            n = int(attention_mask[b].sum())
            obj = self.answers.get(tuple(row[:n]))
            if obj is not None:
                logits[b, n - 1, obj] = 2.0
        return SimpleNamespace(logits=logits + 0 * self.weight)


@pytest.fixture(scope="module")
def forgotten(lab):
    """Facts (keys) the oracle does not know at all: every fact of the first five subjects."""
    return {(s, r.name) for s in lab.world.subjects[:5] for r in lm.BASE_RELATIONS}


@pytest.fixture(scope="module")
def oracle(lab, forgotten):
    facts = [f for f in lab.world.train_facts if (f.subject, f.relation) not in forgotten]
    odd_one = next(f for f in facts if f.subject == lab.world.subjects[6])  # one rendering forgotten: fact not known
    return Oracle(lab, [f for f in facts if f is not odd_one]), (odd_one.subject, odd_one.relation)


def test_known_facts_are_those_whose_every_trained_rendering_is_recalled(lab, oracle, forgotten):
    model, partly = oracle
    known = set(nulls.known_facts(lab, model))
    every = {(f.subject, f.relation) for f in lab.world.train_facts}
    assert known == every - forgotten - {partly}


def test_known_fact_task_draws_known_facts_rendered_like_a_subjects_task(lab, oracle, forgotten):
    model, partly = oracle
    task = nulls.known_fact_task(lab, 12, seed=3, model=model)
    keys = nulls.fact_keys(task.train_facts)
    assert len(keys) == 12 and not keys & (forgotten | {partly})
    per_fact = len(lab.world.train_facts) // len(nulls.fact_keys(lab.world.train_facts))
    assert len(task.train_facts) == 12 * per_fact  # every trained rendering of each drawn fact
    assert nulls.fact_keys(task.paraphrase_facts) == keys
    assert not {f.prompt for f in task.paraphrase_facts} & {f.prompt for f in task.train_facts}
    x, y = lm.fact_batch(lab.tokenizer, task.train_facts)
    assert torch.equal(task.x_train[:, :x.shape[1]], x) and torch.equal(task.y_train, y)
    assert torch.equal(task.x_test, task.x_train) and task.test_facts == task.train_facts
    assert lm.recall(model, lab.tokenizer, task.train_facts) == 1.0  # the task teaches nothing new


def test_known_fact_task_is_seeded_and_respects_exclude(lab, oracle):
    model, _ = oracle
    a = nulls.known_fact_task(lab, 10, seed=1, model=model)
    assert nulls.fact_keys(a.train_facts) == nulls.fact_keys(nulls.known_fact_task(lab, 10, 1, model=model).train_facts)
    b = nulls.known_fact_task(lab, 10, seed=2, model=model)
    assert nulls.fact_keys(a.train_facts) != nulls.fact_keys(b.train_facts)
    c = nulls.known_fact_task(lab, 10, seed=1, model=model, exclude=a.train_facts)
    assert not nulls.fact_keys(c.train_facts) & nulls.fact_keys(a.train_facts)


def test_known_fact_task_trains_with_fit(lab, oracle):
    from cl_lab import train
    model, _ = oracle
    stream = nulls.known_fact_stream(lab, [6, 4], seed=0, model=model)
    assert [len(nulls.fact_keys(t.train_facts)) for t in stream.tasks] == [6, 4]
    assert not nulls.fact_keys(stream.tasks[0].train_facts) & nulls.fact_keys(stream.tasks[1].train_facts)
    run = train.fit(lab.copy().as_classifier(), stream, steps=2, lr=1e-3, batch_size=8, device="cpu", progress=False)
    assert run.R.shape == (2, 2)


def test_known_fact_task_needs_enough_known_facts(lab):
    with pytest.raises(ValueError, match="n must be at most the 0 known facts"):
        nulls.known_fact_task(lab, 1, seed=0)  # the SMOKE lab recalls nothing
    task = nulls.known_fact_task(lab, 3, seed=0, require_known=False)
    assert len(nulls.fact_keys(task.train_facts)) == 3


def test_scored_complement_is_disjoint_from_the_excluded_facts(lab, oracle):
    model, _ = oracle
    task = nulls.known_fact_task(lab, 8, seed=0, model=model)
    rest = nulls.scored_complement(lab, task.train_facts)
    assert not nulls.fact_keys(rest) & nulls.fact_keys(task.train_facts)
    assert len(rest) + len(task.train_facts) == len(lab.world.train_facts)
    some = nulls.scored_complement(lab, task.train_facts, n=5, seed=1)
    assert len(nulls.fact_keys(some)) == 5 and set(map(id, some)) <= set(map(id, rest))
    assert nulls.scored_complement(lab, task.train_facts, n=5, seed=1) == some


def test_forgetting_beyond_null():
    assert nulls.forgetting_beyond_null(1.0, 0.6, 0.9) == pytest.approx(0.3)
    assert nulls.forgetting_beyond_null(1.0, 0.9, 0.9) == 0.0
    with pytest.raises(ValueError, match="after"):
        nulls.forgetting_beyond_null(1.0, math.nan, 0.9)


def test_hold_out_removes_every_sentence_about_the_held_out_subjects(lab):
    world = lab.world
    held = nulls.hold_out(world, 4, seed=0, among=world.subjects[10:20])
    assert len(held.subjects) == 4 and set(held.subjects) <= set(world.subjects[10:20])
    assert {f.subject for f in held.facts} == set(held.subjects) == {f.subject for f in held.paraphrases}
    assert not any(s in text for s in held.subjects for text in held.texts)
    kept = world.pretraining_texts()
    assert len(held.texts) == len(kept) - len(held.facts) and set(held.texts) <= set(kept)
    assert nulls.hold_out(world, 4, seed=0, among=world.subjects[10:20]) == held
    with pytest.raises(ValueError, match="n_subjects"):
        nulls.hold_out(world, 11, seed=0, among=world.subjects[10:20])
    with pytest.raises(ValueError, match="among"):
        nulls.hold_out(world, 1, seed=0, among=["Nobody Here"])
