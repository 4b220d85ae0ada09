"""Every chapter notebook: committed clean, shaped for papermill, and executable in its SMOKE variant.

The default-parameter run, with every claim checked, is nbval's job (see scripts/test.sh)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_chapters():
    assert NOTEBOOKS, "no chapter notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") for c in code), f"{path.name} is committed with outputs"
    assert not any(c.get("execution_count") for c in code), f"{path.name} has execution counts"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    tags = [t for c in code for t in c.get("metadata", {}).get("tags", [])]
    assert tags.count("parameters") == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    params = next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "SMOKE" in "".join(params["source"]), f"{path.name}: the parameters cell must define SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """papermill's inspector skips a line it cannot parse (an '=' inside a comment does it)."""
    from papermill.translators import PythonTranslator

    nb = json.loads(path.read_text())
    params = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "".join(params["source"])
    assigned = [line.split("=")[0].strip() for line in source.splitlines() if line and not line.startswith("#")]
    found = [p.name for p in PythonTranslator.inspect({"source": source})]
    assert found == assigned, f"{path.name}: papermill sees {found}, the cell assigns {assigned}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_smoke_variant_runs(path, tmp_path):
    import papermill as pm

    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters={"SMOKE": True}, kernel_name="python3",
                        progress_bar=False, execution_timeout=600, cwd=str(path.parent))
