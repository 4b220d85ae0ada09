"""Stamp every chapter notebook with the two cells every chapter shares; running it again changes nothing.

    python scripts/stamp_notebooks.py              # notebooks/NN_*.ipynb, in place
    python scripts/stamp_notebooks.py --check      # exit 1 when a notebook is not stamped as it should be

1. The first code cell (before the ``parameters`` cell) installs the workbook when the notebook runs in Colab:
   it clones the repository (so ``data/`` and the notebooks' relative paths exist), installs ``cl_lab`` from the
   clone and moves into its ``notebooks/`` folder. Anywhere else it does nothing.
2. The last cells, a heading and ``check.report()``: the table of every claim the chapter checked.

Stamped cells carry a tag (``colab-setup``, ``claims-report``) and a fixed id, and are rewritten in place, so the
stamp is idempotent and a changed template reaches every chapter. Edits go through nbformat; outputs stay empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# MAINTAINERS: confirm this URL — the public repository that Colab clones (it must hold data/ and notebooks/).
REPOSITORY_URL = "https://github.com/cl-lab/cl-lab.git"

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


def _tagged(cell, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def _cell(kind: str, source: str, tag: str, cell_id: str):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source, metadata={"tags": [tag]})
    cell["id"] = cell_id
    return cell


def stamp(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` with the Colab cell first among the code cells and the claims report last; other cells untouched."""
    rest = [c for c in nb.cells if not _tagged(c, COLAB_TAG) and not _tagged(c, REPORT_TAG)]
    first_code = next((i for i, c in enumerate(rest) if c.cell_type == "code"), len(rest))
    colab = _cell("code", COLAB_SOURCE, COLAB_TAG, "colab-setup")
    report = [_cell("markdown", REPORT_HEADING, REPORT_TAG, "claims-report-heading"),
              _cell("code", REPORT_SOURCE, REPORT_TAG, "claims-report")]
    nb.cells = rest[:first_code] + [colab] + rest[first_code:] + report
    return nb


def stamp_file(path: Path) -> bool:
    """Stamp one notebook in place; return whether its bytes changed."""
    before = path.read_bytes()
    nb = stamp(nbformat.read(path, as_version=4))
    nbformat.write(nb, path)
    return path.read_bytes() != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to stamp (default: notebooks/NN_*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; fail when a notebook needs stamping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    stale = []
    for path in paths:
        if args.check:
            nb = nbformat.read(path, as_version=4)
            if nbformat.writes(stamp(nbformat.read(path, as_version=4))) != nbformat.writes(nb):
                stale.append(path.name)
        elif stamp_file(path):
            print(f"stamped {path.name}")
    if stale:
        print(f"not stamped: {', '.join(stale)} (run python scripts/stamp_notebooks.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
