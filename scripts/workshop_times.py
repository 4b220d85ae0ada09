"""The workshop plans (docs/workshops.md): copy the README's CPU times into them, and read their blocks.

    python scripts/workshop_times.py            # after the README table was refreshed from `bash scripts/preflight.sh`
    python scripts/workshop_times.py --check    # exit 1 when the workshop plans quote other times than the README
    python scripts/workshop_times.py --budget   # each block's agenda: minutes given against minutes its cells need

A block's chapter row is `| [NN_name](../notebooks/NN_name.ipynb) | sections | run |`; its last cell becomes the
README's "CPU time" for that chapter (the README's table may have other columns before it, such as Colab). Rows of
chapters the README does not list yet keep their text.

A block is a `### Block N · title (h:mm–h:mm)` heading under a `## The …` plan heading. Its agenda rows read
`| minutes | what happens |`; a row may link the cells it shows (`../notebooks/NN_x.ipynb#cell-id=…`), and each
linked cell is budgeted a minute plus a minute per ``WORDS_PER_MINUTE`` words of its prose outside `<details>` folds.
One row starts with `**Hands-on**` and names an exercise of `cl_lab.exercises` in backticks; the list after
`**Cut when running late**` gives what to drop, each item with `(saves N min)`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORKSHOPS = ROOT / "docs" / "workshops.md"
NOTEBOOKS = ROOT / "notebooks"
WORDS_PER_MINUTE = 150  # prose a class reads (or hears) in a minute, on top of a minute for each cell shown

_README_ROW = re.compile(r"^\| \[(\d\d)_[^\]]*\]\([^)]*\) \|.*\| ([^|]*?) \| [^|]* \|[ \t]*$", re.MULTILINE)
_PLAN_ROW = re.compile(r"^(\| \[(\d\d)_[^\]]*\]\(\.\./notebooks/[^)]*\) \|[^\n]*\| )([^|\n]*?)( \|)[ \t]*$",
                       re.MULTILINE)
_PLAN = re.compile(r"^## (The .+)$", re.MULTILINE)
_BLOCK = re.compile(r"^### (Block \d+ · .+?) \((\d{1,2}:\d\d)–(\d{1,2}:\d\d)\)[ \t]*$", re.MULTILINE)
_AGENDA_ROW = re.compile(r"^\| (\d+) \| (.+) \|[ \t]*$", re.MULTILINE)
_CHAPTER_ROW = re.compile(r"^\| \[(\d\d)_[^\]]*\]\(\.\./notebooks/", re.MULTILINE)
_CELL_LINK = re.compile(r"\]\(\.\./notebooks/(\d\d_[\w-]+\.ipynb)#cell-id=([\w-]+)\)")
_EXERCISE = re.compile(r"`(\w+)`")
_CUT_HEADING = "**Cut when running late**"
_SAVES = re.compile(r"\(saves (\d+) min\)")
_INTERVAL = re.compile(r"\((\d{1,2}:\d\d)–(\d{1,2}:\d\d)")
_FOLD = re.compile(r"<details>.*?</details>", re.DOTALL)


def readme_times(readme: str) -> dict[str, str]:
    """Chapter number → the README table's CPU time cell (e.g. "62 s"): the next-to-last column."""
    return {m.group(1): m.group(2).strip() for m in _README_ROW.finditer(readme)}


def refreshed(plan: str, times: dict[str, str]) -> str:
    return _PLAN_ROW.sub(lambda m: f"{m.group(1)}{times.get(m.group(2), m.group(3))}{m.group(4)}", plan)


def clock(text: str) -> int:
    """"h:mm" → minutes after 0:00."""
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass
class Row:
    """One agenda row: the minutes it is given and what happens, with the cells it shows."""

    minutes: int
    text: str
    cells: list[tuple[str, str]] = field(default_factory=list)  # (notebook file, cell id)


