"""Build docs/questions.md: every interview question, and the chapter section that answers it.

    python scripts/question_index.py            # (re)write docs/questions.md
    python scripts/question_index.py --check    # exit 1 when docs/questions.md is stale or a target is gone

Two sources: the drill questions in the notebooks (markdown headed **L1.**, **L2.**, **L3.**, or <b>L1.</b> inside
a <details> summary; one cell per question or many in one cell), and docs/question_map.yml, the hand-kept map
of the questions each of the five source notes raises (one table per note on the page). Each link points at a
notebook and a section heading in it; a drill question also links to its own cell,
``NN_x.ipynb#cell-id=<the cell's id>``: JupyterLab 4 opens the notebook scrolled to that cell, and the book
(scripts/build_book.py) gives the cell that anchor. Markdown headings get anchors, bold paragraphs do not, and the
cell id needs no edit to the notebooks.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MAP = ROOT / "docs" / "question_map.yml"
INDEX = ROOT / "docs" / "questions.md"

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_DRILL = re.compile(r"(?:\*\*|<b>)\s*(L[123])\.\s*(?:\*\*|</b>)")
_SECTION_REF = re.compile(r"\bsections?\s+(\d+)\b", re.IGNORECASE)


@dataclass
class Chapter:
    number: str
    path: Path
    title: str
    headings: list[str]


@dataclass
class Target:
    chapter: Chapter
    heading: str


@dataclass
class DrillQuestion:
    level: str
    text: str
    answered_in: Target
    see_also: list[Target] = field(default_factory=list)
    cell_id: str = ""


def heading_text(markdown_heading: str) -> str:
    """A heading as a reader sees it: emphasis and code marks dropped."""
    return re.sub(r"[*_`]", "", markdown_heading).strip()


def jupyterlab_anchor(heading: str) -> str:
    """The fragment JupyterLab gives a rendered heading (its text, spaces as hyphens), URL-quoted."""
    return quote(heading.replace(" ", "-"), safe="-:,'!*")


def chapters(folder: Path = NOTEBOOKS) -> dict[str, Chapter]:
    found = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        heads = [heading_text(m.group(2)) for c in nb.cells if c.cell_type == "markdown"
                 for m in _HEADING.finditer(c.source)]
        title = next((h for h in heads), path.stem)
        found[path.name[:2]] = Chapter(path.name[:2], path, title, heads)
    return found


def find_section(chapter: Chapter, piece: str) -> str:
    """The first heading of ``chapter`` that contains ``piece`` (case-insensitive)."""
    for heading in chapter.headings[1:]:
        if piece.lower() in heading.lower():
            return heading
    raise LookupError(f"chapter {chapter.number} ({chapter.path.name}) has no section heading containing "
                      f"{piece!r}; its headings: {chapter.headings[1:]}")


def _question_text(source: str, start: int) -> str:
    rest = source[start:]
    end = min(i for i in (rest.find("</summary>"), rest.find("<details"), rest.find("\n\n"), len(rest)) if i >= 0)
    return " ".join(rest[:end].split())


def drill_questions(chapter: Chapter) -> list[DrillQuestion]:
    """Every L1/L2/L3 question of a chapter, with the heading above it and the sections its answer cites."""
    nb = nbformat.read(chapter.path, as_version=4)
    current, found = chapter.title, []
    numbered = {m.group(1): h for h in chapter.headings if (m := re.match(r"(\d+)\s*·", h))}  # "3 · …" by "3"
    for index, cell in ((i, c) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"):
        marks = sorted([(m.start(), "h", m) for m in _HEADING.finditer(cell.source)]
                       + [(m.start(), "q", m) for m in _DRILL.finditer(cell.source)], key=lambda x: x[0])
        for i, (_, kind, m) in enumerate(marks):
            if kind == "h":
                current = heading_text(m.group(2))
                continue
            answer = cell.source[m.end():marks[i + 1][0] if i + 1 < len(marks) else len(cell.source)]
            cited = list(dict.fromkeys(numbered[n] for n in _SECTION_REF.findall(answer) if n in numbered))
            if not cell.get("id"):
                raise LookupError(f"{chapter.path.name} cell {index} has no id (nbformat 4.5 gives every cell one): "
                                  "read and write the notebook with nbformat to add them")
            found.append(DrillQuestion(m.group(1), _question_text(cell.source, m.end()), Target(chapter, current),
                                       [Target(chapter, h) for h in cited], cell.id))
    return found


def link(target: Target, label: str) -> str:
    rel = f"../notebooks/{target.chapter.path.name}"
    return f"[{label}]({rel}#{jupyterlab_anchor(target.heading)})"


def question_link(chapter: Chapter, question: DrillQuestion) -> str:
    """The question's text, linked to its own cell (JupyterLab's ``#cell-id=`` fragment)."""
    label = re.sub(r"([\[\]])", r"\\\1", question.text)
    return f"[{label}](../notebooks/{chapter.path.name}#cell-id={question.cell_id})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


