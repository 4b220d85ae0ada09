"""The rendered book: check.report()'s claims table, and one chapter built and opened in headless Chromium."""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from cl_lab import check


@pytest.fixture
def fresh_records():
    check.clear_records()
    check.use_defaults(True)
    yield
    check.clear_records()
    check.use_defaults(True)


def test_report_lists_every_claim_with_measured_bound_and_result(fresh_records):
    check.at_least(0.93, 0.90, "EWC keeps task 1 above 90 %")
    check.use_defaults(False)
    check.at_most(0.5, 0.1, "a lesson claim off the defaults")
    check.close(1.0, 1.0, "an identity", always=True)
    rows = check.report().rows
    assert [(r.claim, r.measured, r.bound, r.status) for r in rows] == [
        ("EWC keeps task 1 above 90 %", "0.93", "≥ 0.9", "passed"),
        ("a lesson claim off the defaults", "0.5", "≤ 0.1", "skipped"),
        ("an identity", "1", "≈ 1 (rtol=1e-05, atol=0)", "passed")]
    assert "parameters differ" in rows[1].note
    html = check.report()._repr_html_()
    assert html.count("<tr class=") == 3 and 'class="cl-lab-claims"' in html
    assert "3 claims checked: 2 passed, 1 skipped, 0 failed" in repr(check.report())


def test_report_records_a_failed_claim_and_escapes_html(fresh_records):
    with pytest.raises(check.ClaimFailed):
        check.greater(0.1, 0.2, "<b>gap</b> beyond the null", margin=0.05)
    (row,) = check.report().rows
    assert (row.measured, row.bound, row.status) == ("0.1", "> 0.2 + 0.05", "FAILED")
    assert "&lt;b&gt;gap" in check.report()._repr_html_()


def test_rerunning_a_cell_replaces_its_rows_and_a_loop_keeps_each(fresh_records, monkeypatch):
    cell = {"n": 1}
    monkeypatch.setattr(check, "_execution_count", lambda: cell["n"])
    for value in (0.95, 0.96):
        check.at_least(value, 0.9, "each seed keeps task 1")
    cell["n"] = 2  # the same cell run again
    for value in (0.97, 0.98):
        check.at_least(value, 0.9, "each seed keeps task 1")
    assert [r.measured for r in check.report().rows] == ["0.97", "0.98"]


# --- the book, built for one chapter in its SMOKE variant and opened in headless Chromium ---------------------

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "05"  # quick in SMOKE, with figures; any chapter works: python scripts/build_book.py NN --smoke
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


book = _load("build_book")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    assert book.build([CHAPTER], out, smoke=True, executed=None, timeout=600) == 0
    (page,) = (out / "html").glob(f"{CHAPTER}_*.html")
    return out / "html", page


def test_home_page_is_the_readme_chapter_table_with_a_sidebar(built):
    html, page = built
    home = (html / "index.html").read_text(encoding="utf-8")
    readme_rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                   if re.match(r"\| \[\d\d_", line)]
    assert readme_rows and home.count("<tr") == len(readme_rows) + 1, "the README's chapter table, row for row"
    assert f'href="{page.name}"' in home, "the built chapter is linked from the table and the sidebar"
    assert "bd-sidebar-primary" in home


def test_a_link_to_a_drill_cell_lands_on_that_cell_in_the_book(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("## Interview drill"), nbformat.v4.new_markdown_cell("**L1.** Why?")]
    path = tmp_path / "05_demo.ipynb"
    nbformat.write(nb, path)
    page = tmp_path / "questions.md"
    page.write_text(f"| L1 | [Why?](../notebooks/05_demo.ipynb#cell-id={nb.cells[1].id}) |", encoding="utf-8")
    ids = book.linked_cells([page])
    assert ids == {nb.cells[1].id}
    book.anchor_cells(path, ids)
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].source == "## Interview drill"
    assert cells[1].source == f'<a id="cell-id={nb.cells[1].id}"></a>\n\n**L1.** Why?'
    link = page.read_text(encoding="utf-8")
    assert book.book_links(link, {"05_demo": []}) == (
        f'| L1 | <a href="05_demo.html#cell-id={nb.cells[1].id}">Why?</a> |')
    assert book.book_links(link, {}) == "| L1 | Why? |", "a chapter not in this build: plain text"


def test_question_index_links_land_on_the_chapter_sections(built):
    html, page = built
    questions = (html / "questions.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
    targets = re.findall(rf'href="{re.escape(page.name)}#([^"]+)"', questions)
    assert targets and set(targets) <= ids


def test_the_claims_ledger_is_a_page_of_the_book(built):
    html, _ = built
    ledger_page = (html / "ledger.html").read_text(encoding="utf-8")
    assert "The claims ledger" in ledger_page and 'href="ledger.html"' in (html / "index.html").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is absent: bash scripts/install_browser.sh")
def test_chapter_page_shows_title_figure_and_claims_in_chromium(built):
    from playwright.sync_api import sync_playwright

    _, page_path = built
    title = book.headings(next((ROOT / "notebooks").glob(f"{CHAPTER}_*.ipynb")))[0]
    shot = ROOT / ".ci-work" / f"book-{CHAPTER}.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(page_path.as_uri())
            assert page.locator("h1").first.inner_text().replace("#", "").strip() == title
            page.wait_for_function("() => [...document.querySelectorAll('main img')]"
                                   ".some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            claims = page.locator("table.cl-lab-claims")
            claims.scroll_into_view_if_needed()
            assert claims.is_visible() and claims.locator("tbody tr").count() > 0
            assert "claims checked" in claims.locator("caption").inner_text()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 0


def test_a_failing_claim_runs_on_and_is_marked_failed_in_the_table(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from cl_lab import check\ncheck.at_least(0.1, 0.5, 'a claim that broke')"),
                nbformat.v4.new_code_cell("check.at_least(0.9, 0.5, 'a later claim')")]
    nbformat.write(nb, tmp_path / "01_demo.ipynb")
    _, error = book.execute(tmp_path / "01_demo.ipynb", tmp_path / "out.ipynb", smoke=False, timeout=120)
    assert "a claim that broke" in error
    table = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["data"]["text/html"]
    assert table.count('class="claim-failed"') == 1 and table.count('class="claim-passed"') == 1
