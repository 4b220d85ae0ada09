"""The default tiny LM (seed 0), pretrained once per cache and shared with the notebooks of chapters 09–13."""

import time

import pytest

from cl_lab import lm


@pytest.fixture(scope="module")
def lab():
    return lm.tiny_lm(0)


def test_default_lab_recalls_its_facts_and_extracts_them_under_held_out_templates(lab):
    row = lm.evaluate(lab.model, lab.tokenizer, lab.world)
    assert row["recall"] >= 0.99  # measured 1.000 at seeds 0, 1, 2
    assert row["paraphrase"] >= 0.9  # 0.975-0.990 at seeds 0-2; chance is about 1/11 (10-12 objects per relation)
    assert row["perplexity"] < 5  # 4.2-4.3 at seeds 0-2; uniform over the 273 tokens would be 273


def test_default_lab_loads_from_the_cache_without_pretraining(lab):
    start = time.perf_counter()
    again = lm.tiny_lm(0)
    assert not again.info["pretrained_now"] and again.info["cache"] == lab.info["cache"]
    assert time.perf_counter() - start < 5
