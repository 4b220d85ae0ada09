"""Every exercise of every chapter (``exercises.all()``) keeps ARENA's contract: registered with its
``check_<name>`` checker, a difficulty, minutes and at least one named wrong answer; the solution passes its
checker quickly; the stub fails as "not attempted" with the solution's signature; each named wrong answer fails on
a named property (strict=True). The chapter files test what is particular to each exercise and its notebook."""

import inspect
import time

import pytest

from cl_lab import exercises

ALL = exercises.all()
WRONG = [(e, label) for e in ALL for label in e.wrong_answers]
SECONDS = {"12": 1.0, "13": 1.0}  # a checker's budget on a CPU, 2 s elsewhere
RAISES = {("lora_conv1d", "nn.Linear's weight layout")}  # fails by a shape error, which is the lesson


def _id(exercise) -> str:
    return f"{exercise.chapter}:{exercise.name}"


@pytest.mark.parametrize("exercise", ALL, ids=_id)
def test_the_exercise_is_registered_with_its_checker(exercise):
    assert getattr(exercises, f"check_{exercise.name}").__name__ == f"check_{exercise.name}"
    assert 1 <= exercise.difficulty <= 3 and exercise.minutes > 0 and exercise.wrong_answers


@pytest.mark.parametrize("exercise", ALL, ids=_id)
def test_the_solution_passes_quickly(exercise):
    start = time.perf_counter()
    assert getattr(exercises, f"check_{exercise.name}")(exercise.solution, strict=True)
    limit = SECONDS.get(exercise.chapter, 2.0)
    assert time.perf_counter() - start < limit, f"a checker must run in under {limit:g} s on a CPU"


@pytest.mark.parametrize("exercise", ALL, ids=_id)
def test_the_stub_fails_as_not_attempted(exercise):
    with pytest.raises(AssertionError, match="not attempted yet"):
        exercise.check(exercise.stub, strict=True)
    assert inspect.signature(exercise.stub) == inspect.signature(exercise.solution)


@pytest.mark.parametrize("exercise, label", WRONG, ids=[f"{e.name}: {label}" for e, label in WRONG])
def test_each_wrong_answer_fails_on_a_named_property(exercise, label):
    with pytest.raises(AssertionError) as failure:
        exercise.check(exercise.wrong_answers[label], strict=True)
    message = str(failure.value)
    assert message.startswith(f"{exercise.name}: ") and "not attempted" not in message, message
    if (exercise.name, label) not in RAISES:
        assert " — expected " in message and "raised" not in message, message
