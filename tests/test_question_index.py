"""docs/: the question index is complete (every question of the five source notes, every drill question) and
current, every link lands on an existing notebook and section heading, and the workshop plans quote the README's
run times."""

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "docs" / "questions.md"
LINK = re.compile(r"\]\((\.\./notebooks/[^)#\s]+)#([^)\s]+)\)")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


qi = _load("question_index")


def test_index_is_up_to_date():
    assert INDEX.read_text(encoding="utf-8") == qi.render(), "run: python scripts/question_index.py"


def test_every_link_lands_on_a_section_or_a_cell_of_an_existing_notebook():
    import nbformat

    found = {c.path.name: c for c in qi.chapters().values()}
    links = LINK.findall(INDEX.read_text(encoding="utf-8"))
    assert len(links) > 50
    assert sum(fragment.startswith("cell-id=") for _, fragment in links) > 50
    for rel, fragment in links:
        path = (INDEX.parent / rel).resolve()
        assert path.exists(), f"{rel}: no such notebook"
        if fragment.startswith("cell-id="):
            ids = {c.id for c in nbformat.read(path, as_version=4).cells}
            assert fragment.removeprefix("cell-id=") in ids, f"{rel}#{fragment}: no cell with that id"
            continue
        anchors = {unquote(qi.jupyterlab_anchor(h)) for h in found[path.name].headings}
        assert unquote(fragment) in anchors, f"{rel}#{fragment}: no such section heading"


def test_each_drill_question_links_to_the_cell_that_asks_it():
    import nbformat

    for chapter in qi.chapters().values():
        cells = {c.id: c.source for c in nbformat.read(chapter.path, as_version=4).cells}
        for q in qi.drill_questions(chapter):
            assert q.text.split()[0] in cells[q.cell_id] and q.level in cells[q.cell_id], (chapter.number, q.text)
            assert f"#cell-id={q.cell_id})" in qi.question_link(chapter, q)


SOURCES = ROOT.parent / "shared" / "sources"
_L001 = [f"L{(n - 1) // 4 + 1}.{n}" for n in range(1, 13)]
# Every question each source note raises, by the id docs/question_map.yml gives it (a new question needs an entry).
SOURCE_IDS = {
    "000": ["Q1", "Q2", "Q3", "Q3 follow-up", "Q4", "Q5"],
    "001": [x for q in _L001 for x in (q, f"{q} follow-up")] + [f"D{n}" for n in range(1, 9)],
    "002": [f"Q{n}" for n in range(8)],
    "003": ["L1.1", "L1.2", "L1.3", "L2.1", "L2.2", "L2.3", "L3.1", "L3.2", "L3.3", "L3.4", "L3.5",
            "§1.1", "§2.4", "§2.5", "§5"],
    "004": ["Q0", "Q0 follow-up", "Q1", "Q2", "Q3", "Q4", "Q5"],
}


def _asked_in_note(note: str, text: str) -> int:
    """How many questions a source note asks in its own words: the prompts its map entries paraphrase."""
    if note == "000":  # the opening question, then the interviewer's prompts
        return 1 + len(re.findall(r'^Interviewer: "', text, re.MULTILINE))
    if note == "001":  # the numbered level questions with a follow-up each, and the deep dives
        levels = text[text.index("L1 Foundations"):text.index("D1.")]
        return 2 * len(re.findall(r"^\d+\. ", levels, re.MULTILINE)) + len(re.findall(r"^D\d\. ", text, re.MULTILINE))
    if note == "002":
        return text.count("**Interviewer:**")
    if note == "003":  # the stratified follow-ups, one question mark each
        return text[text.index("Stratified Interview Follow-ups"):text.index("§A")].count("?")
    if note == "004":
        return len(re.findall(r'^- "', text[text.index("Questions This Context Helps You Answer"):], re.MULTILINE))
    raise ValueError(f"no counting rule for source note {note!r}: add one to _asked_in_note")


_ASKED_ID = {"000": r"Q\d", "001": r"(L\d\.\d+( follow-up)?|D\d)", "002": r"Q\d", "003": r"L\d\.\d", "004": r"Q[1-9]"}


def test_every_source_note_has_a_table_and_every_question_an_entry():
    sources = qi.source_map()
    assert [s["note"] for s in sources] == sorted(SOURCE_IDS)
    text = INDEX.read_text(encoding="utf-8")
    for source in sources:
        ids = [e["id"] for e in source["questions"]]
        assert ids == SOURCE_IDS[source["note"]], f"source {source['note']}: the map's ids changed"
        assert all(e["question"].strip() and (e.get("answered_in") or e.get("planned") or e.get("note"))
                   for e in source["questions"]), f"source {source['note']}: an entry with no question or no status"
        table = text.split(f"### {source['note']} · ", 1)[1].split("\n### ", 1)[0]
        assert all(f"| {i} |" in table for i in ids), f"source {source['note']}: a question missing from its table"


