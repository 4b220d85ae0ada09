"""docs/: the question index is complete (D1–D8, L1–L3 with follow-ups, every drill question) and current, every
link lands on an existing notebook and section heading, and the workshop plans quote the README's run times."""

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

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


def test_source_questions_cover_l1_to_l3_with_follow_ups_and_d1_to_d8():
    ids = [e["id"] for e in yaml.safe_load(qi.MAP.read_text(encoding="utf-8"))["questions"]]
    expected = [f"L{(n - 1) // 4 + 1}.{n}" for n in range(1, 13)]
    expected = [x for q in expected for x in (q, f"{q} follow-up")] + [f"D{n}" for n in range(1, 9)]
    assert ids == expected
    text = INDEX.read_text(encoding="utf-8")
    assert all(f"| {i} |" in text for i in ids)


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
