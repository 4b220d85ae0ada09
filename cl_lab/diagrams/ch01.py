"""Chapter 01's diagram: the accuracy matrix R, and where AA, BWT and FWT are read off it."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
KINDS = {"just learned (diagonal)": PALETTE["new"], "after later tasks": PALETTE["old"],
         "read by FWT (just above)": PALETTE["shared"], "not trained yet": PALETTE["frozen"]}


def _kind(i: int, j: int) -> str:
    if i == j:
        return "just learned (diagonal)"
    if i > j:
        return "after later tasks"
    return "read by FWT (just above)" if j == i + 1 else "not trained yet"


def accuracy_matrix_layout(n_tasks: int = 4) -> Figure:
    """R [T, T] as a grid (row i: after training task i; column j: accuracy on task j, counted from 1): the
    diagonal just learned, below it what later tasks left, above it tasks not trained yet. AA averages the last
    row; BWT compares each old task's last-row entry with its diagonal one (the arrows); FWT reads the entries
    just above the diagonal against a fresh model's accuracy b_j."""
    T = _validate.positive_int("n_tasks", n_tasks)
    if not 2 <= T <= 9:
        raise ValueError(f"n_tasks must be between 2 and 9 (one digit per subscript), got {T}")
    left, bottom = 1.6, 1.0
    top = bottom + T
    fig, ax = canvas(left + T + 4.6, T + 1.9, title="The accuracy matrix R: where AA, BWT and FWT are read")
    for i in range(T):
        for j in range(T):
            kind = _kind(i, j)
            box(ax, left + j + 0.04, top - i - 1 + 0.04, 0.92, 0.92, f"R{i + 1}{j + 1}".translate(_SUBSCRIPTS),
                color=KINDS[kind], alpha=0.6 if i == T - 1 else 0.3, fontsize=9)
    for k in range(T):
        ax.text(left - 0.12, top - k - 0.5, f"after task {k + 1}", ha="right", va="center", fontsize=8)
        ax.text(left + k + 0.5, top + 0.1, f"on task {k + 1}", ha="center", va="bottom", fontsize=8)
    for j in range(T - 1):  # BWT: from each old task's just-learned entry down to the last row
        arrow(ax, (left + j + 0.78, top - j - 0.7), (left + j + 0.78, bottom + 0.72), color=PALETTE["warn"])
    note = left + T + 0.25
    ax.text(note, bottom + 0.5, "AA = mean of the last row", va="center", fontsize=9)
    ax.text(note, bottom + T / 2, "BWT = mean over old tasks j of\nR[T, j] − R[j, j]  (the red arrows;\n"
            "negative = forgetting)", va="center", fontsize=9, color=PALETTE["warn"])
    ax.text(note, top - 0.5, "FWT = mean over j ≥ 2 of\nR[j−1, j] − b_j  (b_j: a fresh\nmodel's accuracy)",
            va="center", fontsize=9)
    for k, (label, color) in enumerate(KINDS.items()):
        x = 0.2 + k * (left + T + 4.2) / len(KINDS)
        box(ax, x, 0.2, 0.3, 0.3, color=color, alpha=0.45)
        ax.text(x + 0.4, 0.35, label, va="center", fontsize=8)
    return fig
