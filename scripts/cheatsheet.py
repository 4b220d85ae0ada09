"""Build the cheat-sheet and the flashcard deck from the chapters' closing cells and drills.

    python scripts/cheatsheet.py            # (re)write docs/cheatsheet.md and docs/flashcards.apkg
    python scripts/cheatsheet.py --check    # exit 1 when either is stale

Sources, in each chapter notebook:

- the "Key takeaways" cell: ``## Key takeaways`` and 3-5 bullets (``- …``);
- the "30-second answer" cell: ``## The 30-second answer``, ``**Question:** …`` and the answer in a
  ``<details><summary>Answer</summary>`` fold;
- the interview drill: every ``**L1.**`` / ``**L2.**`` / ``**L3.**`` question (or ``<b>L1.</b>`` in a fold's summary)
  with the answer folded under it, and each follow-up that has a fold of its own.

``docs/cheatsheet.md`` is one page, a section per chapter: its takeaways and its 30-second answer; a chapter
without them yet says "to come". ``docs/flashcards.apkg`` is an Anki deck (genanki): one card per drill question,
follow-up and 30-second answer, the question on the front and the answer on the back, tagged by chapter and level.
Anki: File → Import. Re-importing a newer deck updates the cards (each card's id hashes its chapter and question).
"""

from __future__ import annotations

import argparse
import html
import re
import sqlite3
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import question_index  # noqa: E402  (a sibling script: chapter titles and heading anchors)
from student_copies import details_blocks  # noqa: E402  (a sibling script: <details> folds, nesting included)

NOTEBOOKS = ROOT / "notebooks"
CHEATSHEET = ROOT / "docs" / "cheatsheet.md"
DECK = ROOT / "docs" / "flashcards.apkg"
TAKEAWAYS_HEADING = "## Key takeaways"
THIRTY_SECOND_HEADING = "## The 30-second answer"
DECK_NAME = "cl-lab: continual learning, interview drill"
DECK_ID, MODEL_ID = 1_726_450_301, 1_726_450_302  # fixed: a re-import updates the deck instead of adding a new one
DECK_TIMESTAMP = 1_767_225_600.0  # fixed creation time of the notes (2026-01-01): the deck's content never moves

_DRILL = re.compile(r"(?:\*\*|<b>)\s*(L[123])\.\s*(?:\*\*|</b>)")
_HEADING = re.compile(r"^#{1,6}\s", re.MULTILINE)
_SUMMARY = re.compile(r"<summary\b[^>]*>(.*?)</summary>", re.IGNORECASE | re.DOTALL)
_ANSWER = re.compile(r"^\s*answers?\s*[.:]?\s*$", re.IGNORECASE)
_QUESTION = re.compile(r"\*\*Question:?\*\*:?\s*(.*?)\s*(?=<details|$)", re.DOTALL)
_MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$(?!\s)([^$\n]+?)(?<!\s)\$", re.DOTALL)


@dataclass
class Card:
    chapter: str  # "07"
    kind: str  # "L1", "L2 follow-up", "30-second answer"
    question: str  # markdown
    answer: str  # markdown
    tags: list[str] = field(default_factory=list)


@dataclass
class ChapterSheet:
    number: str
    path: Path
    title: str
    takeaways: list[str]
    question: str = ""
    answer: str = ""
    cards: list[Card] = field(default_factory=list)


def fold_body(block: str) -> str:
    """The markdown inside one ``<details>…</details>`` block, without its summary."""
    summary = _SUMMARY.search(block)
    body = block[summary.end():] if summary else block[block.index(">") + 1:]
    return re.sub(r"</details>\s*$", "", body, flags=re.IGNORECASE).strip()


def _summary(block: str) -> str:
    match = _SUMMARY.search(block)
    return match.group(1).strip() if match else ""


def takeaways(source: str) -> list[str]:
    """The bullets of a "Key takeaways" cell; a line that does not start a bullet continues the one above."""
    bullets: list[str] = []
    for line in source.split("\n")[1:]:
        if re.match(r"^\s*[-*]\s+", line):
            bullets.append(re.sub(r"^\s*[-*]\s+", "", line).strip())
        elif line.strip() and bullets:
            bullets[-1] += " " + line.strip()
    return bullets


def thirty_second(source: str, where: str) -> tuple[str, str]:
    """(question, answer) of a "30-second answer" cell; ``where`` names the cell in the error."""
    question = _QUESTION.search(source)
    folds = [source[s:e] for s, e in details_blocks(source) if _ANSWER.match(_summary(source[s:e]))]
    if not question or not question.group(1) or not folds:
        raise ValueError(f"{where}: a '{THIRTY_SECOND_HEADING}' cell needs '**Question:** …' and the answer in "
                         "'<details><summary>Answer</summary> … </details>'")
    return " ".join(question.group(1).split()), fold_body(folds[0])


