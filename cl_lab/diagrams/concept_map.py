"""The workbook's concept map: the thirteen chapters in their families, and where each family shows up in LLM
fine-tuning. The README and the book's home page show it as ``docs/_static/concept_map.png``:

    python -m cl_lab.diagrams.concept_map                      # writes docs/_static/concept_map.png
    python -m cl_lab.diagrams.concept_map path/to/map.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

CHAPTERS = {
    "01": "Why networks forget", "02": "EWC and the Fisher", "03": "SI, MAS, LwF", "04": "Replay",
    "05": "GEM, A-GEM", "06": "ProgNN, PackNet", "07": "Class-IL head bias", "08": "The stability gap",
    "09": "LoRA for CL", "10": "Model merging", "11": "ROME, MEMIT", "12": "The alignment tax",
    "13": "CPT and shipping updates",
}
# (family, its idea in a line, its chapters, colour)
FOUNDATIONS = ("Foundations", "R, AA, BWT · gradient interference · the three scenarios", ("01",), "#8c8c8c")
FAMILIES = (
    ("Regularisation", "keep weights or outputs\nnear the old solution", ("02", "03"), PALETTE["old"]),
    ("Replay", "keep old data\nin the gradient", ("04", "05", "07", "08"), PALETTE["shared"]),
    ("Architecture / isolation", "give each task\nits own parameters", ("06", "09"), PALETTE["new"]),
)
LLM_ERA = ("LLM era", "the tiny GPT-2 and SmolLM2", ("12", "13", "10", "11"), "#8172b3")
# where each idea shows up in LLM fine-tuning: (text, the family or chapter it comes from, chapters that measure it)
IN_LLM_FINE_TUNING = (
    ("KL to the reference\n(RLHF, DPO)\n≈ EWC, full Fisher", "Regularisation", ("02", "09", "12")),
    ("data mixing:\npretraining text replayed\n≈ replay", "Replay", ("09", "12", "13")),
    ("LoRA, adapters\nper task or tenant\n≈ isolation", "Architecture / isolation", ("09", "13")),
    ("merging:\ntask vectors, TIES,\nDARE, WiSE-FT", "10", ("10",)),
    ("model editing:\nROME, MEMIT", "11", ("11",)),
)

_COLUMN_W, _GAP, _BOX_H, _STEP = 2.9, 0.35, 0.62, 0.78
_LLM_Y, _LLM_H = 0.8, 1.35


def _chapter_box(ax: Axes, x: float, y: float, w: float, number: str, color: str) -> None:
    box(ax, x, y, w, _BOX_H, f"{number} · {CHAPTERS[number]}", color=color, alpha=0.3, fontsize=9)


def _llm_box(ax: Axes, x: float, w: float, text: str, measured: tuple[str, ...], color: str) -> None:
    label = f"chapter {measured[0]}" if len(measured) == 1 else f"chapters {', '.join(measured)}"
    box(ax, x, _LLM_Y, w, _LLM_H, f"{text}\n({label})", color=color, alpha=0.18, fontsize=8.5)


def concept_map() -> Figure:
    """Foundations on top; regularisation, replay and isolation as columns of their chapters, the LLM-era
    chapters beside them; along the bottom, what each family (and merging, editing) is in LLM fine-tuning."""
    width, height = 3 * (_COLUMN_W + _GAP) + 2 * 1.55 + _GAP + 0.3, 9.0
    fig, ax = canvas(width, height, title="cl-lab at a glance: three families, and where they show up in LLMs")
    top = height - 1.05
    name, idea, (number,), color = FOUNDATIONS
    box(ax, 0.3, top, 3 * _COLUMN_W + 2 * _GAP, 0.7, f"{name} — {number} · {CHAPTERS[number]}: {idea}",
        color=color, alpha=0.3, fontsize=9.5)
    header_y = top - 1.3
    for column, (family, idea, chapters, color) in enumerate(FAMILIES):
        x = 0.3 + column * (_COLUMN_W + _GAP)
        box(ax, x, header_y, _COLUMN_W, 1.0, f"{family}\n{idea}", color=color, alpha=0.5, fontsize=9.5)
        for row, number in enumerate(chapters):
            _chapter_box(ax, x, header_y - 0.2 - (row + 1) * _STEP, _COLUMN_W, number, color)
        bottom = header_y - 0.2 - len(chapters) * _STEP
        arrow(ax, (x + _COLUMN_W / 2, bottom - 0.05), (x + _COLUMN_W / 2, _LLM_Y + _LLM_H + 0.05), color=color)
    x_era = 0.3 + 3 * (_COLUMN_W + _GAP)
    era_w = 2 * 1.55
    name, idea, chapters, color = LLM_ERA
    box(ax, x_era, header_y, era_w, 1.0, f"{name}\n{idea}", color=color, alpha=0.5, fontsize=9.5)
    for row, number in enumerate(chapters[:2]):  # 12 and 13 span the column
        _chapter_box(ax, x_era, header_y - 0.2 - (row + 1) * _STEP, era_w, number, color)
    half = (era_w - 0.15) / 2
    for i, number in enumerate(chapters[2:]):  # 10 and 11 side by side, above merging and editing
        x = x_era + i * (half + 0.15)
        y = header_y - 0.2 - 4 * _STEP
        box(ax, x, y, half, 1.1, f"{number}\n{CHAPTERS[number]}", color=color, alpha=0.3, fontsize=9)
        arrow(ax, (x + half / 2, y - 0.05), (x + half / 2, _LLM_Y + _LLM_H + 0.05), color=color)
    ax.text(width / 2, _LLM_Y - 0.3, "↑ where each family shows up in LLM fine-tuning", ha="center", fontsize=10,
            style="italic", color="#444444")
    colors = {family: color for family, _, _, color in FAMILIES}
    for i, (text, source, measured) in enumerate(IN_LLM_FINE_TUNING[:3]):
        _llm_box(ax, 0.3 + i * (_COLUMN_W + _GAP), _COLUMN_W, text, measured, colors[source])
    for i, (text, _, measured) in enumerate(IN_LLM_FINE_TUNING[3:]):
        _llm_box(ax, x_era + i * (half + 0.15), half, text, measured, LLM_ERA[3])
    fig.tight_layout()
    return fig


def write_png(path: Path | str = Path("docs/_static/concept_map.png"), dpi: int = 80) -> Path:
    """Draw the map and save it as a PNG at ``path`` (small enough to commit); return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = concept_map()
    try:
        fig.savefig(path, dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


if __name__ == "__main__":
    print(f"written {write_png(*sys.argv[1:2])}")
