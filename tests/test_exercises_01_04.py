"""Chapters 01–04's exercises: every checker can pass and can fail, and the notebooks show what is registered.

For each exercise, with ``strict=True``: the solution passes, the stub fails as "not attempted", and each named
wrong answer fails on a property (not by crashing). In the notebook, the stub cell defines the registered
signature, the checker cell calls the registered checker, and the code in the Solution fold passes it.
(The contract every exercise keeps is in test_exercises_contract.py.)"""

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import exercises

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = {"01": "01_forgetting", "02": "02_ewc_fisher", "03": "03_si_mas", "04": "04_replay"}
EXERCISES = [e for e in exercises.all() if e.chapter in CHAPTERS]
MIN_PER_CHAPTER = {"01": 2, "02": 3, "03": 2, "04": 2}


def _id(exercise) -> str:
    return exercise.name


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


# ---- the notebooks --------------------------------------------------------------------------------------------

def _cells(chapter: str) -> list[dict]:
    nb = json.loads((ROOT / "notebooks" / f"{CHAPTERS[chapter]}.ipynb").read_text())
    return [{"type": c["cell_type"], "source": "".join(c["source"])} for c in nb["cells"]]


def _solution_code(markdown: str) -> str:
    fold = re.search(r"<summary>Solution</summary>(.*?)</details>", markdown, re.DOTALL)
    assert fold, "the cell after a checker call holds a Solution fold"
    code = re.search(r"```python\n(.*?)```", fold.group(1), re.DOTALL)
    assert code, "the Solution fold holds a ```python block"
    return code.group(1)


def _notebook_exercises(chapter: str) -> dict[str, tuple[str, str, str, str]]:
    """{checker name: (heading markdown, stub code, checker call, hints and solution markdown)}."""
    cells, found = _cells(chapter), {}
    for i, cell in enumerate(cells):
        call = re.fullmatch(r"exercises\.(check_\w+)\((\w+)\);?\s*", cell["source"])
        if cell["type"] == "code" and call:
            found[call.group(1)] = (cells[i - 2]["source"], cells[i - 1]["source"], call.group(2),
                                    cells[i + 1]["source"])
    return found


@pytest.mark.parametrize("exercise", EXERCISES, ids=_id)
def test_the_notebook_shows_the_exercise_in_arena_form(exercise):
    shown = _notebook_exercises(exercise.chapter)
    checker = f"check_{exercise.name}"
    assert checker in shown, f"{CHAPTERS[exercise.chapter]} calls no exercises.{checker}(...)"
    heading, stub_code, fn_name, folds = shown[checker]
    stars = "⭐" * exercise.difficulty
    assert re.match(rf"### Exercise {int(exercise.chapter)}\.\d+ · {re.escape(exercise.title)}  {stars} · "
                    rf"about {exercise.minutes} min\n", heading), heading.splitlines()[0]
    assert fn_name == exercise.solution.__name__
    namespace = {"torch": torch, "F": F, "nn": nn, "np": np}
    exec(stub_code, namespace)
    assert inspect.signature(namespace[fn_name]) == inspect.signature(exercise.solution)
    with pytest.raises(NotImplementedError):
        exercise.properties(namespace[fn_name])
    assert folds.index("<summary>Hint 1</summary>") < folds.index("<summary>Hint 2</summary>") \
        < folds.index("<summary>Solution</summary>")
    exec(_solution_code(folds), namespace)
    assert exercise.check(namespace[fn_name], strict=True), "the Solution fold's code passes the checker"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_notebook_imports_the_exercises_and_ends_with_takeaways(chapter):
    cells = _cells(chapter)
    assert any("from cl_lab import" in c["source"] and "exercises" in c["source"] for c in cells if c["type"] == "code")
    headings = [c["source"].splitlines()[0] for c in cells if c["type"] == "markdown"]
    at = headings.index("## Key takeaways")
    assert headings[at + 1] == "## The 30-second answer" and headings[at + 2] == "## References"
    takeaways = next(c["source"] for c in cells if c["source"].startswith("## Key takeaways"))
    assert 3 <= sum(line.startswith("- ") for line in takeaways.splitlines()) <= 5
    answer = next(c["source"] for c in cells if c["source"].startswith("## The 30-second answer"))
    assert re.search(r"^\*\*Question:\*\* .+", answer, re.MULTILINE)
    assert re.search(r"<details><summary>Answer</summary>.+</details>\s*$", answer, re.DOTALL)
