"""scripts/stamp_notebooks.py on copies of the chapters: idempotent, papermill still finds the parameters, the Colab
badge opens each chapter and the README's table, the Colab cell does nothing outside Colab and installs from a clone
inside it, and the claims report ends each chapter."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


stamper = _load("stamp_notebooks")


@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebooks")
    for path in NOTEBOOKS:
        shutil.copy(path, folder / path.name)
    assert stamper.main([str(folder / p.name) for p in NOTEBOOKS]) == 0
    return folder


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def test_stamping_twice_is_stamping_once(stamped):
    once = {p.name: p.read_bytes() for p in stamped.glob("*.ipynb")}
    assert not any(stamper.stamp_file(p) for p in stamped.glob("*.ipynb"))
    assert {p.name: p.read_bytes() for p in stamped.glob("*.ipynb")} == once
    assert stamper.main(["--check", *map(str, stamped.glob("*.ipynb"))]) == 0


def _unstamped(cells) -> list:
    """The cells the stamp does not own, with the Colab badge taken off the markdown."""
    kept = [nbformat.from_dict(c) for c in cells if not set(_tags(c)) & {stamper.COLAB_TAG, stamper.REPORT_TAG}]
    for cell in kept:
        if cell.cell_type == "markdown":
            cell.source = stamper.without_badge(cell.source)
    return kept


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stamped_chapter_keeps_its_shape_and_parameters(stamped, path):
    import papermill as pm

    original = nbformat.read(path, as_version=4)
    nb = nbformat.read(stamped / path.name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert _tags(code[0]) == [stamper.COLAB_TAG], "the Colab cell is the first code cell"
    assert _tags(nb.cells[-1]) == [stamper.REPORT_TAG] and "check.report()" in nb.cells[-1].source
    assert _unstamped(nb.cells) == _unstamped(original.cells), "every other cell is kept as it was"
    assert sum("parameters" in _tags(c) for c in code) == 1
    assert not any(c.outputs or c.execution_count for c in code)
    assert nb.metadata.kernelspec.name == "python3"
    assert pm.inspect_notebook(str(stamped / path.name)) == pm.inspect_notebook(str(path))
    first_markdown = next(c for c in nb.cells if c.cell_type == "markdown")
    assert first_markdown.source.startswith(stamper.colab_badge(path.name) + "\n\n# "), "badge, then the title"
    assert sum("colab-badge.svg" in c.source for c in nb.cells if c.cell_type == "markdown") == 1


def test_badge_links_the_chapter_on_the_main_branch_and_replaces_an_older_one():
    badge = stamper.colab_badge("04_replay.ipynb")
    assert badge == ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                     "(https://colab.research.google.com/github/cl-lab/cl-lab/blob/main/notebooks/04_replay.ipynb)")
    older = "[![Open In Colab](https://x/badge.svg)](https://colab.research.google.com/github/old/fork/x.ipynb)\n\n# 04"
    assert stamper.with_badge(older, "04_replay.ipynb") == f"{badge}\n\n# 04"
    assert stamper.with_badge(stamper.with_badge("# 04", "04_replay.ipynb"), "04_replay.ipynb") == f"{badge}\n\n# 04"


def test_a_repository_url_colab_cannot_open_is_an_error(monkeypatch):
    monkeypatch.setattr(stamper, "REPOSITORY_URL", "git@github.com:cl-lab/cl-lab.git")
    with pytest.raises(ValueError, match="REPOSITORY_URL"):
        stamper.colab_badge("01_forgetting.ipynb")


def test_readme_table_gets_a_colab_column_once_and_keeps_its_cells():
    readme = ("# x\n\n| chapter | what it teaches | CPU time | status |\n|---|---|---|---|\n"
              "| [01_forgetting](notebooks/01_forgetting.ipynb) | why | 80 s | ready |\n\nafter\n")
    once = stamper.stamp_readme(readme)
    assert stamper.stamp_readme(once) == once
    assert once.splitlines()[2:5] == [
        "| chapter | Colab | what it teaches | CPU time | status |", "|---|---|---|---|---|",
        f"| [01_forgetting](notebooks/01_forgetting.ipynb) | {stamper.colab_badge('01_forgetting.ipynb')} | why | "
        "80 s | ready |"]


def test_committed_readme_has_one_badge_per_chapter_row():
    readme = stamper.README.read_text(encoding="utf-8")
    assert stamper.stamp_readme(readme) == readme, "run: python scripts/stamp_notebooks.py"
    rows = [line for line in readme.splitlines() if line.startswith("| [") and "](notebooks/" in line]
    assert len(rows) == len(NOTEBOOKS)
    for row, path in zip(rows, NOTEBOOKS):
        assert row.count("colab-badge.svg") == 1 and stamper.colab_badge(path.name) in row


def test_colab_cell_does_nothing_outside_colab(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the Colab cell ran {args} outside Colab")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "chdir", refuse)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    path_before, cwd_before = list(sys.path), os.getcwd()
    exec(compile(stamper.COLAB_SOURCE, "colab-cell", "exec"), {})
    assert sys.path == path_before and os.getcwd() == cwd_before


def test_colab_cell_clones_installs_and_moves_into_the_notebooks(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda folder: calls.append(["cd", folder]))
    monkeypatch.setattr(os.path, "isdir", lambda folder: False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(stamper.COLAB_SOURCE, "colab-cell", "exec"), {})
    assert calls == [["git", "clone", "--depth", "1", stamper.REPOSITORY_URL, "/content/cl-lab"],
                     [sys.executable, "-m", "pip", "install", "-q", "-e", "/content/cl-lab"],
                     ["cd", "/content/cl-lab/notebooks"]]
    assert sys.path[0] == "/content/cl-lab"


def test_stamped_notebook_executes_the_colab_cell_as_a_no_op_in_a_kernel(tmp_path):
    """In a real kernel, outside Colab: the cell prints nothing and leaves the working folder as it was."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    nb = stamper.stamp(nb)
    nb.cells.insert(2, nbformat.v4.new_code_cell("import os, sys\nprint(os.getcwd(), 'google.colab' in sys.modules)"))
    nb.cells = nb.cells[:3]  # the report needs cl_lab's claims, not this test
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert nb.cells[0].outputs == []
    assert nb.cells[2].outputs[0]["text"].split() == [str(tmp_path), "False"]
    json.dumps(nb)  # still a plain notebook


def test_committed_chapters_are_stamped():
    assert stamper.main(["--check", *map(str, NOTEBOOKS)]) == 0, "run: python scripts/stamp_notebooks.py"
