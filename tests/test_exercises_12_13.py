"""Chapters 12 and 13's exercises: every solution passes its checker quickly, every stub fails as "not
attempted", and each named wrong answer fails on a named property (strict=True)."""

import inspect
import time

import pytest

from cl_lab import exercises

NAMES = ("dpo_loss", "k3_estimate", "rewarm_lr", "replay_count")
BY_NAME = {e.name: e for e in exercises.all() if e.chapter in ("12", "13")}
WRONG = [(n, w) for n in NAMES for w in BY_NAME[n].wrong_answers]


def test_the_exercises_are_registered_with_their_checkers():
    assert set(NAMES) <= set(BY_NAME)
    for name in NAMES:
        assert getattr(exercises, f"check_{name}").__name__ == f"check_{name}"
        assert 1 <= BY_NAME[name].difficulty <= 3 and BY_NAME[name].minutes > 0 and BY_NAME[name].wrong_answers


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes_quickly(name):
    start = time.perf_counter()
    assert getattr(exercises, f"check_{name}")(BY_NAME[name].solution, strict=True)
    assert time.perf_counter() - start < 1.0, "a checker must run in under 1 s on a CPU"


@pytest.mark.parametrize("name", NAMES)
def test_the_stub_fails_as_not_attempted(name):
    with pytest.raises(AssertionError, match="not attempted yet"):
        BY_NAME[name].check(BY_NAME[name].stub, strict=True)
    assert inspect.signature(BY_NAME[name].stub) == inspect.signature(BY_NAME[name].solution)


@pytest.mark.parametrize(("name", "wrong"), WRONG, ids=[f"{n}: {w}" for n, w in WRONG])
def test_each_wrong_answer_fails_naming_a_property(name, wrong):
    with pytest.raises(AssertionError, match=f"^{name}: ") as failure:
        BY_NAME[name].check(BY_NAME[name].wrong_answers[wrong], strict=True)
    message = str(failure.value)
    assert " — expected " in message and "not attempted" not in message and "raised" not in message, message


def test_the_checker_prints_and_never_raises_in_a_notebook(capsys):
    exercise = BY_NAME["replay_count"]
    assert exercise.check(exercise.wrong_answers["counted in sentences"]) is False
    assert "replayed TOKENS" in capsys.readouterr().out
