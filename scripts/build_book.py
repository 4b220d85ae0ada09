"""Build the workbook as a static HTML book: executed chapters with their figures and claims, a sidebar, the
README's chapter table (and its concept map) as the home page, the workshop plans, the question index, the
cheat-sheet, the glossary and the claims ledger. Links from those pages to a drill question's cell
(``NN_x.ipynb#cell-id=…``) land on that cell: the book's copy of the chapter gives it that anchor.

    python scripts/build_book.py                    # every chapter at its defaults → build/book/html/index.html
    python scripts/build_book.py 05 --smoke         # one chapter, quick SMOKE variant
    python scripts/build_book.py --executed .ci-work/preflight   # render notebooks already executed there

Each chapter is executed by papermill from notebooks/ (so relative paths work) into build/book/src, with a last
cell displaying ``check.report()`` added when the chapter has none; Sphinx with myst-nb and sphinx-book-theme
renders them without executing again (docs/conf.py). Everything is installed from PyPI: ``pip install -e .[book]``.
A chapter whose cell fails (a claim that no longer holds) runs on to its end: its page shows the error where it
happened and the claims table marks the claim FAILED; the command exits 1 after the build.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
REPORT_SOURCE = "check.report()"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
REPORT_HEADING = "## Claims checked in this chapter"
_README_LINK = re.compile(r"\]\(notebooks/([0-9]{2}_[\w-]+)\.ipynb\)")
# docs/<name>.md pages in the book, after the chapters
PAGES = ("workshops", "questions", "cheatsheet", "glossary", "ledger")
CELL_FRAGMENT = "cell-id="
_INDEX_LINK = re.compile(r"\[([^\]]+)\]\(\.\./notebooks/([0-9]{2}_[\w-]+)\.ipynb(?:#([^)\s]*))?\)")


def chapter_paths(chapters: list[str] | None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if chapters:
        paths = [p for p in paths if p.name[:2] in chapters]
    if not paths:
        raise SystemExit(f"no chapter notebooks match {chapters or 'notebooks/NN_*.ipynb'}")
    return paths


def with_claims_report(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` ending with a cell that displays ``check.report()`` (added, with a heading, when it has none)."""
    if not any(c.cell_type == "code" and REPORT_SOURCE in c.source for c in nb.cells):
        nb.cells += [nbformat.v4.new_markdown_cell(REPORT_HEADING),
                     nbformat.v4.new_code_cell(f"from cl_lab import check\n\n{REPORT_SOURCE}")]
    return nb


