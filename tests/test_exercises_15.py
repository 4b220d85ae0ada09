"""Chapter 15's exercise: the solution passes its checker, the stub fails it, and each named wrong answer fails it
with a message that names the property (strict=True). (The contract every exercise keeps is in
test_exercises_contract.py.)"""

import pytest

from cl_lab import exercises

BY_NAME = {e.name: e for e in exercises.all() if e.chapter == "15"}


@pytest.mark.parametrize(("wrong", "property_named"), [
    ("the projection onto the preserved span", "removes the preserved direction"),
    ("a basis assumed orthonormal", "not orthonormal"),
    ("only the first preserved direction", "not orthonormal"),
])
def test_each_wrong_answer_fails_on_the_property_that_separates_it(wrong, property_named):
    exercise = BY_NAME["orthogonal_step"]
    with pytest.raises(AssertionError, match=f"^orthogonal_step: .*{property_named}"):
        exercise.check(exercise.wrong_answers[wrong], strict=True)


def test_the_solution_passes_and_matches_peft():
    assert BY_NAME["orthogonal_step"].check(BY_NAME["orthogonal_step"].solution, strict=True)


def test_in_a_notebook_a_wrong_answer_prints_and_does_not_raise(capsys):
    wrong = BY_NAME["orthogonal_step"].wrong_answers["the projection onto the preserved span"]
    assert exercises.check_orthogonal_step(wrong) is False
    assert "preserved" in capsys.readouterr().out
