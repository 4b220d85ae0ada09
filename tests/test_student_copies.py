"""Student copies: every folded answer and every `solution` cell gone, every question kept, no answer left outside
a fold, the copies still run, and the instructor notebooks untouched (byte for byte)."""

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# Two chapters whose SMOKE variant is among the quickest: the command's --check mode runs them all.
EXECUTED = ("05", "07")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


student = _load("student_copies")
DRILL = re.compile(r"(\*\*|<b>)\s*(L[123])\.\s*(\*\*|</b>)\s*(.+)")


def _folds(markdown: str, hints: bool) -> list[str]:
    """The folded text of every <details> block that is (``hints``) or is not a hint."""
    bodies = []
    for start, end in student.details_blocks(markdown):
        block = markdown[start:end]
        summary = re.search(r"<summary\b[^>]*>(.*?)</summary>", block, re.DOTALL | re.IGNORECASE)
        if bool(summary and student._HINT_LABEL.match(student._plain(summary.group(1)))) != hints:
            continue
        body = block[summary.end():] if summary else block
        bodies.append(re.sub(r"</details>\s*$", "", body, flags=re.IGNORECASE).strip())
    return [b for b in bodies if b]


def _answers(markdown: str) -> list[str]:
    """What must not reach the student: every fold but the hints."""
    return _folds(markdown, hints=False)


def _questions(nb) -> list[str]:
    return [m.group(4).split("</summary>")[0].strip() for cell in nb.cells if cell.cell_type == "markdown"
            for m in DRILL.finditer(cell.source)]


def _digest() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in NOTEBOOKS}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    before = _digest()
    out = tmp_path_factory.mktemp("student")
    written = student.write_student_copies(out)
    return before, {p.name: p for p in written}


def test_instructor_notebooks_are_byte_identical_after(copies):
    before, written = copies
    assert _digest() == before
    assert sorted(written) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_answers_gone_questions_kept(copies, path):
    _, written = copies
    teacher = nbformat.read(path, as_version=4)
    pupil = nbformat.read(written[path.name], as_version=4)
    pupil_text = "\n".join(c.source for c in pupil.cells)
    answers = [a for c in teacher.cells if c.cell_type == "markdown" for a in _answers(c.source)]
    assert answers, f"{path.name} folds no answer in <details>: the template asks for them"
    leaked = [a[:60] for a in answers if a in pupil_text]
    assert not leaked, f"{path.name}: answers still in the student copy: {leaked}"
    hints = [h for c in teacher.cells if c.cell_type == "markdown" for h in _folds(c.source, hints=True)]
    assert all(h in pupil_text for h in hints), "the graded hints stay in the student copy"
    assert not any("solution" in c.metadata.get("tags", []) for c in pupil.cells)
    assert _questions(pupil) == _questions(teacher)
    kept_code = [c.source for c in teacher.cells if c.cell_type == "code"
                 and "solution" not in c.metadata.get("tags", [])]
    assert [c.source for c in pupil.cells if c.cell_type == "code"] == kept_code, "a check or code cell went missing"
    assert pupil_text.count(student.PLACEHOLDER) == len(answers)