def hide_injected_parameters(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``remove-cell`` so the page shows the chapter as written."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def execute(path: Path, target: Path, smoke: bool, timeout: int) -> tuple[float, str]:
    """Run one chapter with papermill into ``target``; return (seconds, error or "")."""
    import papermill as pm

    source = target.with_name(f".input-{target.name}")
    nbformat.write(with_claims_report(nbformat.read(path, as_version=4)), source)
    start, error = time.perf_counter(), ""
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND  # the kernel inherits it: figures become image outputs, even under Agg
    try:
        # allow_errors: a failing claim does not stop the chapter, so its page shows every section and the
        # claims table marks the claim FAILED; papermill still raises afterwards, with a banner atop the page.
        pm.execute_notebook(str(source), str(target), parameters={"SMOKE": smoke}, kernel_name="python3",
                            progress_bar=False, execution_timeout=timeout, cwd=str(NOTEBOOKS), allow_errors=True)
    except Exception as exc:  # the page still shows what ran and the error; the command fails at the end
        error = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
    finally:
        source.unlink(missing_ok=True)
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    if target.exists() and not smoke:  # at the defaults the injected cell only repeats them; SMOKE's stays shown
        hide_injected_parameters(target)
    return time.perf_counter() - start, error


def home_page(built: list[str]) -> str:
    """The README's title, first paragraph and chapter table; chapters in this build are linked."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    title = readme.splitlines()[0]
    intro = readme.split("\n\n")[1]
    table = re.search(r"^## Chapters\n.*?(?=^## )", readme, re.MULTILINE | re.DOTALL)
    body = table.group(0) if table else ""
    body = _README_LINK.sub(lambda m: f"]({m.group(1)}.ipynb)" if m.group(1) in built else "]()", body)
    body = re.sub(r"\[([^\]]+)\]\(\)", r"\1", body)
    body = body.replace("](docs/_static/", "](_static/")  # the README's images, from the book's copy of docs/_static
    extra = [name for name in PAGES if (DOCS / f"{name}.md").exists()]
    toc = ["```{toctree}", ":caption: Chapters", ":hidden:", "", *built, "```", ""]
    if extra:
        toc += ["```{toctree}", ":caption: For instructors and readers", ":hidden:", "", *extra, "```", ""]
    return "\n".join([title, "", intro, "", body.rstrip(), "", *toc])


def book_links(markdown: str, built: dict[str, list[str]]) -> str:
    """docs/ pages link to ../notebooks/NN_x.ipynb#<JupyterLab anchor>; in the book they point at the chapter's
    page and the heading's MyST anchor, or become plain text when that chapter is not in this build."""
    from urllib.parse import unquote

    from myst_parser.slugs import github_slugify

    def replace(m: re.Match) -> str:
        label, stem, fragment = m.group(1), m.group(2), m.group(3)
        if stem not in built:
            return label
        if not fragment:
            return f"[{label}]({stem}.ipynb)"
        if fragment.startswith(CELL_FRAGMENT):  # a cell's own anchor, which anchor_cells gives it in the book
            return f'<a href="{stem}.html#{fragment}">{label}</a>'
        wanted = unquote(fragment).replace("-", " ")
        heading = next((h for h in built[stem] if h.replace("-", " ") == wanted), None)
        return f"[{label}]({stem}.ipynb#{github_slugify(heading)})" if heading else f"[{label}]({stem}.ipynb)"

    return _INDEX_LINK.sub(replace, markdown)


def linked_cells(pages: list[Path]) -> set[str]:
    """The ids of the cells that ``pages`` link to (``NN_x.ipynb#cell-id=<id>``, JupyterLab's cell fragment)."""
    return {m for page in pages for m in re.findall(rf"#{CELL_FRAGMENT}([\w-]+)", page.read_text(encoding="utf-8"))}


def anchor_cells(path: Path, ids: set[str]) -> None:
    """Open each markdown cell of ``path`` whose id is in ``ids`` with an empty ``<a id="cell-id=<id>">``, so a
    link to ``page.html#cell-id=<id>`` lands on it, as it does in JupyterLab (nbconvert's HTML names cells alike)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.get("id") in ids:
            cell.source = f'<a id="{CELL_FRAGMENT}{cell.id}"></a>\n\n{cell.source}'
    nbformat.write(nb, path)


def has_figures(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def headings(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [re.sub(r"[*_`]", "", m.group(1)).strip() for c in nb.cells if c.cell_type == "markdown"
            for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", c.source, re.MULTILINE)]


def build(chapters: list[str] | None, out: Path, smoke: bool, executed: Path | None, timeout: int) -> int:
    src, html = out / "src", out / "html"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(DOCS / "_static", src / "_static")
    failures, built = [], {}
    linked = linked_cells(sorted(DOCS.glob("*.md")))
    for path in chapter_paths(chapters):
        target = src / path.name
        if executed:
            shutil.copy(executed / path.name, target)
            note = "" if has_figures(target) else " (no figures in it: was it run under MPLBACKEND=Agg?)"
            print(f"{path.stem}: taken from {executed}{note}", flush=True)
        else:
            seconds, error = execute(path, target, smoke, timeout)
            print(f"{path.stem}: executed in {seconds:.1f} s" + (f" — FAILED: {error}" if error else ""), flush=True)
            if error:
                failures.append(path.stem)
        built[path.stem] = headings(path)
        anchor_cells(target, linked)
    for name in PAGES:
        page = DOCS / f"{name}.md"
        if page.exists():
            (src / page.name).write_text(book_links(page.read_text(encoding="utf-8"), built), encoding="utf-8")
    (src / "index.md").write_text(home_page(list(built)), encoding="utf-8")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(DOCS), str(src), str(html)]
    result = subprocess.run(cmd, cwd=ROOT)
    print(f"Sphinx: {time.perf_counter() - start:.1f} s; the book is at {html / 'index.html'}")
    if failures:
        print(f"chapters that failed (their pages show the error): {', '.join(failures)}", file=sys.stderr)
    return 1 if failures or result.returncode else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers such as 01 04 (default: all)")
    parser.add_argument("--smoke", action="store_true", help="execute the quick SMOKE variant")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "book", help="build folder (default build/book)")
    parser.add_argument("--executed", type=Path, help="take already-executed notebooks from this folder")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    code = build(args.chapters or None, args.out.resolve(), args.smoke, args.executed, args.timeout)
    print(f"book built in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
