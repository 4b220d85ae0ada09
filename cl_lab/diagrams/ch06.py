"""Chapter 06's diagrams: a progressive network's columns with their lateral connections, and PackNet's per-task
weight masks inside one layer."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹"


def prognn_columns(n_columns: int = 3, n_layers: int = 2) -> Figure:
    """One column per task, ``n_layers`` hidden layers and a head each. Solid arrows: a column's own weights W;
    dashed: the lateral maps U from every earlier column's layer l − 1 into layer l (and into the head). Earlier
    columns are frozen (grey); the newest trains (orange). Nothing points from a newer column to an older one."""
    _validate.positive_int("n_columns", n_columns)
    _validate.positive_int("n_layers", n_layers)
    width, height, dx, dy = 1.5, 0.5, 2.6, 1.05
    fig, ax = canvas(1.2 + dx * n_columns + 2.8, 2.5 + dy * n_layers,
                     title="Progressive network: a column per task, lateral maps from the earlier columns")
    levels = [f"h{SUPERSCRIPTS[l]}" for l in range(1, n_layers + 1)] + ["head"]  # bottom to top
    y_of = [1.2 + dy * i for i in range(len(levels))]
    x_of = [0.6 + dx * k for k in range(n_columns)]
    box(ax, 0.6, 0.25, dx * (n_columns - 1) + width, 0.45, "x (the same input for every column)",
        color=PALETTE["shared"], alpha=0.25)
    for k, x in enumerate(x_of):
        newest = k == n_columns - 1
        color = PALETTE["new"] if newest else PALETTE["frozen"]
        for level, y in zip(levels, y_of, strict=True):
            box(ax, x, y, width, height, level, color=color, alpha=0.35)
        arrow(ax, (x + width / 2, 0.7), (x + width / 2, y_of[0]), color=color)
        for below, above in zip(y_of, y_of[1:], strict=False):
            arrow(ax, (x + width / 2, below + height), (x + width / 2, above), color=color)
        state = "training" if newest else "frozen"
        ax.text(x + width / 2, y_of[-1] + height + 0.2, f"task {k + 1}\n({state})", ha="center", fontsize=9)
    for k in range(1, n_columns):
        for j in range(k):
            for below, above in zip(y_of, y_of[1:], strict=False):
                arrow(ax, (x_of[j] + width, below + height * 0.6), (x_of[k], above + height * 0.3),
                      color=PALETTE["old"], linestyle="--")
    notes_x = x_of[-1] + width + 0.4
    ax.text(notes_x, y_of[-1], "— W: the column's own\n   weights\n- - U: lateral map from\n   an earlier column",
            fontsize=8.5, va="center")
    ax.text(notes_x, y_of[0] + 0.2, "column k, layer l:\nrelu(W·h_k + Σ_j<k U·h_j)\n\nT columns hold\n"
            "T·P_col + T(T−1)/2·P_lat", fontsize=8.5, va="center")
    return fig


def packnet_owners(n_tasks: int = 3, prune_ratio: float = 0.5, size: int = 8, seed: int = 0) -> np.ndarray:
    """Owner of each weight of a ``size`` × ``size`` layer after ``n_tasks`` PackNet tasks (−1: free). Task k keeps
    the largest-|w| (1 − prune_ratio) of the weights still free when it starts (|w| drawn at random here)."""
    _validate.positive_int("n_tasks", n_tasks)
    _validate.in_range("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True)
    magnitude = np.random.default_rng(seed).random((size, size))
    owner = np.full((size, size), -1)
    for task in range(n_tasks):
        free = np.flatnonzero(owner == -1)
        keep = len(free) - int(prune_ratio * len(free))
        owner.flat[free[np.argsort(-magnitude.flat[free])[:keep]]] = task
    return owner


def packnet_masks(n_tasks: int = 3, prune_ratio: float = 0.5, size: int = 8, seed: int = 0) -> Figure:
    """One panel per task j: the weights its mask M_j uses (owner ≤ j), those it owns itself (orange), those it
    reuses frozen from earlier tasks (grey), and the ones it cannot see (white: free, or owned by later tasks)."""
    owner = packnet_owners(n_tasks, prune_ratio, size, seed)
    cell, gap = 0.3, 1.0
    panel = cell * size
    fig, ax = canvas(n_tasks * (panel + gap) + 0.6, panel + 1.9,
                     title=f"PackNet, prune ratio {prune_ratio:g}: the weights each task's mask uses in one layer")
    for task in range(n_tasks):
        left = 0.4 + task * (panel + gap)
        for (row, col), who in np.ndenumerate(owner):
            if who == task:
                color = PALETTE["new"]
            elif 0 <= who < task:
                color = PALETTE["frozen"]
            else:
                color = "white"
            ax.add_patch(Rectangle((left + col * cell, 0.6 + (size - 1 - row) * cell), cell, cell, facecolor=color,
                                   edgecolor="#bbbbbb", linewidth=0.5))
        mine, reused = int((owner == task).sum()), int(((owner >= 0) & (owner < task)).sum())
        ax.text(left + panel / 2, 0.75 + panel, f"M{SUPERSCRIPTS[task + 1]}: task {task + 1}", ha="center",
                fontsize=10, weight="bold")
        ax.text(left + panel / 2, 0.45, f"own {mine}, reused frozen {reused}", ha="center", va="top", fontsize=8.5)
    ax.text(0.4, panel + 1.35, f"orange: trained by this task · grey: earlier tasks' weights, frozen · white: free "
            f"({int((owner == -1).sum())} after {n_tasks} tasks) or a later task's", fontsize=8.5)
    return fig
