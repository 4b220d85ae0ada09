"""Chapters 12 and 13's exercises in a notebook: a wrong answer prints what failed and does not raise. (The
contract every exercise keeps, and how its notebook shows it, are in test_exercises_contract.py.)"""

from cl_lab import exercises

BY_NAME = {e.name: e for e in exercises.all() if e.chapter in ("12", "13")}


def test_the_checker_prints_and_never_raises_in_a_notebook(capsys):
    exercise = BY_NAME["replay_count"]
    assert exercise.check(exercise.wrong_answers["counted in sentences"]) is False
    assert "replayed TOKENS" in capsys.readouterr().out
