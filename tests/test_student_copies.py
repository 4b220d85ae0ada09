"""Student copies: every folded answer and every `solution` cell gone, every question kept, the copies still run,
and the instructor notebooks untouched (byte for byte)."""

import hashlib
import importlib.util
import re
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


def _answers(markdown: str) -> list[str]:
    """The folded text of every <details> block: what must not reach the student."""
    bodies = []
    for start, end in student.details_blocks(markdown):
        block = markdown[start:end]
        summary = re.search(r"<summary\b[^>]*>.*?</summary>", block, re.DOTALL | re.IGNORECASE)
        body = block[summary.end():] if summary else block
        bodies.append(re.sub(r"</details>\s*$", "", body, flags=re.IGNORECASE).strip())
    return [b for b in bodies if b]


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
        "print('the exercise scaffold')", "check.at_least(acc, 0.9, 'claim')"]


def test_an_unclosed_details_block_is_an_error():
    with pytest.raises(ValueError, match="not closed"):
        student.strip_answers("<details><summary>Answer</summary> forgot to close")


@pytest.mark.parametrize("chapter", EXECUTED)
def test_student_copy_executes_in_smoke(copies, chapter):
    _, written = copies
    (name,) = [n for n in written if n.startswith(chapter)]
    assert student.execute_smoke(written[name]) > 0
