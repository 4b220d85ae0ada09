"""Chapter 08's diagram: the stability gap on a timeline, what task-end evaluation sees and what Min-ACC sees."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE


def gap_curve(n_tasks: int = 3, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A schematic accuracy curve of task 1 over ``n_tasks`` tasks of ``steps`` steps: it learns, then at every
    switch drops sharply and recovers part of the way. Returns (step [N + 1], accuracy [N + 1])."""
    _validate.positive_int("n_tasks", n_tasks)
    _validate.positive_int("steps", steps)
    n = np.arange(n_tasks * steps + 1)
    acc = 0.95 * (1 - np.exp(-n / (0.2 * steps)))  # learning task 1
    for switch in range(1, n_tasks):
        since = n - switch * steps
        later = since > 0
        plateau = 0.9 - 0.08 * switch  # where it recovers to, a little lower after each task
        dip = 0.55 * np.exp(-since / (0.12 * steps)) * (1 - np.exp(-since / (0.02 * steps)))  # fast fall, slow rise
        acc = np.where(later, plateau - dip, acc)
    return n, acc


def stability_gap_timeline(n_tasks: int = 3, steps: int = 100) -> Figure:
    """Task 1's accuracy through ``n_tasks`` tasks (schematic). Dots: the task ends, all that the accuracy matrix R
    records. Every evaluation after t₁ counts for Min-ACC, the lowest point; the hidden dip is the distance from the
    lowest task-end value down to it."""
    n, acc = gap_curve(n_tasks, steps)
    ends = np.arange(1, n_tasks + 1) * steps
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(n, acc, color=PALETTE["old"], lw=2, label="accuracy on task 1, every step")
    for switch in ends[:-1]:
        ax.axvline(switch, color="grey", ls="--", lw=0.8)
    ax.plot(ends, acc[ends], "o", color="black", ms=7, label="task ends: what R sees")
    after = n > ends[0]
    low = int(np.flatnonzero(after)[np.argmin(acc[after])])
    ax.axhline(acc[low], color=PALETTE["warn"], ls=":", lw=1.2)
    ax.plot(low, acc[low], "v", color=PALETTE["warn"], ms=9, label="Min-ACC₁ = min over n > t₁")
    lowest_end = acc[ends[1:]].min()
    ax.annotate("", (low + 0.06 * steps, acc[low]), (low + 0.06 * steps, lowest_end),
                arrowprops={"arrowstyle": "<->", "color": PALETTE["warn"]})
    ax.text(low + 0.1 * steps, acc[low] - 0.04, "↕ hidden dip: invisible in R", color=PALETTE["warn"],
            fontsize=9, va="top")
    ax.text(ends[0], 0.02, "t₁: task 1's last step", ha="right", fontsize=8.5)
    for k, switch in enumerate(ends[:-1]):
        ax.text(switch + 2, 1.02, f"switch to task {k + 2}", fontsize=8.5)
    ax.set(xlabel="training step n", ylabel="accuracy on task 1", ylim=(0, 1.1), xlim=(0, n[-1] + 2),
           title="The stability gap (schematic): a dip after every switch, partly recovered by the next task end")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
