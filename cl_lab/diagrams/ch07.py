"""Chapter 07's diagram: the Class-IL head, one row per class competing in one softmax, and Weight Aligning's
rescaling of the newest classes' rows."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

OLD_NORM, NEW_NORM = 1.0, 1.4  # schematic row norms: the newest rows longer, as after training on them


def _head(ax: Axes, left: float, norms: list[float], n_new: int, title: str) -> list[Rectangle]:
    """Draw the head's rows as bars whose length is the row's norm; return the bars."""
    n = len(norms)
    bars, bar_h, step = [], 0.22, 0.32
    top = 0.6 + step * n
    for c, norm in enumerate(norms):
        new = c >= n - n_new
        y = top - step * (c + 1)
        bar = Rectangle((left + 0.45, y), 1.4 * norm, bar_h, facecolor=PALETTE["new" if new else "old"], alpha=0.7)
        ax.add_patch(bar)
        bars.append(bar)
        ax.text(left + 0.35, y + bar_h / 2, f"w{c}", ha="right", va="center", fontsize=8)
    ax.text(left + 1.4, top + 0.25, title, ha="center", fontsize=10, weight="bold")
    return bars


def classil_head(n_old: int = 8, n_new: int = 2) -> Figure:
    """Left: after the last task, φ(x) feeds one row w_c per class and every logit z_c = w_c·φ(x) + b_c competes
    in a single softmax; only the newest classes' rows were trained lately, and theirs are longer. Right: Weight
    Aligning multiplies the new rows (and biases) by γ = mean‖w_old‖ / mean‖w_new‖, so the mean norms match."""
    _validate.positive_int("n_old", n_old)
    _validate.positive_int("n_new", n_new)
    n = n_old + n_new
    gamma = OLD_NORM / NEW_NORM
    fig, ax = canvas(13.2, 1.6 + 0.32 * n, title="The Class-IL head: one softmax over every class seen so far")
    box(ax, 0.2, 0.6 + 0.32 * n / 2 - 0.4, 1.4, 0.8, "features\nφ(x)", color=PALETTE["shared"], alpha=0.3)
    arrow(ax, (1.65, 0.6 + 0.32 * n / 2), (2.3, 0.6 + 0.32 * n / 2))
    norms = [OLD_NORM] * n_old + [NEW_NORM] * n_new
    _head(ax, 2.3, norms, n_new, "after the last task")
    mid = 0.6 + 0.32 * n / 2
    ax.text(6.05, mid + 0.6, "z_c = w_c·φ(x) + b_c\nsoftmax over all\nclasses: the longer\nnew rows win",
            fontsize=8.5, ha="center", va="center")
    arrow(ax, (4.9, mid - 0.4), (7.3, mid - 0.4), color=PALETTE["warn"], text=f"WA: × γ = {gamma:.2f}")
    ax.text(6.1, mid - 0.75, f"on rows {n_old}–{n - 1} only", ha="center", fontsize=8, color=PALETTE["warn"])
    _head(ax, 7.4, [OLD_NORM] * n_old + [NEW_NORM * gamma] * n_new, n_new, "after Weight Aligning")
    ax.text(10.5, mid + 0.3, f"old classes 0–{n_old - 1}: unchanged\nnew classes {n_old}–{n - 1}: × γ\n"
            "γ = mean‖w_old‖ / mean‖w_new‖", fontsize=8.5, va="center")
    ax.text(10.5, mid - 0.9, "γ < 1 lowers a logit only\nwhere it is positive:\na negative one moves up", fontsize=8,
            va="center", color=PALETTE["warn"])
    return fig
