"""Chapters 12 and 13's exercises: every solution passes its checker quickly, every stub fails as "not
attempted", each named wrong answer fails on a named property (strict=True), and each notebook shows its two in
ARENA's form with a Solution fold whose code passes, then the takeaways and the 30-second answer.
(The contract every exercise keeps is in test_exercises_contract.py.)"""

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from cl_lab import exercises

NOTEBOOKS = {"12": Path(__file__).resolve().parents[1] / "notebooks" / "12_alignment_tax.ipynb",
             "13": Path(__file__).resolve().parents[1] / "notebooks" / "13_llm_practice.ipynb"}
NAMES = ("dpo_loss", "k3_estimate", "rewarm_lr", "replay_count")
BY_NAME = {e.name: e for e in exercises.all() if e.chapter in ("12", "13")}


def test_the_checker_prints_and_never_raises_in_a_notebook(capsys):
    exercise = BY_NAME["replay_count"]
    assert exercise.check(exercise.wrong_answers["counted in sentences"]) is False
    assert "replayed TOKENS" in capsys.readouterr().out


# ---- the notebooks --------------------------------------------------------------------------------------------

def _cells(chapter: str) -> list[dict]:
    return [{"type": c["cell_type"], "source": "".join(c["source"])}
            for c in json.loads(NOTEBOOKS[chapter].read_text())["cells"]]


def _shown(chapter: str) -> dict[str, tuple[str, str, str, str]]:
    """{checker name: (heading markdown, stub code, function name, hints and solution markdown)}."""
    cells, found = _cells(chapter), {}
    for i, cell in enumerate(cells):
        call = re.fullmatch(r"exercises\.(check_\w+)\((\w+)\);?\s*", cell["source"])
        if cell["type"] == "code" and call:
            found[call.group(1)] = (cells[i - 2]["source"], cells[i - 1]["source"], call.group(2),
                                    cells[i + 1]["source"])
    return found


@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_shows_the_exercise_in_arena_form(name):
    exercise = BY_NAME[name]
    heading, stub_code, fn_name, folds = _shown(exercise.chapter)[f"check_{name}"]
    assert re.match(rf"### Exercise {exercise.chapter}\.\d · {re.escape(exercise.title)}  {'⭐' * exercise.difficulty} "
                    rf"· about {exercise.minutes} min\n", heading), heading.splitlines()[0]
    assert fn_name == exercise.solution.__name__
    namespace = {"torch": torch}
    exec(stub_code, namespace)
    parameters = inspect.signature(namespace[fn_name]).parameters  # the module's annotations are strings
    assert list(parameters) == list(inspect.signature(exercise.solution).parameters)
    with pytest.raises(NotImplementedError):
        exercise.properties(namespace[fn_name])
    assert folds.index("<summary>Hint 1</summary>") < folds.index("<summary>Hint 2</summary>") \
        < folds.index("<summary>Solution</summary>")
    code = re.search(r"<summary>Solution</summary>.*?```python\n(.*?)```", folds, re.DOTALL)
    exec(code.group(1), namespace)
    assert exercise.check(namespace[fn_name], strict=True), "the Solution fold's code passes the checker"


@pytest.mark.parametrize("chapter", sorted(NOTEBOOKS))
def test_the_notebook_ends_with_takeaways_and_the_30_second_answer(chapter):
    cells = _cells(chapter)
    headings = [c["source"].splitlines()[0] for c in cells if c["type"] == "markdown"]
    at = headings.index("## Key takeaways")
    assert headings[at + 1] == "## The 30-second answer" and headings[at + 2] == "## References"
    assert headings[-1] == "## Claims checked in this chapter" and cells[-1]["source"].endswith("check.report()")
    takeaways = next(c["source"] for c in cells if c["source"].startswith("## Key takeaways"))
    assert 3 <= sum(line.startswith("- ") for line in takeaways.splitlines()) <= 5
    answer = next(c["source"] for c in cells if c["source"].startswith("## The 30-second answer"))
    assert re.search(r"^\*\*Question:\*\* .+", answer, re.MULTILINE)
    assert re.search(r"<details><summary>Answer</summary>.+</details>\s*$", answer, re.DOTALL)
