"""Chapter 03's diagram: SI's path integral. Each step Δθ(t) along the training path, the downhill direction −g(t)
where it starts, and the total change Δ that normalises the sum."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, canvas

HESSIAN = np.array([[0.45, 0.3], [0.3, 2.2]])  # a tilted, narrow bowl: the path bends
MINIMUM = np.array([3.0, 1.7])
START = np.array([0.5, 3.9])
LEVELS = (0.1, 0.4, 1.0)  # the loss above its minimum on each drawn level set


def training_path(steps: int, lr: float = 0.35, momentum: float = 0.4) -> np.ndarray:
    """Heavy-ball gradient descent on ½(θ − c)ᵀH(θ − c) from START: the points θ(0..steps) [steps + 1, 2]."""
    theta, velocity, path = START.copy(), np.zeros(2), [START.copy()]
    for _ in range(steps):
        velocity = momentum * velocity - lr * HESSIAN @ (theta - MINIMUM)
        theta = theta + velocity
        path.append(theta.copy())
    return np.array(path)


def si_path_integral(steps: int = 8) -> Figure:
    """The loss's level sets, the path's ``steps`` updates Δθ(t) (black), −g(t) at each step's start (green,
    scaled down), and the total change Δ (dashed): ω_k adds −g_k(t)·Δθ_k(t) over the steps, coordinate by
    coordinate, and Ω_k divides it by Δ_k² + ξ."""
    _validate.positive_int("steps", steps)
    fig, ax = canvas(9.5, 4.8, title="SI: importance as a sum along the path the weights took")
    eigenvalues, eigenvectors = np.linalg.eigh(HESSIAN)
    angle = np.degrees(np.arctan2(eigenvectors[1, 0], eigenvectors[0, 0]))
    for level in LEVELS:  # ½δᵀHδ = level
        semi = np.sqrt(2 * level / eigenvalues)
        ax.add_patch(Ellipse(tuple(MINIMUM), 2 * semi[0], 2 * semi[1], angle=angle, fill=False,
                             edgecolor=PALETTE["frozen"], linewidth=1.0))
    path = training_path(steps)
    for t in range(steps):
        here = path[t]
        downhill = -HESSIAN @ (here - MINIMUM)
        length = 0.45 * min(1.0, np.linalg.norm(downhill))  # shorter where the slope is gentle
        arrow(ax, tuple(here), tuple(here + length * downhill / max(np.linalg.norm(downhill), 1e-9)),
              color=PALETTE["shared"])
        arrow(ax, tuple(here), tuple(path[t + 1]), color="#222222")
    arrow(ax, tuple(path[0]), tuple(path[-1]), color=PALETTE["warn"], linestyle="--")
    ax.text(*(path[0] + (-0.35, 0.15)), "θ at the\ntask's start", fontsize=8, ha="center")
    ax.text(*(path[-1] + (0.1, -0.35)), "θ at its end", fontsize=8)
    ax.text(*((path[0] + path[-1]) / 2 + (0.15, 0.1)), "Δ: the total change", fontsize=8, color=PALETTE["warn"])
    note = 5.9
    ax.text(note, 3.9, "black: the steps Δθ(t)\ngreen: −g(t), downhill where each starts", fontsize=8.5,
            va="center")
    ax.text(note, 2.6, "ω_k = Σ_t −g_k(t)·Δθ_k(t)\neach step's share of the loss decrease,\ncoordinate by coordinate",
            fontsize=9, va="center")
    ax.text(note, 1.2, "Ω_k = ω_k / (Δ_k² + ξ)\nΔ_k: how far θ_k ended from its start,\nnot the length of the path",
            fontsize=9, va="center", color=PALETTE["warn"])
    return fig
