"""Print the chapter notebooks longest first, by the README's CPU-time column (a notebook the table does not time
comes first), so that two pytest-xdist workers running whole files finish together instead of one waiting on the
last long chapter.

    pytest -n 2 --dist loadfile --nbval-lax $(python scripts/longest_first.py)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| \[(?P<stem>\d\d_\w+)\]\(notebooks/.*?\| (?:≈ )?(?P<seconds>\d+) s\b", re.MULTILINE)


def seconds_by_chapter(readme: str) -> dict[str, float]:
    """{notebook stem: the first number of seconds in its README row's CPU-time cell}."""
    return {m["stem"]: float(m["seconds"]) for m in ROW.finditer(readme)}


def longest_first(notebooks: list[Path], seconds: dict[str, float]) -> list[Path]:
    """``notebooks`` sorted by ``seconds`` descending; untimed ones first, then by name."""
    return sorted(notebooks, key=lambda p: (-seconds.get(p.stem, float("inf")), p.name))


def main() -> None:
    seconds = seconds_by_chapter((ROOT / "README.md").read_text(encoding="utf-8"))
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print(" ".join(str(p.relative_to(ROOT)) for p in longest_first(notebooks, seconds)))


if __name__ == "__main__":
    main()
