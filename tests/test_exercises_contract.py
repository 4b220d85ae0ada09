"""Every exercise of every chapter (``exercises.all()``) keeps ARENA's contract: registered with its
``check_<name>`` checker, a difficulty, minutes and at least one named wrong answer; the solution passes its
checker quickly; the stub fails as "not attempted" with the solution's signature; each named wrong answer fails on
a named property (strict=True); each notebook shows it in ARENA's form, with a Solution fold whose code passes, and
ends with the takeaways and the 30-second answer. The chapter files test what is particular to each exercise."""

import inspect
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import exercises
from cl_lab.lm import tracing

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


# ---- how each notebook shows its exercises --------------------------------------------------------------------

NOTEBOOKS = {p.name[:2]: p for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb")}
NAMESPACE = {"torch": torch, "F": F, "nn": nn, "np": np, "tracing": tracing}  # what the stubs' cells may use
# the chapters whose stubs and solutions share the exercise's function name and heading (05–10 and 14 name their
# solutions differently, e.g. `_wa_solution`, and title some exercises differently from `Exercise.title`)
FORM_CHAPTERS = ("01", "02", "03", "04", "11", "12", "13")
SHOWN = [e for e in ALL if e.chapter in FORM_CHAPTERS]


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


def _parameters(fn) -> list[tuple[str, object]]:
    """Names and defaults (a notebook's annotations may be strings where the module's are types)."""
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("exercise", SHOWN, ids=_id)
def test_the_notebook_shows_the_exercise_in_arena_form(exercise):
    shown = _shown(exercise.chapter)
    assert f"check_{exercise.name}" in shown, f"{NOTEBOOKS[exercise.chapter].name} calls no check_{exercise.name}"
    heading, stub_code, fn_name, folds = shown[f"check_{exercise.name}"]
    assert re.match(rf"### Exercise {int(exercise.chapter)}\.\d+ · {re.escape(exercise.title)}  "
                    rf"{'⭐' * exercise.difficulty} · about {exercise.minutes} min\n", heading), heading.splitlines()[0]
    assert fn_name == exercise.solution.__name__
    namespace = dict(NAMESPACE)
    exec(stub_code, namespace)
    assert _parameters(namespace[fn_name]) == _parameters(exercise.solution)
    with pytest.raises(NotImplementedError):
        exercise.properties(namespace[fn_name])
    assert folds.index("<summary>Hint 1</summary>") < folds.index("<summary>Hint 2</summary>") \
        < folds.index("<summary>Solution</summary>")
    code = re.search(r"<summary>Solution</summary>.*?```python\n(.*?)```", folds, re.DOTALL)
    assert code, "the Solution fold holds a ```python block"
    exec(code.group(1), namespace)
    assert exercise.check(namespace[fn_name], strict=True), "the Solution fold's code passes the checker"


@pytest.mark.parametrize("chapter", sorted(NOTEBOOKS))
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
