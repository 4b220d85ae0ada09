"""The concept map: every chapter once, in its family; each family's place in LLM fine-tuning in the family's
colour below it; the committed PNG, and the README and the book's home page showing it."""

import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from cl_lab.diagrams import concept_map as cm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "docs" / "_static" / "concept_map.png"


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def test_the_families_hold_the_chapters_the_workbook_groups_them_in():
    groups = {family: set(chapters) for family, _, chapters, _ in (cm.FOUNDATIONS, *cm.FAMILIES, cm.LLM_ERA)}
    assert groups == {"Foundations": {"01"}, "Regularisation": {"02", "03"}, "Replay": {"04", "05", "07", "08"},
                      "Architecture / isolation": {"06", "09"}, "LLM era": {"10", "11", "12", "13"}}
    assert sorted(c for chapters in groups.values() for c in chapters) == [f"{n:02d}" for n in range(1, 14)]


def test_every_chapter_is_drawn_once_with_its_title():
    fig = cm.concept_map()
    texts = _texts(fig)
    for number, title in cm.CHAPTERS.items():
        hits = [t for t in texts if f"{number} · {title}" in t or t.startswith(f"{number}\n{title}")]
        assert len(hits) == 1, (number, hits)
    plt.close(fig)


def test_each_family_points_at_its_place_in_llm_fine_tuning_in_its_colour():
    fig = cm.concept_map()
    text = " ".join(_texts(fig))
    for piece in ("KL to the reference", "≈ EWC", "≈ replay", "LoRA, adapters", "≈ isolation", "merging:",
                  "model editing:", "ROME, MEMIT", "where each family shows up in LLM fine-tuning"):
        assert piece in text, piece
    boxes = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    bottom = sorted((p for p in boxes if p.get_y() < 1.0), key=lambda p: p.get_x())
    colours = {family: colour for family, _, _, colour in cm.FAMILIES}
    expected = [colours[source] for _, source, _ in cm.IN_LLM_FINE_TUNING[:3]] + [cm.LLM_ERA[3]] * 2
    assert [p.get_facecolor()[:3] for p in bottom] == [to_rgb(c) for c in expected]
    arrows = [p for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(cm.IN_LLM_FINE_TUNING), "one arrow from each family (and from 10, 11) down"
    fig.canvas.draw()
    plt.close(fig)


def test_write_png_makes_a_small_png(tmp_path):
    before = set(plt.get_fignums())  # other tests in this worker may have left figures open
    path = cm.write_png(tmp_path / "map.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 250_000
    assert set(plt.get_fignums()) <= before, "the figure is closed after saving"


def test_committed_png_is_on_the_readme_and_the_book_home_page():
    assert PNG.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and PNG.stat().st_size < 250_000
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/_static/concept_map.png)" in readme
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    book = importlib.util.module_from_spec(spec)
    sys.modules["build_book"] = book
    spec.loader.exec_module(book)
    assert "](_static/concept_map.png)" in book.home_page(["01_forgetting"])
