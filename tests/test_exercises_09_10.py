"""Chapters 09 and 10's exercises: every solution passes its checker, every stub fails it, and each named wrong
answer fails it with a message that names the property (strict=True)."""

import pytest

from cl_lab import exercises

NAMES = ("lora_conv1d", "adam_first_step", "ties", "dare")
BY_NAME = {e.name: e for e in exercises.all() if e.chapter in ("09", "10")}


def test_the_four_exercises_are_registered_with_their_checkers():
    assert set(NAMES) <= set(BY_NAME)
    for name in NAMES:
        assert getattr(exercises, f"check_{name}").__name__ == f"check_{name}"
        assert 1 <= BY_NAME[name].difficulty <= 3 and BY_NAME[name].minutes > 0


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes(name):
    assert getattr(exercises, f"check_{name}")(BY_NAME[name].solution, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_the_stub_fails_as_not_attempted(name):
    with pytest.raises(AssertionError, match="not attempted yet"):
        BY_NAME[name].check(BY_NAME[name].stub, strict=True)


@pytest.mark.parametrize(("name", "wrong"), [(n, w) for n in NAMES for w in BY_NAME[n].wrong_answers])
def test_each_wrong_answer_fails_naming_a_property(name, wrong):
    with pytest.raises(AssertionError, match=f"^{name}: ") as failure:
        BY_NAME[name].check(BY_NAME[name].wrong_answers[wrong], strict=True)
    assert "not attempted" not in str(failure.value)


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
