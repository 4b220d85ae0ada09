"""Chapter 11's exercises in a notebook: a wrong answer prints what failed and does not raise. (The contract
every exercise keeps, and how its notebook shows it, are in test_exercises_contract.py.)"""

from cl_lab import exercises

BY_NAME = {e.name: e for e in exercises.all() if e.chapter == "11"}


def test_the_checker_prints_and_never_raises_in_a_notebook(capsys):
    exercise = BY_NAME["rome_rank_one"]
    assert exercise.check(exercise.wrong_answers["no normaliser (C⁻¹k*)ᵀ k*"]) is False
    assert "(W + Δ) k* = v*" in capsys.readouterr().out
