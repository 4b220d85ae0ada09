"""Write student copies of the chapter notebooks: every answer and solution removed, every question kept.

    python scripts/student_copies.py --out student/            # all chapters
    python scripts/student_copies.py --out student/ 01 04      # some chapters
    python scripts/student_copies.py --out student/ --check    # then execute each copy (papermill, SMOKE=True)

What goes: the body of every ``<details>`` block in a markdown cell (the chapter template folds each drill
answer and exercise solution in one), and every code cell tagged ``solution``. A ``<details>`` whose summary is
the question itself (``<summary><b>L1.</b> What is …</summary>``) keeps that question as plain text; one whose
summary is "Hint" stays whole. Everything else stays, the claim checks included. The instructor notebooks are
only read. The work is done by nbconvert: a ``NotebookExporter`` with ``TagRemovePreprocessor`` and
``StripAnswers`` below.

An answer written outside a fold would reach the students, so the copies are scanned afterwards (``answer_leaks``):
a "Follow-up" paragraph with anything after its questions (a parenthesised answer, a sentence), or an "Answer:" or
"Solution:" label outside a fold. The command names each such notebook cell and exits 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbconvert.exporters import NotebookExporter
from nbconvert.preprocessors import Preprocessor, TagRemovePreprocessor
from traitlets import Unicode

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOLUTION_TAG = "solution"
PLACEHOLDER = "*Answer left out of the student copy: write yours here, then compare with your instructor's.*"

_DETAILS_TAG = re.compile(r"<(/?)details\b[^>]*>", re.IGNORECASE)
_SUMMARY = re.compile(r"<summary\b[^>]*>(.*?)</summary>", re.IGNORECASE | re.DOTALL)
_ANSWER_LABEL = re.compile(r"^\s*(answers?|solutions?)\s*[.:]?\s*$", re.IGNORECASE)
_HINT_LABEL = re.compile(r"^\s*hints?\b", re.IGNORECASE)
_FOLLOW_UP = re.compile(r"^[\s>*_-]*follow-ups?\b[*_]*\s*:?", re.IGNORECASE)
_LABEL = re.compile(r"(?:^|\n)[\s>*_-]*(?:\*\*|__|<b>)?\s*(answers?|solutions?)\s*(?:\*\*|__|</b>)?\s*[:.—]"
                    r"|(?:\*\*|<b>)(answers?|solutions?)\s*[:.—]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.;!]\s+[A-Z(]|\)\s*[.;]")


def details_blocks(text: str) -> list[tuple[int, int]]:
    """(start, end) of every outermost ``<details>…</details>`` in ``text``; nested blocks count as one."""
    blocks, depth, start = [], 0, 0
    for m in _DETAILS_TAG.finditer(text):
        if not m.group(1):
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                blocks.append((start, m.end()))
    if depth:
        raise ValueError(f"a <details> block is not closed: {text[start:start + 80]!r}")
    return blocks


def _plain(summary_html: str) -> str:
    return re.sub(r"<[^>]+>", "", summary_html).strip()


def strip_answer(block: str, placeholder: str) -> str:
    """What replaces one ``<details>`` block: nothing but the placeholder, the question and the placeholder,
    or the block itself when it only holds a hint."""
    summary = _SUMMARY.search(block)
    label = _plain(summary.group(1)) if summary else ""
    if _HINT_LABEL.match(label):
        return block
    if not label or _ANSWER_LABEL.match(label):
        return placeholder
    return f"{summary.group(1).strip()}\n\n{placeholder}"


def strip_answers(markdown: str, placeholder: str = PLACEHOLDER) -> str:
    """``markdown`` with the body of every ``<details>`` block replaced by ``placeholder``."""
    pieces, last = [], 0
    for start, end in details_blocks(markdown):
        pieces += [markdown[last:start], strip_answer(markdown[start:end], placeholder)]
        last = end
    return "".join(pieces + [markdown[last:]])


def _follow_up_leak(paragraph: str) -> str:
    """Why a "Follow-up: *question?* …" paragraph gives an answer away, or "" when it only asks.

    What follows each question mark must be the next question: text after the last one, a parenthesis right
    after one, or a sentence ending between two of them is an answer. A paragraph without a question mark
    ("Follow-up: derive it.") is not judged.
    """
    plain = _FOLLOW_UP.sub("", paragraph, count=1).replace("*", "").replace("_", " ")
    if "?" not in plain:
        return ""
    *between, after_last = plain.split("?")[1:] or [""]
    if re.search(r"\w", after_last):
        return f"text after its last question: {after_last.strip()[:60]!r}"
    for text in between:
        if text.lstrip().startswith("(") or _SENTENCE_END.search(text):
            return f"an answer between its questions: {text.strip()[:60]!r}"
    return ""


def answer_leaks(markdown: str) -> list[str]:
    """What in ``markdown`` gives an answer away outside a ``<details>`` fold (run it on a student copy's cell).

    Two forms: a "Follow-up" paragraph that answers its own question (see ``_follow_up_leak``), and an
    "Answer:" or "Solution:" label (at a line's start or in bold). Text inside any fold, hints included, and the
    placeholder are ignored.
    """
    outside, last = [], 0
    for start, end in details_blocks(markdown):
        outside.append(markdown[last:start])
        last = end
    text = "\n\n".join([*outside, markdown[last:]]).replace(PLACEHOLDER, "")
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        if _FOLLOW_UP.match(paragraph) and (why := _follow_up_leak(" ".join(paragraph.split()))):
            found.append(f"a follow-up with its answer outside a fold, {why}")
        found += [f"an answer label outside a fold: {m.group(0).strip()!r}" for m in _LABEL.finditer(paragraph)]
    return found


def notebook_leaks(path: Path) -> list[str]:
    """Each answer that the student copy of ``path`` would still show, as 'NN_x.ipynb cell K: what'."""
    nb = nbformat.read(path, as_version=4)
    return [f"{path.name} cell {index}: {leak}" for index, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
            for leak in answer_leaks(strip_answers(cell.source))]


class StripAnswers(Preprocessor):
    """Replace the folded answers of markdown cells by a placeholder; the question and all code stay."""

    placeholder = Unicode(PLACEHOLDER, help="text left where an answer was").tag(config=True)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            cell.source = strip_answers(cell.source, self.placeholder)
        return cell, resources


def student_exporter() -> NotebookExporter:
    """A notebook-to-notebook exporter that drops ``solution`` cells and folded answers."""
    exporter = NotebookExporter()
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags={SOLUTION_TAG}), enabled=True)
    exporter.register_preprocessor(StripAnswers(), enabled=True)
    return exporter


def chapter_paths(chapters: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if chapters:
        paths = [p for p in paths if p.name[:2] in chapters]
    if not paths:
        raise SystemExit(f"no chapter notebooks match {chapters or 'NN_*.ipynb'} in {folder}")
    return paths


def write_student_copies(out: Path, chapters: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    """Write one student copy per chapter notebook of ``folder`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    exporter = student_exporter()
    written = []
    for path in chapter_paths(chapters, folder):
        body, _ = exporter.from_filename(str(path))
        target = out / path.name
        target.write_text(body, encoding="utf-8")
        written.append(target)
    return written


def execute_smoke(path: Path, timeout: int = 600) -> float:
    """Run one student copy in its SMOKE variant, from the instructor notebooks' folder (so relative paths
    resolve as they do there); return the seconds it took. A failing cell raises."""
    import papermill as pm

    start = time.perf_counter()
    out = path.with_name(f".executed-{path.name}")
    try:
        pm.execute_notebook(str(path), str(out), parameters={"SMOKE": True}, kernel_name="python3",
                            progress_bar=False, execution_timeout=timeout, cwd=str(NOTEBOOKS))
    finally:
        out.unlink(missing_ok=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers such as 01 04 (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the student copies, e.g. student/")
    parser.add_argument("--check", action="store_true", help="execute every copy with SMOKE=True afterwards")
    args = parser.parse_args(argv)
    written = write_student_copies(args.out, args.chapters or None)
    print(f"{len(written)} student copies written to {args.out}")
    leaks = [leak for path in chapter_paths(args.chapters or None) for leak in notebook_leaks(path)]
    for leak in leaks:
        print(f"  LEAK {leak}")
    failed = len(leaks)
    for path in written if args.check else []:
        try:
            print(f"  {path.name}: executes with SMOKE=True in {execute_smoke(path):.1f} s", flush=True)
        except Exception as exc:  # report every copy, then fail
            failed += 1
            print(f"  {path.name}: FAILED: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
