"""scripts/cheatsheet.py: the cheat-sheet and the Anki deck match the notebooks (so CI keeps them in sync), and the
parsing of takeaways, 30-second answers, drill questions and their follow-ups, on a hand-made notebook."""

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cheatsheet = _load("cheatsheet")

TAKEAWAYS = ("## Key takeaways\n- Forgetting is overwriting:\n  shared weights, new gradients.\n- Replay helps.\n"
             "- $\\lambda$ trades.")
THIRTY = ("## The 30-second answer\n**Question:** Why do networks forget?\n<details><summary>Answer</summary>\n\n"
          "Kirkpatrick et al. found …; here BWT is about −0.5.\n</details>")
DRILL_ONE = ("## Interview drill\n\n**L1.** What is forgetting?\n\n<details><summary>Answer</summary>\n\nOverwriting, "
             "$x_i^2$ grows.\n</details>\n\nFollow-up: *is it capacity?*\n"
             "<details><summary>Answer</summary>No.</details>")
DRILL_TWO = "<details><summary><b>L2.</b> Why Class-IL?</summary>\n\nNo task id.\n</details>"
DRILL_THREE = ("**L3.** Derive it.\n<details><summary>Answer</summary>\nA.\n</details>\n"
               "<details><summary>Answer</summary>B.</details>")


def _chapter(folder: Path, number: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {number} · Demo chapter"),
                *(nbformat.v4.new_markdown_cell(c) for c in cells)]
    path = folder / f"{number}_demo.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def demo(tmp_path):
    _chapter(tmp_path, "01", [DRILL_ONE, DRILL_TWO, DRILL_THREE, TAKEAWAYS, THIRTY])
    _chapter(tmp_path, "02", ["**L1.** Only a drill?\n<details><summary>Answer</summary>Yes.</details>"])
    return cheatsheet.sheets(tmp_path)


def test_committed_cheatsheet_and_deck_match_the_notebooks():
    assert cheatsheet.main(["--check"]) == 0, "run: python scripts/cheatsheet.py"


def test_takeaways_and_the_30_second_answer(demo):
    first, second = demo
    assert first.takeaways == ["Forgetting is overwriting: shared weights, new gradients.", "Replay helps.",
                               "$\\lambda$ trades."]
    assert (first.question, first.answer) == ("Why do networks forget?", "Kirkpatrick et al. found …; here BWT is "
                                                                         "about −0.5.")
    assert not second.takeaways and not second.question


def test_every_drill_question_follow_up_and_30_second_answer_is_a_card(demo):
    first, second = demo
    got = [(c.kind, c.question, c.answer) for c in first.cards]
    assert got == [("L1", "What is forgetting?", "Overwriting, $x_i^2$ grows."),
                   ("L1 follow-up", "What is forgetting?\n\nFollow-up: *is it capacity?*", "No."),
                   ("L2", "Why Class-IL?", "No task id."),
                   ("L3", "Derive it.", "A.\n\nB."),
                   ("30-second answer", "Why do networks forget?", first.answer)]
    assert [c.kind for c in second.cards] == ["L1"]


def test_cheatsheet_has_a_section_per_chapter_and_says_what_is_to_come(demo):
    text = cheatsheet.render_cheatsheet(demo)
    assert "## [01 · Demo chapter](../notebooks/01_demo.ipynb)" in text
    assert "- Forgetting is overwriting: shared weights, new gradients." in text
    assert "**The 30-second answer.** *Why do networks forget?*" in text and "about −0.5" in text
    assert "To come: 02." in text and text.count("to come.*") == 1
    assert "an Anki deck of 6 cards" in text


@pytest.mark.parametrize("cell, problem", [
    ("## Key takeaways\n- one\n- two", "3 to 5"),
    ("## The 30-second answer\n**Question:** Why?\n\nNo fold here.", "needs '\\*\\*Question"),
    ("## The 30-second answer\n<details><summary>Answer</summary>x</details>", "needs '\\*\\*Question"),
])
def test_a_malformed_closing_cell_names_notebook_and_cell(tmp_path, cell, problem):
    _chapter(tmp_path, "03", ["intro", cell])
    with pytest.raises(ValueError, match=problem) as error:
        cheatsheet.sheets(tmp_path)
    assert "03_demo.ipynb cell 2" in str(error.value)


def test_deck_round_trip_and_stable_ids(demo, tmp_path):
    path = tmp_path / "deck.apkg"
    assert cheatsheet.write_deck(demo, path) == 6
    notes = cheatsheet.deck_notes(path)
    assert notes == cheatsheet.expected_notes(demo)
    assert len({guid for guid, _, _ in notes}) == 6
    demo[0].cards[0].answer = "A better answer."  # an edited answer updates the card: same id, new back
    edited = cheatsheet.expected_notes(demo)
    assert edited[0][0] == notes[0][0] and edited[0][1][1] != notes[0][1][1]
    front, back, chapter = notes[0][1]
    assert front == "<p>What is forgetting?</p>" and chapter == "01 · Demo chapter · L1"
    assert "\\(x_i^2\\)" in back, "inline math goes to MathJax's \\( \\) delimiters, untouched by Markdown"
    assert notes[1][2] == ["L1", "ch01", "cl-lab", "follow-up"] and notes[4][2] == ["30-second", "ch01", "cl-lab"]


def test_math_survives_markdown():
    assert cheatsheet.to_html("a $x_1 * y_2 < z$ b $$\\sum_i w_i$$") == (
        "<p>a \\(x_1 * y_2 &lt; z\\) b \\[\\sum_i w_i\\]</p>")
    assert cheatsheet.to_html("costs \\$5 and $6") == "<p>costs $5 and $6</p>"


def test_each_drill_question_of_the_index_gives_a_card():
    qi = _load("question_index")
    for chapter in qi.chapters().values():
        cards = [c for c in cheatsheet.chapter_sheet(chapter).cards if "follow-up" not in c.kind and c.kind[0] == "L"]
        assert [c.kind for c in cards] == [q.level for q in qi.drill_questions(chapter)], chapter.path.name