def test_hand_made_notebook_every_form(tmp_path):
    """The forms the chapters use, and a `solution` code cell, which no chapter has yet."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("**L1.** What is forgetting?\n<details><summary>Answer</summary>\nSECRET-1\n"
                                      "</details>\nFollow-up question?"),
        nbformat.v4.new_markdown_cell("<details><summary><b>L2.</b> Why Class-IL?</summary>\n\nSECRET-2\n</details>"),
        nbformat.v4.new_markdown_cell("1. Try λ = 10.\n   <details><summary>Solution</summary>SECRET-3 <details>"
                                      "<summary>more</summary>SECRET-4</details></details>"),
        nbformat.v4.new_markdown_cell("<details><summary>Hint</summary>look at section 2</details>"),
        nbformat.v4.new_code_cell("print('the exercise scaffold')"),
        nbformat.v4.new_code_cell("print('SECRET-5')", metadata={"tags": ["solution"]}),
        nbformat.v4.new_code_cell("check.at_least(acc, 0.9, 'claim')"),
        nbformat.v4.new_markdown_cell("### Exercise 1.1 · Min-ACC ⭐⭐ · about 15 min\nWrite `min_acc(curves)`."),
        nbformat.v4.new_code_cell("def min_acc(curves):\n    raise NotImplementedError"),
        nbformat.v4.new_code_cell("exercises.check_min_acc(min_acc)"),
        nbformat.v4.new_markdown_cell("<details><summary>Hint 1</summary>after the task end</details>\n"
                                      "<details><summary>Hint 2</summary>strictly after</details>\n"
                                      "<details><summary>Solution</summary>SECRET-6</details>"),
    ]
    (tmp_path / "in").mkdir()
    nbformat.write(nb, tmp_path / "in" / "01_demo.ipynb")
    (copy,) = student.write_student_copies(tmp_path / "out", folder=tmp_path / "in")
    text = copy.read_text()
    assert "SECRET" not in text
    pupil = nbformat.read(copy, as_version=4)
    assert pupil.cells[0].source.startswith("**L1.** What is forgetting?") and "Follow-up question?" in text
    assert pupil.cells[1].source.startswith("<b>L2.</b> Why Class-IL?")
    assert "look at section 2" in text, "a hint is not an answer"
    assert [c.source for c in pupil.cells if c.cell_type == "code"] == [
        "print('the exercise scaffold')", "check.at_least(acc, 0.9, 'claim')",
        "def min_acc(curves):\n    raise NotImplementedError", "exercises.check_min_acc(min_acc)"]
    assert "after the task end" in text and "strictly after" in text, "both graded hints stay"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nothing_outside_the_folds_gives_an_answer_away(path):
    leaks = student.notebook_leaks(path)
    assert not leaks, "answer text a student copy would show (fold it in <details>):\n" + "\n".join(leaks)


@pytest.mark.parametrize("markdown, form", [
    ("Follow-up: *what accuracy does it get?* (its share of the test set: 0.2 here).", "text after its last"),
    ("Follow-ups: *which keys?* (those with $(C^{-1}k^*)^\\top k = 0$); *how is $v^*$ found?*", "between its"),
    ("Follow-ups: *what would make it exact?* Routing (a task id). *Is it a projection?*", "between its"),
    ("Follow-up: *and without the base model?* Replay only needs its data.", "text after its last"),
    ("**L1.** Why?\n\nAnswer: because.", "answer label"),
    ("**Solution:** set λ to 10.", "answer label"),
    ("<details><summary>Answer</summary>x</details>\n\nFollow-up: *why?* (y)", "text after its last"),
])
def test_each_leak_form_is_found(markdown, form):
    (leak,) = student.answer_leaks(student.strip_answers(markdown))
    assert form in leak


@pytest.mark.parametrize("markdown", [
    "Follow-up: *what do you need to see it?*\n<details><summary>Answer</summary>(every iteration)</details>",
    "Follow-ups: *why not random?* *Does LoRA care about the transpose?*\n\n<details><summary>Answer</summary>"
    "No.</details>",
    "<details><summary>Follow-up: why noise?</summary>(it keeps the positions)</details>",
    "Follow-up: derive the update for two tasks.",
    "The DPO model's answers: KL of 4.5–6.5 nats. Why isn't it the default? (cheat-sheet L3 Q12)",
    "<details><summary>Hint 1</summary>Solution: not here, this is a hint fold</details>",
])
def test_questions_and_prose_are_not_leaks(markdown):
    assert student.answer_leaks(student.strip_answers(markdown)) == []


LEAKY_COMMIT = "7e3c571"  # the chapters as issue 20 found them: follow-up answers outside the folds


def _at_commit(name: str, folder: Path) -> Path | None:
    shown = subprocess.run(["git", "show", f"{LEAKY_COMMIT}:notebooks/{name}"], cwd=ROOT, capture_output=True)
    if shown.returncode:
        return None
    (folder / name).write_bytes(shown.stdout)
    return folder / name


def test_the_leaks_issue_20_found_are_caught(tmp_path):
    """Issue 20's list (ch07 cells 31-33, ch08 40-42, ch09 51 and 55, ch11 38-41), read from the commit it was
    filed against; ch09's cells 53 and 56 leaked the same way."""
    expected = {"07_classil_head_bias.ipynb": [31, 32, 33], "08_stability_gap.ipynb": [40, 41, 42],
                "09_lora_cl.ipynb": [51, 53, 55, 56], "11_rome_edit.ipynb": [38, 39, 40, 41]}
    for name, cells in expected.items():
        path = _at_commit(name, tmp_path)
        if path is None:
            pytest.skip(f"commit {LEAKY_COMMIT} is not in this clone (shallow?)")
        found = sorted({int(re.search(r"cell (\d+)", leak).group(1)) for leak in student.notebook_leaks(path)})
        assert found == cells, f"{name}: leaks found in cells {found}, expected {cells}"


def test_an_unclosed_details_block_is_an_error():
    with pytest.raises(ValueError, match="not closed"):
        student.strip_answers("<details><summary>Answer</summary> forgot to close")


@pytest.mark.parametrize("chapter", EXECUTED)
def test_student_copy_executes_in_smoke(copies, chapter):
    _, written = copies
    (name,) = [n for n in written if n.startswith(chapter)]
    assert student.execute_smoke(written[name]) > 0