@dataclass
class Block:
    plan: str
    title: str
    start: int
    end: int
    chapters: list[str]
    rows: list[Row]
    cuts: list[str]

    @property
    def minutes(self) -> int:
        return self.end - self.start

    @property
    def hands_on(self) -> list[Row]:
        return [r for r in self.rows if r.text.startswith("**Hands-on**")]

    @property
    def exercise(self) -> str:
        """The exercise the block's hands-on row names (its first name in backticks)."""
        rows = self.hands_on
        if len(rows) != 1 or not _EXERCISE.search(rows[0].text):
            raise ValueError(f"{self.title}: needs exactly one **Hands-on** row naming an exercise in backticks")
        return _EXERCISE.search(rows[0].text).group(1)


def _cut_list(body: str) -> list[str]:
    if _CUT_HEADING not in body:
        return []
    lines = body.split(_CUT_HEADING, 1)[1].splitlines()[1:]
    items = []
    for line in lines:
        if not line.startswith("- "):
            break
        items.append(line[2:].strip())
    return items


def plan_sections(text: str) -> dict[str, str]:
    """Plan heading ("The 3-hour workshop") → its text, up to the next `## ` heading."""
    heads = list(re.finditer(r"^## .+$", text, re.MULTILINE))
    sections = {}
    for i, head in enumerate(heads):
        if m := _PLAN.match(head.group(0)):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            sections[m.group(1)] = text[head.end():end]
    return sections


def blocks(text: str) -> list[Block]:
    """Every block of every plan, in order."""
    found = []
    for plan, section in plan_sections(text).items():
        heads = list(_BLOCK.finditer(section))
        for i, head in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(section)
            body = section[head.end():end].split("\n## ", 1)[0]
            rows = [Row(int(m.group(1)), m.group(2), _CELL_LINK.findall(m.group(2)))
                    for m in _AGENDA_ROW.finditer(body)]
            found.append(Block(plan, head.group(1), clock(head.group(2)), clock(head.group(3)),
                               _CHAPTER_ROW.findall(body), rows, _cut_list(body)))
    return found


def intervals(section: str) -> list[tuple[int, int]]:
    """Every "(h:mm–h:mm" span a plan names (blocks, breaks, lunch, wrap-up), in order of start."""
    return sorted((clock(a), clock(b)) for a, b in _INTERVAL.findall(section))


@cache
def _cells(notebook: str) -> dict[str, tuple[str, str]]:
    import nbformat

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return {c.id: (c.cell_type, c.source) for c in nb.cells}


def cell_minutes(notebook: str, cell_id: str) -> float:
    """A shown cell's budget: a minute, plus its prose outside folds at ``WORDS_PER_MINUTE``."""
    cells = _cells(notebook)
    if cell_id not in cells:
        raise LookupError(f"{notebook} has no cell {cell_id!r} (a plan links it): pick the cell again")
    kind, source = cells[cell_id]
    words = len(_FOLD.sub("", source).split()) if kind == "markdown" else 0
    return 1 + words / WORDS_PER_MINUTE


def row_need(row: Row) -> float:
    """Minutes the row's linked cells need."""
    return sum(cell_minutes(notebook, cell_id) for notebook, cell_id in row.cells)


def budget_report(text: str) -> str:
    lines = []
    for block in blocks(text):
        shown = sum(len(r.cells) for r in block.rows)
        lines.append(f"{block.plan} · {block.title}: {block.minutes} min, agenda {sum(r.minutes for r in block.rows)}"
                     f" min, {shown} cells shown, exercise {block.exercise}")
        for row in block.rows:
            if row.cells:
                flag = "" if row_need(row) <= row.minutes else "   <-- over budget"
                lines.append(f"    {row.minutes:3d} min given, {row_need(row):4.1f} needed by {len(row.cells)} cells"
                             f": {row.text[:60]}{flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when docs/workshops.md is not up to date")
    parser.add_argument("--budget", action="store_true", help="print each block's minutes against its cells' needs")
    args = parser.parse_args(argv)
    plan = WORKSHOPS.read_text(encoding="utf-8")
    if args.budget:
        print(budget_report(plan))
        return 0
    new = refreshed(plan, readme_times(README.read_text(encoding="utf-8")))
    if args.check:
        if new != plan:
            print("docs/workshops.md quotes other run times than the README: python scripts/workshop_times.py",
                  file=sys.stderr)
            return 1
        return 0
    WORKSHOPS.write_text(new, encoding="utf-8")
    print("docs/workshops.md: run times copied from the README's chapter table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
