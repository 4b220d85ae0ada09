"""Chapter 14's exercises: every solution passes its checker, every stub fails it, and each named wrong answer
fails it with a message that names the property (strict=True).
(The contract every exercise keeps is in test_exercises_contract.py.)"""

import pytest

from cl_lab import exercises

NAMES = ("group_advantages", "clipped_surrogate")
BY_NAME = {e.name: e for e in exercises.all() if e.chapter == "14"}


@pytest.mark.parametrize(("name", "wrong", "property_named"), [
    ("group_advantages", "the population std", "sample std"),
    ("group_advantages", "groups read across prompts", "scored alike"),
    ("group_advantages", "one baseline for the whole batch", "scored alike"),
    ("clipped_surrogate", "the clipped term alone", "the clip does not help"),
    ("clipped_surrogate", "the min taken on the ratios", "pessimistic bound"),
    ("clipped_surrogate", "one mean over every token", "averaged first"),
])
def test_each_wrong_answer_fails_on_the_property_that_separates_it(name, wrong, property_named):
    assert set(BY_NAME[name].wrong_answers) >= {wrong}
    with pytest.raises(AssertionError, match=f"^{name}: .*{property_named}"):
        BY_NAME[name].check(BY_NAME[name].wrong_answers[wrong], strict=True)


def test_every_wrong_answer_is_listed_above():
    assert sum(len(BY_NAME[n].wrong_answers) for n in NAMES) == 6


def test_in_a_notebook_a_wrong_answer_prints_and_does_not_raise(capsys):
    assert exercises.check_clipped_surrogate(BY_NAME["clipped_surrogate"].wrong_answers["the clipped term alone"]) \
        is False
    assert "clip" in capsys.readouterr().out