_PLANNED = re.compile(r"^(\d\d): (.+)$")


def planned_text(entry: dict) -> str:
    """``planned: "NN: what"`` as the page shows it; a malformed value names the entry and the form allowed."""
    m = _PLANNED.match(str(entry["planned"]))
    if not m:
        raise ValueError(f"{entry['id']}: planned must read \"NN: what\" (NN the chapter), got {entry['planned']!r}")
    return f"*planned, chapter {m.group(1)}:* {m.group(2)}"


def source_rows(entries: list[dict], found: dict[str, Chapter]) -> list[str]:
    rows = []
    for entry in entries:
        links = []
        for t in entry.get("answered_in") or []:
            chapter = found.get(t["chapter"])
            if chapter is None:
                raise LookupError(f"{entry['id']}: no notebook for chapter {t['chapter']} in {NOTEBOOKS}")
            heading = find_section(chapter, t["section"])
            links.append(link(Target(chapter, heading), f"{chapter.number} · {heading}"))
        if not links:
            links.append("**not answered yet**")
        links += [planned_text(entry)] if entry.get("planned") else []
        links += [f"*{entry['note']}*"] if entry.get("note") else []
        rows.append(f"| {entry['id']} | {_cell(entry['question'])} | {'<br>'.join(_cell(x) for x in links)} |")
    return rows


def _unanswered(entries: list[dict]) -> int:
    return sum(not e.get("answered_in") for e in entries)


def source_section(source: dict, found: dict[str, Chapter]) -> list[str]:
    """One source note's table: its questions in our words, and where each is answered."""
    entries = source["questions"]
    return [f"### {source['note']} · {source['title']} ({len(entries)} questions; {_unanswered(entries)} not "
            "answered yet)", "", f"`shared/sources/{source['file']}`: {source['covers']}.", "",
            "| id | question | answered in |", "|---|---|---|", *source_rows(entries, found), ""]


def source_map(mapping: Path = MAP) -> list[dict]:
    """The source notes of ``docs/question_map.yml``, each with its questions."""
    return yaml.safe_load(mapping.read_text(encoding="utf-8"))["sources"]


def render(found: dict[str, Chapter] | None = None, mapping: Path = MAP) -> str:
    found = chapters() if found is None else found
    sources = source_map(mapping)
    entries = [e for s in sources for e in s["questions"]]
    lines = ["# Question index", "",
             "Every interview question in the workbook, and every question the source notes raise, with the chapter "
             "section that answers it. Generated by `python scripts/question_index.py` from the notebooks and "
             "`docs/question_map.yml`: edit those, not this file.", "",
             f"## Questions from the source notes ({len(entries)}; {_unanswered(entries)} not answered yet)", "",
             "The notes the workbook was built from (`shared/sources/`, beside the repository), question by question "
             "and in our words, grouped by note. Each links to the sections that answer it; *planned* "
             "names the chapter where an answer is being written, and a note in italics says what a partial answer "
             "leaves open.", ""]
    for source in sources:
        lines += source_section(source, found)
    drills = {n: drill_questions(c) for n, c in found.items()}
    lines += [f"## Interview drill, chapter by chapter ({sum(map(len, drills.values()))} questions)", "",
              "Each question links to its own cell (in JupyterLab and in the book), where its answer is folded under "
              "it; *answered in* is the drill's section, and *see also* points at the sections the answer cites.", ""]
    for number, chapter in found.items():
        lines += [f"### [{chapter.title}](../notebooks/{chapter.path.name})", ""]
        if not drills[number]:
            lines += ["No drill questions yet.", ""]
            continue
        lines += ["| level | question | answered in | see also |", "|---|---|---|---|"]
        for q in drills[number]:
            also = ", ".join(link(t, t.heading) for t in q.see_also) or "—"
            lines.append(f"| {q.level} | {_cell(question_link(chapter, q))} | "
                         f"{link(q.answered_in, q.answered_in.heading)} | {also} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when docs/questions.md is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not INDEX.exists() or INDEX.read_text(encoding="utf-8") != text:
            print(f"{INDEX.relative_to(ROOT)} is stale: run python scripts/question_index.py", file=sys.stderr)
            return 1
        print(f"{INDEX.relative_to(ROOT)} is up to date")
        return 0
    INDEX.write_text(text, encoding="utf-8")
    print(f"written {INDEX.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