@pytest.mark.skipif(not SOURCES.is_dir(), reason="the source notes (../shared/sources) are not beside this clone")
@pytest.mark.parametrize("note", sorted(SOURCE_IDS))
def test_the_map_has_as_many_entries_as_the_note_asks_questions(note):
    source = next(s for s in qi.source_map() if s["note"] == note)
    asked = _asked_in_note(note, (SOURCES / source["file"]).read_text(encoding="utf-8"))
    entries = [e["id"] for e in source["questions"] if re.fullmatch(_ASKED_ID[note], e["id"])]
    assert len(entries) == asked, f"source {note} asks {asked} questions, the map has {len(entries)} entries for them"


def test_planned_names_a_chapter_and_a_bad_value_is_reported():
    planned = [e for s in qi.source_map() for e in s["questions"] if e.get("planned")]  # none left: every one answered
    assert all(qi.planned_text(e).startswith("*planned, chapter ") for e in planned)
    assert qi.planned_text({"id": "X", "planned": "09: the same tasks in every order"}) == (
        "*planned, chapter 09:* the same tasks in every order")
    with pytest.raises(ValueError, match="planned must read"):
        qi.planned_text({"id": "X", "planned": "soon"})


def test_every_drill_question_is_listed():
    text = INDEX.read_text(encoding="utf-8")
    questions = [q for c in qi.chapters().values() for q in qi.drill_questions(c)]
    assert questions, "no drill question found in any notebook"
    missing = [q.text for c in qi.chapters().values() for q in qi.drill_questions(c)
               if f"| {q.level} | {qi._cell(qi.question_link(c, q))} |" not in text]
    assert not missing


def test_drill_questions_in_one_long_cell_and_one_per_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 01 · Demo"), nbformat.v4.new_markdown_cell("## 2 · Mechanism"),
                nbformat.v4.new_markdown_cell("## Interview drill\n\n<details><summary><b>L1.</b> First?</summary>"
                                              "\nSee section 2.\n</details>\n\n**L2.** Second, over\ntwo lines?\n"
                                              "<details><summary>Answer</summary>no</details>"),
                nbformat.v4.new_markdown_cell("**L3.** Third?\n<details><summary>Answer</summary>x</details>")]
    nbformat.write(nb, tmp_path / "01_demo.ipynb")
    chapter = qi.chapters(tmp_path)["01"]
    got = [(q.level, q.text, q.answered_in.heading, [t.heading for t in q.see_also], q.cell_id)
           for q in qi.drill_questions(chapter)]
    drill, third = nb.cells[2].id, nb.cells[3].id
    assert got == [("L1", "First?", "Interview drill", ["2 · Mechanism"], drill),
                   ("L2", "Second, over two lines?", "Interview drill", [], drill),
                   ("L3", "Third?", "Interview drill", [], third)]
    link = qi.question_link(chapter, qi.drill_questions(chapter)[2])
    assert link == f"[Third?](../notebooks/01_demo.ipynb#cell-id={third})"


def test_a_renamed_section_is_reported_not_linked():
    chapter = next(iter(qi.chapters().values()))
    with pytest.raises(LookupError, match="no section heading containing"):
        qi.find_section(chapter, "a heading nobody wrote")


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_pages_anchors_land_on_a_heading_or_a_cell(page):
    import nbformat

    found = {c.path.name: c for c in qi.chapters().values()}
    for rel, fragment in LINK.findall(page.read_text(encoding="utf-8")):
        path = (page.parent / rel).resolve()
        if fragment.startswith("cell-id="):
            assert fragment.removeprefix("cell-id=") in {c.id for c in nbformat.read(path, as_version=4).cells}
        else:
            anchors = {unquote(qi.jupyterlab_anchor(h)) for h in found[path.name].headings}
            assert unquote(fragment) in anchors, f"{page.name}: {rel}#{fragment} is no section heading of {path.name}"


GLOSSARY_TERMS = ["R (accuracy matrix)", "AA", "BWT", "FWT", "Forgetting", "Min-ACC", "WC-ACC", "Task-IL, Domain-IL",
                  "Fisher information, exact", "Fisher, empirical", "Fisher, batch-squared", "EWC", "SI", "MAS", "LwF",
                  "ER", "DER", "GEM", "A-GEM", "ProgNN", "PackNet", "WA", "BiC", "Stability gap", "LoRA",
                  "Task vector", "TIES", "DARE", "k*, v*", "Causal tracing", "ROME", "MEMIT", "DPO", "Alignment tax",
                  "KL to reference", "Re-warming"]


def test_glossary_defines_each_term_once_with_a_link():
    entries = re.findall(r"^- \*\*(.+?)\.\*\* (.+)$", (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8"),
                         re.MULTILINE)
    terms = [term for term, _ in entries]
    assert len(terms) == len(set(terms))
    missing = [t for t in GLOSSARY_TERMS if not any(term.startswith(t) or f", {t}" in term for term in terms)]
    assert not missing, f"the glossary lacks {missing}"
    assert all(LINK.search(body) for _, body in entries), "every entry links to the section that defines it"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_pages_link_only_to_existing_notebooks_and_pages(page):
    for target in re.findall(r"\]\(([^)#\s]+\.(?:ipynb|md))(?:#[^)\s]*)?\)", page.read_text(encoding="utf-8")):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_workshop_plans_quote_the_readme_run_times():
    wt = _load("workshop_times")
    times = wt.readme_times((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(times) >= 12, "the README's chapter table was not found"
    assert wt.main(["--check"]) == 0, "run: python scripts/workshop_times.py"
