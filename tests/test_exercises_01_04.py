"""Chapters 01–04's exercises: how many each chapter has, and that a checker in a notebook prints and does not
raise. (The contract every exercise keeps, and how its notebook shows it, are in test_exercises_contract.py.)"""

from cl_lab import exercises

CHAPTERS = {"01": "01_forgetting", "02": "02_ewc_fisher", "03": "03_si_mas", "04": "04_replay"}
EXERCISES = [e for e in exercises.all() if e.chapter in CHAPTERS]
MIN_PER_CHAPTER = {"01": 2, "02": 3, "03": 2, "04": 2}


def test_every_chapter_has_its_exercises_each_with_a_wrong_answer():
    for chapter, least in MIN_PER_CHAPTER.items():
        mine = [e for e in EXERCISES if e.chapter == chapter]
        assert len(mine) >= least, f"chapter {chapter} has {len(mine)} exercises, wants {least}"
    assert all(e.wrong_answers for e in EXERCISES)
    assert all(1 <= e.difficulty <= 3 and e.minutes > 0 for e in EXERCISES)


def test_the_checker_never_raises_in_a_notebook(capsys):
    exercise = EXERCISES[0]
    assert exercise.check(next(iter(exercise.wrong_answers.values()))) is False
    assert exercise.check(exercise.stub) is False
    assert "not attempted yet" in capsys.readouterr().out
