"""Copy each chapter's CPU time from the README's chapter table into the "run" column of docs/workshops.md.

    python scripts/workshop_times.py            # after the README table was refreshed from `bash scripts/preflight.sh`
    python scripts/workshop_times.py --check    # exit 1 when the workshop plans quote other times than the README

A block's table row is `| [NN_name](../notebooks/NN_name.ipynb) | sections | run |`; its last cell becomes the
README's "CPU time" for that chapter. Rows of chapters the README does not list yet keep their text.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WORKSHOPS = ROOT / "docs" / "workshops.md"

_README_ROW = re.compile(r"^\| \[(\d\d)_[^\]]*\]\([^)]*\) \|.*\| ([^|]*?) \| [^|]* \|\s*$", re.MULTILINE)
_PLAN_ROW = re.compile(r"^(\| \[(\d\d)_[^\]]*\]\(\.\./notebooks/[^)]*\) \|[^\n]*\| )([^|\n]*?)( \|)\s*$", re.MULTILINE)


def readme_times(readme: str) -> dict[str, str]:
    """Chapter number → the README table's CPU time cell (e.g. "62 s")."""
    return {m.group(1): m.group(2).strip() for m in _README_ROW.finditer(readme)}


def refreshed(plan: str, times: dict[str, str]) -> str:
    return _PLAN_ROW.sub(lambda m: f"{m.group(1)}{times.get(m.group(2), m.group(3))}{m.group(4)}", plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when docs/workshops.md is not up to date")
    args = parser.parse_args(argv)
    plan = WORKSHOPS.read_text(encoding="utf-8")
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
