"""Chapter 16's exercise: the solution passes its checker, the stub fails it, and each named wrong answer fails it
with a message that names the property (strict=True). (The contract every exercise keeps is in
test_exercises_contract.py.)"""

import pytest

from cl_lab import exercises

BY_NAME = {e.name: e for e in exercises.all() if e.chapter == "16"}


@pytest.mark.parametrize(("wrong", "property_named"), [
    ("without the T² factor", "the T² factor keeps the gradient's scale"),
    ("the reversed KL", "KL\\(teacher ‖ student\\)"),
    ("summed over the batch", "averages over the batch"),
])
def test_each_wrong_answer_fails_on_the_property_that_separates_it(wrong, property_named):
    exercise = BY_NAME["distillation_loss"]
    with pytest.raises(AssertionError, match=f"^distillation_loss: .*{property_named}"):
        exercise.check(exercise.wrong_answers[wrong], strict=True)


def test_the_solution_passes():
    assert BY_NAME["distillation_loss"].check(BY_NAME["distillation_loss"].solution, strict=True)


def test_the_solution_equals_the_chapter_loss():
    """The exercise's loss is the one chapter 16's ``Distil`` trains with."""
    import torch
    import torch.nn.functional as F

    from cl_lab.chapters import ch16

    gen = torch.Generator().manual_seed(1)
    z, q = torch.randn(5, 9, generator=gen), F.softmax(torch.randn(5, 9, generator=gen), -1)
    method = ch16.Distil(q, temperature=2.0)
    got = method.task_loss(None, z, torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert torch.allclose(got, BY_NAME["distillation_loss"].solution(z, q, 2.0), atol=1e-6)


def test_in_a_notebook_a_wrong_answer_prints_and_does_not_raise(capsys):
    wrong = BY_NAME["distillation_loss"].wrong_answers["the reversed KL"]
    assert exercises.check_distillation_loss(wrong) is False
    assert "teacher" in capsys.readouterr().out
