"""docs/workshops.md can be taught as written: every block's agenda adds up to its length, its rows fit the cells
they show, it has a cut list and one hands-on exercise that exists, the times leave no gap, the pre-run covers
every chapter shown, and the plan names the one cache place that `prepare_class.sh` fills."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from cl_lab import exercises

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


wt = _load("workshop_times")
TEXT = wt.WORKSHOPS.read_text(encoding="utf-8")
BLOCKS = wt.blocks(TEXT)
PLANS = {"The 3-hour workshop": ("0:00", "3:00"), "The 1-day course": ("9:00", "17:00")}


def test_both_plans_have_blocks():
    assert set(wt.plan_sections(TEXT)) == set(PLANS)
    assert {b.plan for b in BLOCKS} == set(PLANS)
    assert sum(b.plan == "The 3-hour workshop" for b in BLOCKS) >= 4
    assert sum(b.plan == "The 1-day course" for b in BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.plan[4:9]}·{b.title[:7]}")
def test_agenda_minutes_add_up_to_the_block(block):
    assert block.rows, f"{block.title}: no agenda rows"
    assert sum(r.minutes for r in block.rows) == block.minutes, f"{block.title}: the agenda's minutes"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.plan[4:9]}·{b.title[:7]}")
def test_every_row_gives_its_cells_the_minutes_they_need(block):
    shows = [r for r in block.rows if r.text.startswith("**Show**")]
    assert shows and all(r.cells for r in shows), f"{block.title}: a Show row that links no cell"
    for row in block.rows:
        assert wt.row_need(row) <= row.minutes, (
            f"{block.title}: {row.minutes} min for cells that need {wt.row_need(row):.1f} — {row.text[:80]}")


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.plan[4:9]}·{b.title[:7]}")
def test_one_hands_on_exercise_that_exists_in_the_blocks_chapters(block):
    known = {e.name: e for e in exercises.all()}
    assert block.exercise in known, f"{block.title}: {block.exercise!r} is not in exercises.all()"
    exercise = known[block.exercise]
    assert exercise.chapter in block.chapters, f"{block.title}: exercise of chapter {exercise.chapter}"
    assert block.hands_on[0].minutes >= exercise.minutes, f"{block.title}: less time than the exercise's estimate"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.plan[4:9]}·{b.title[:7]}")
def test_a_cut_list_that_says_what_each_cut_saves(block):
    assert len(block.cuts) >= 2, f"{block.title}: a cut list of at least two items"
    saved = [wt._SAVES.search(cut) for cut in block.cuts]
    assert all(saved), f"{block.title}: every cut says (saves N min)"
    assert sum(int(m.group(1)) for m in saved) < block.minutes


@pytest.mark.parametrize("plan", PLANS)
def test_the_plans_times_leave_no_gap(plan):
    spans = wt.intervals(wt.plan_sections(TEXT)[plan])
    start, end = (wt.clock(t) for t in PLANS[plan])
    assert spans[0][0] == start and spans[-1][1] == end, f"{plan}: from {PLANS[plan][0]} to {PLANS[plan][1]}"
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"{plan}: blocks, breaks and lunch must abut"


@pytest.mark.parametrize("plan", PLANS)
def test_the_pre_run_covers_every_chapter_the_plan_shows(plan):
    section = wt.plan_sections(TEXT)[plan]
    line = re.search(r"^\*\*Pre-run:\*\* `\.venv/bin/python scripts/build_book\.py([\d ]*)`", section, re.MULTILINE)
    assert line, f"{plan}: a **Pre-run:** line with its build_book.py command"
    every = {p.name[:2] for p in wt.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    pre_run = set(line.group(1).split()) or every
    shown = {notebook[:2] for notebook, _ in wt._CELL_LINK.findall(section)}
    assert shown and shown <= pre_run, f"{plan}: shown but not pre-run: {sorted(shown - pre_run)}"


def test_the_plan_names_the_one_cache_place_that_prepare_class_fills(monkeypatch, tmp_path):
    from cl_lab.lm import cache

    monkeypatch.delenv("CL_LAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / ".cache" / "cl_lab" / "lm"
    for text in (TEXT, (ROOT / "README.md").read_text(encoding="utf-8")):
        assert "bash scripts/prepare_class.sh" in text and "~/.cache/cl_lab/lm/" in text
    assert "$CL_LAB_CACHE/lm/" in TEXT and "### The Colab path" in TEXT
    assert "lm.tiny_lm(seed=0)\"`" not in TEXT, "the old once-per-machine step is replaced by prepare_class.sh"


def test_readme_times_with_and_without_a_colab_column():
    badge = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://x/01_a.ipynb)"
    with_colab = f"| [01_a](notebooks/01_a.ipynb) | {badge} | teaches a | 80 s | ready |\n"
    without = "| [02_b](notebooks/02_b.ipynb) | teaches b | 43 s | ready: 5 claims |\n"
    assert wt.readme_times(with_colab + without) == {"01": "80 s", "02": "43 s"}


def test_a_row_over_budget_and_a_missing_cell_are_caught(tmp_path, monkeypatch):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(" ".join(["word"] * 300) + "\n<details>" + "x " * 900 + "</details>"),
                nbformat.v4.new_code_cell("plot()")]
    nbformat.write(nb, tmp_path / "01_demo.ipynb")
    monkeypatch.setattr(wt, "NOTEBOOKS", tmp_path)
    wt._cells.cache_clear()
    link = "[{0}](../notebooks/01_demo.ipynb#cell-id={1})"
    plan = ("## The 3-hour workshop\n\n### Block 1 · Demo (0:00–0:10)\n\n| min | what happens |\n|---|---|\n"
            f"| 3 | **Show** {link.format('prose', nb.cells[0].id)} and {link.format('figure', nb.cells[1].id)} |\n"
            "| 7 | **Hands-on** · `bwt_and_forgetting` |\n\n**Cut when running late**, in this order:\n"
            "- *(saves 2 min)* a\n- *(saves 1 min)* b\n")
    try:
        (block,) = wt.blocks(plan)
        assert (block.minutes, block.exercise, len(block.cuts)) == (10, "bwt_and_forgetting", 2)
        assert wt.row_need(block.rows[0]) == pytest.approx(1 + 300 / 150 + 1), "folded words are not counted"
        assert wt.row_need(block.rows[0]) > block.rows[0].minutes
        with pytest.raises(LookupError, match="has no cell"):
            wt.cell_minutes("01_demo.ipynb", "gone")
    finally:
        wt._cells.cache_clear()


def test_refreshing_the_times_keeps_the_blank_line_after_a_table():
    row = "| [01_a](../notebooks/01_a.ipynb) | §1 | {} |"
    assert wt.refreshed(row.format("9 s") + "\n\nnext", {"01": "80 s"}) == row.format("80 s") + "\n\nnext"