def drill_cards(number: str, source: str) -> list[Card]:
    """One card per drill question of a markdown cell, and one per follow-up that has its own answer fold."""
    marks = sorted([(m.start(), m.end(), m.group(1)) for m in _DRILL.finditer(source)]
                   + [(m.start(), m.start(), "") for m in _HEADING.finditer(source)])
    cards = []
    for i, (start, end, level) in enumerate(marks):
        if not level:
            continue
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(source)
        cards += _question_cards(number, level, source, start, end, stop)
    return cards


def _question_cards(number: str, level: str, source: str, start: int, end: int, stop: int) -> list[Card]:
    blocks = [(s, e) for s, e in details_blocks(source) if s >= start and e <= stop]
    inside = next(((s, e) for s, e in details_blocks(source) if s < start < e), None)
    if inside:  # <details><summary><b>L1.</b> question</summary> answer</details>
        block = source[inside[0]:inside[1]]
        question = re.sub(r"<[^>]+>", "", _SUMMARY.search(block).group(1)).strip()
        question = _DRILL.sub("", question, count=1).strip() if _DRILL.search(question) else question
        return [Card(number, level, re.sub(rf"^{level}\.\s*", "", question), fold_body(block))]
    cards, last = [], end
    for s, e in blocks:
        block = source[s:e]
        if not _ANSWER.match(_summary(block)):
            continue
        asked = source[last:s].strip()
        if not cards:
            cards.append(Card(number, level, asked, fold_body(block)))
        elif asked:
            cards.append(Card(number, f"{level} follow-up", f"{cards[0].question}\n\n{asked}", fold_body(block)))
        else:
            cards[-1].answer += "\n\n" + fold_body(block)
        last = e
    return cards


def chapter_sheet(chapter: question_index.Chapter) -> ChapterSheet:
    nb = nbformat.read(chapter.path, as_version=4)
    sheet = ChapterSheet(chapter.number, chapter.path, chapter.title, [])
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        where = f"{chapter.path.name} cell {index}"
        head = cell.source.lstrip()
        if head.startswith(TAKEAWAYS_HEADING):
            sheet.takeaways = takeaways(head)
            if not 3 <= len(sheet.takeaways) <= 5:
                raise ValueError(f"{where}: 'Key takeaways' holds {len(sheet.takeaways)} bullets; 3 to 5 are asked")
        elif head.startswith(THIRTY_SECOND_HEADING):
            sheet.question, sheet.answer = thirty_second(head, where)
        else:
            sheet.cards += drill_cards(chapter.number, cell.source)
    if sheet.question:
        sheet.cards.append(Card(chapter.number, "30-second answer", sheet.question, sheet.answer))
    return sheet


def sheets(folder: Path = NOTEBOOKS) -> list[ChapterSheet]:
    return [chapter_sheet(c) for c in question_index.chapters(folder).values()]


# --- the cheat-sheet ------------------------------------------------------------------------------------------


def render_cheatsheet(found: list[ChapterSheet], deck: Path = DECK) -> str:
    done = [s for s in found if s.takeaways or s.question]
    cards = sum(len(s.cards) for s in found)
    lines = ["# Cheat-sheet", "",
             "Each chapter in a few lines: its key takeaways and its 30-second answer to the main interview question. "
             "Generated by `python scripts/cheatsheet.py` from the chapters' closing cells: edit those, not this "
             "file.", "",
             f"**Flashcards:** `docs/{deck.name}`, an Anki deck of {cards} cards (every drill question and "
             "follow-up with its answer, and each 30-second answer), from the same command; in Anki, File → Import.",
             ""]
    if len(done) < len(found):
        lines += ["To come: " + ", ".join(f"{s.number}" for s in found if s not in done) + ".", ""]
    for sheet in found:
        rel = f"../notebooks/{sheet.path.name}"
        lines += [f"## [{sheet.title}]({rel})", ""]
        if sheet.takeaways:
            lines += [f"- {t}" for t in sheet.takeaways] + [""]
        if sheet.question:
            lines += [f"**The 30-second answer.** *{sheet.question}*", "", sheet.answer, ""]
        if not sheet.takeaways and not sheet.question:
            lines += ["*Takeaways and the 30-second answer: to come.*", ""]
    return "\n".join(lines)


