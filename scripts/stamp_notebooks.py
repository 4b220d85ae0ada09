"""Stamp every chapter notebook with what every chapter shares; running it again changes nothing.

    python scripts/stamp_notebooks.py              # notebooks/NN_*.ipynb and the README's chapter table, in place
    python scripts/stamp_notebooks.py --check      # exit 1 when a notebook or the README is not stamped

0. An "Open in Colab" badge opens the first markdown cell, linking to the chapter in ``REPOSITORY_URL``'s ``main``;
   the README's chapter table gets the same badge in a "Colab" column, one per row.
1. The first code cell (before the ``parameters`` cell) installs the workbook when the notebook runs in Colab:
   it clones the repository (so ``data/`` and the notebooks' relative paths exist), installs ``cl_lab`` from the
   clone and moves into its ``notebooks/`` folder. Anywhere else it does nothing.
2. The last cells, a heading and ``check.report()``: the table of every claim the chapter checked.

Stamped cells carry a tag (``colab-setup``, ``claims-report``) and a fixed id, and are rewritten in place, so the
stamp is idempotent and a changed template reaches every chapter. Edits go through nbformat; outputs stay empty.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"

# MAINTAINERS: confirm this URL — the public repository that Colab clones (it must hold data/ and notebooks/).
REPOSITORY_URL = "https://github.com/cl-lab/cl-lab.git"
BRANCH = "main"
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)[ \t]*(?:\n[ \t]*)*")
_README_ROW = re.compile(r"^(\| \[(\d\d_[\w-]+)\]\(notebooks/\2\.ipynb\) \|)(?: \[!\[Open In Colab\][^|]*\|)?(.*)$",
                         re.MULTILINE)

COLAB_TAG, REPORT_TAG = "colab-setup", "claims-report"
COLAB_SOURCE = f'''# In Colab: clone the workbook (data/ and the notebooks' relative paths) and install cl_lab from it.
# Anywhere else this cell does nothing.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    CLONE = "/content/cl-lab"
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "--depth", "1", "{REPOSITORY_URL}", CLONE], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", CLONE], check=True)
    sys.path.insert(0, CLONE)  # this kernel sees the package now, without a restart
    os.chdir(f"{{CLONE}}/notebooks")'''
REPORT_HEADING = ("## Claims checked in this chapter\n\n"
                  "Every claim this run checked, with the measured value and its bound.")
REPORT_SOURCE = "from cl_lab import check\n\ncheck.report()"


def colab_badge(notebook_name: str) -> str:
    """A Markdown badge that opens ``notebooks/<notebook_name>`` of ``REPOSITORY_URL`` (branch ``BRANCH``) in Colab."""
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?/?", REPOSITORY_URL)
    if match is None:
        raise ValueError(f"REPOSITORY_URL must be https://github.com/<owner>/<name>[.git], got {REPOSITORY_URL!r}")
    target = f"https://colab.research.google.com/github/{match.group(1)}/blob/{BRANCH}/notebooks/{notebook_name}"
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({target})"


def without_badge(markdown: str) -> str:
    """``markdown`` less a Colab badge line (and the blank lines after it) at its top."""
    return _BADGE.sub("", markdown, count=1)


def with_badge(markdown: str, notebook_name: str) -> str:
    """``markdown`` opening with the chapter's Colab badge on a line of its own (an older badge is replaced)."""
    return f"{colab_badge(notebook_name)}\n\n{without_badge(markdown)}"


def stamp_readme(readme: str) -> str:
    """The README with a "Colab" column, second in its chapter table, holding each row's badge; other cells kept."""
    lines = readme.split("\n")
    header = next((i for i, line in enumerate(lines) if line.startswith("| chapter |")), None)
    if header is not None:
        if not lines[header].startswith("| chapter | Colab |"):
            lines[header] = lines[header].replace("| chapter |", "| chapter | Colab |", 1)
        if header + 1 < len(lines) and re.fullmatch(r"\|(?:\s*:?-+:?\s*\|)+", lines[header + 1]):
            lines[header + 1] = "|" + "---|" * (lines[header].count("|") - 1)
    return _README_ROW.sub(lambda m: f"{m.group(1)} {colab_badge(m.group(2) + '.ipynb')} |{m.group(3)}",
                           "\n".join(lines))


def _tagged(cell, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def _cell(kind: str, source: str, tag: str, cell_id: str):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source, metadata={"tags": [tag]})
    cell["id"] = cell_id
    return cell


def stamp(nb: nbformat.NotebookNode, name: str | None = None) -> nbformat.NotebookNode:
    """``nb`` with the Colab cell first among the code cells and the claims report last; other cells untouched,
    except the first markdown cell, which opens with the Colab badge of notebook file ``name`` when one is given."""
    rest = [c for c in nb.cells if not _tagged(c, COLAB_TAG) and not _tagged(c, REPORT_TAG)]
    first_markdown = next((c for c in rest if c.cell_type == "markdown"), None)
    if name is not None and first_markdown is not None:
        first_markdown.source = with_badge(first_markdown.source, name)
    first_code = next((i for i, c in enumerate(rest) if c.cell_type == "code"), len(rest))
    colab = _cell("code", COLAB_SOURCE, COLAB_TAG, "colab-setup")
    report = [_cell("markdown", REPORT_HEADING, REPORT_TAG, "claims-report-heading"),
              _cell("code", REPORT_SOURCE, REPORT_TAG, "claims-report")]
    nb.cells = rest[:first_code] + [colab] + rest[first_code:] + report
    return nb


def stamp_file(path: Path) -> bool:
    """Stamp one notebook in place; return whether its bytes changed."""
    before = path.read_bytes()
    nb = stamp(nbformat.read(path, as_version=4), path.name)
    nbformat.write(nb, path)
    return path.read_bytes() != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path,
                        help="notebooks to stamp (default: notebooks/NN_*.ipynb, and the README's chapter table)")
    parser.add_argument("--check", action="store_true", help="change nothing; fail when a notebook needs stamping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    stale = []
    for path in paths:
        if args.check:
            nb = nbformat.read(path, as_version=4)
            if nbformat.writes(stamp(nbformat.read(path, as_version=4), path.name)) != nbformat.writes(nb):
                stale.append(path.name)
        elif stamp_file(path):
            print(f"stamped {path.name}")
    if not args.paths:
        readme = README.read_text(encoding="utf-8")
        if stamp_readme(readme) != readme:
            if args.check:
                stale.append(README.name)
            else:
                README.write_text(stamp_readme(readme), encoding="utf-8")
                print(f"stamped {README.name}'s chapter table")
    if stale:
        print(f"not stamped: {', '.join(stale)} (run python scripts/stamp_notebooks.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
