"""Chapters 09 and 10's exercises: every solution passes its checker, every stub fails it, and each named wrong
answer fails it with a message that names the property (strict=True).
(The contract every exercise keeps is in test_exercises_contract.py.)"""

import pytest

from cl_lab import exercises

BY_NAME = {e.name: e for e in exercises.all() if e.chapter in ("09", "10")}


@pytest.mark.parametrize(("name", "wrong", "property_named"), [
    ("lora_conv1d", "no α/r scale", "LoRALinear"),
    ("lora_conv1d", "nn.Linear's weight layout", "raised"),
    ("adam_first_step", "no bias correction", "torch.optim.Adam"),
    ("ties", "a plain mean (no sign election)", "elect"),
    ("ties", "trimmed tensor by tensor", "whole vector"),
    ("dare", "without the rescale", "rescale"),
    ("dare", "keeps each entry with probability p", "dropped with probability p"),
])
def test_the_wrong_answer_fails_on_the_property_that_separates_it(name, wrong, property_named):
    with pytest.raises(AssertionError, match=property_named):
        BY_NAME[name].check(BY_NAME[name].wrong_answers[wrong], strict=True)


def test_in_a_notebook_a_wrong_answer_prints_and_does_not_raise(capsys):
    assert exercises.check_dare(BY_NAME["dare"].wrong_answers["without the rescale"]) is False
    assert "rescale" in capsys.readouterr().out