# --- the deck ---------------------------------------------------------------------------------------------------


def to_html(markdown: str) -> str:
    """Markdown to the HTML of an Anki field; ``$…$`` and ``$$…$$`` become MathJax's ``\\(…\\)`` and ``\\[…\\]``."""
    from markdown_it import MarkdownIt

    maths: list[str] = []

    def hold(m: re.Match) -> str:
        tex = html.escape(m.group(1) if m.group(1) is not None else m.group(2), quote=False)
        maths.append(f"\\[{tex}\\]" if m.group(1) is not None else f"\\({tex}\\)")
        return f"MATHSLOT{len(maths) - 1}X"

    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(_MATH.sub(hold, markdown)).strip()
    return re.sub(r"MATHSLOT(\d+)X", lambda m: maths[int(m.group(1))], rendered)


def _note_fields(card: Card, titles: dict[str, str]) -> list[str]:
    return [to_html(card.question), to_html(card.answer), html.escape(f"{titles[card.chapter]} · {card.kind}")]


def _note_tags(card: Card) -> list[str]:
    return ["cl-lab", f"ch{card.chapter}", card.kind.split()[0] if card.kind[0] == "L" else "30-second",
            *(["follow-up"] if "follow-up" in card.kind else [])]


def expected_notes(found: list[ChapterSheet]) -> list[tuple[str, list[str], list[str]]]:
    """(guid, fields, tags) of every card, in deck order."""
    import genanki

    titles = {s.number: s.title for s in found}
    return [(genanki.guid_for("cl-lab", card.chapter, card.kind, card.question), _note_fields(card, titles),
             sorted(_note_tags(card))) for s in found for card in s.cards]


def _model():
    import genanki

    return genanki.Model(
        MODEL_ID, "cl-lab question",
        fields=[{"name": "Front"}, {"name": "Back"}, {"name": "Chapter"}],
        templates=[{"name": "Card 1",
                    "qfmt": '<div class="chapter">{{Chapter}}</div>{{Front}}',
                    "afmt": '{{FrontSide}}<hr id="answer">{{Back}}'}],
        css=".card { font-family: sans-serif; font-size: 18px; text-align: left; max-width: 46em; margin: auto; }\n"
            ".chapter { font-size: 13px; color: #777; margin-bottom: 0.8em; }")


def write_deck(found: list[ChapterSheet], path: Path = DECK) -> int:
    """Write the Anki deck; return its number of cards."""
    import genanki

    deck, model = genanki.Deck(DECK_ID, DECK_NAME), _model()
    notes = expected_notes(found)
    for guid, fields, tags in notes:
        deck.add_note(genanki.Note(model=model, fields=fields, tags=tags, guid=guid))
    genanki.Package(deck).write_to_file(str(path), timestamp=DECK_TIMESTAMP)
    return len(notes)


def deck_notes(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(guid, fields, tags) of every note of an .apkg, in the order they were added."""
    with zipfile.ZipFile(path) as package, tempfile.TemporaryDirectory() as tmp:
        package.extract("collection.anki2", tmp)
        connection = sqlite3.connect(Path(tmp) / "collection.anki2")
        try:
            rows = connection.execute("SELECT guid, flds, tags FROM notes ORDER BY id").fetchall()
        finally:
            connection.close()
    return [(guid, flds.split("\x1f"), sorted(tags.split())) for guid, flds, tags in rows]


# --- command ----------------------------------------------------------------------------------------------------


def stale(found: list[ChapterSheet]) -> list[str]:
    """Which committed outputs differ from what the notebooks give now."""
    out = []
    if not CHEATSHEET.exists() or CHEATSHEET.read_text(encoding="utf-8") != render_cheatsheet(found):
        out.append(str(CHEATSHEET.relative_to(ROOT)))
    if not DECK.exists() or deck_notes(DECK) != expected_notes(found):
        out.append(str(DECK.relative_to(ROOT)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the cheat-sheet or the deck is stale")
    args = parser.parse_args(argv)
    found = sheets()
    if args.check:
        old = stale(found)
        if old:
            print(f"stale: {', '.join(old)}; run python scripts/cheatsheet.py", file=sys.stderr)
            return 1
        print("docs/cheatsheet.md and docs/flashcards.apkg are up to date")
        return 0
    CHEATSHEET.write_text(render_cheatsheet(found), encoding="utf-8")
    cards = write_deck(found)
    print(f"written {CHEATSHEET.relative_to(ROOT)} and {DECK.relative_to(ROOT)} ({cards} cards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
