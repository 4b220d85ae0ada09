"""Chapter 02's diagram: EWC's bowl. The full quadratic ½δᵀFδ has tilted ellipses; the diagonal one EWC keeps is
axis-aligned, too steep along the valley where coupled weights can trade off and too shallow across it."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from cl_lab.diagrams._draw import PALETTE, arrow, canvas

LEVELS = (1.0, 4.0, 9.0)  # the loss rises ½·level: ellipses δᵀFδ = level


def _ellipse(centre, matrix: np.ndarray, level: float, scale: float, **style) -> Ellipse:
    """The curve δᵀ·matrix·δ = level around ``centre``, ``scale`` drawing units per unit of δ."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    semi = np.sqrt(level / eigenvalues) * scale  # along each eigenvector
    angle = np.degrees(np.arctan2(eigenvectors[1, 0], eigenvectors[0, 0]))
    return Ellipse(centre, 2 * semi[0], 2 * semi[1], angle=angle, fill=False, **style)


def diagonal_vs_full(fisher=((1.0, 0.9), (0.9, 1.0))) -> Figure:
    """Level sets of the full quadratic (Fisher F, 2×2) and of its diagonal around θ*, with the valley (F's
    smallest-eigenvalue direction): the cheap way for the old task, which the diagonal bowl blocks."""
    F = np.asarray(fisher, dtype=float)
    if F.shape != (2, 2) or not np.allclose(F, F.T) or np.linalg.eigvalsh(F).min() <= 0:
        raise ValueError(f"fisher must be a symmetric positive-definite 2×2 matrix, got {F.tolist()}")
    fig, ax = canvas(9.0, 5.0, title="EWC's bowl: the full quadratic against the diagonal it keeps")
    centre = (3.0, 2.4)
    diagonal = np.diag(np.diag(F))
    reach = max(np.sqrt(max(LEVELS) / np.linalg.eigvalsh(m).min()) for m in (F, diagonal))
    scale = 2.2 / reach  # the widest ellipse spans 2.2 units from θ*
    for level in LEVELS:
        ax.add_patch(_ellipse(centre, F, level, scale, edgecolor=PALETTE["old"], linewidth=1.6))
        ax.add_patch(_ellipse(centre, diagonal, level, scale, edgecolor=PALETTE["new"], linewidth=1.4,
                              linestyle="--"))
    ax.plot(*centre, "k*", markersize=10)
    ax.text(centre[0] + 0.1, centre[1] - 0.3, "θ*", fontsize=10)
    valley = np.linalg.eigh(F)[1][:, 0]
    end = np.array(centre) + valley * 1.9
    arrow(ax, centre, tuple(end), color=PALETTE["shared"])
    ax.text(end[0] - 1.5, end[1] + 0.1, "valley: cheap\nfor the old task", fontsize=8, color=PALETTE["shared"])
    ax.text(5.7, 3.9, "full F (tilted):\nthe real rise of the old loss", fontsize=9, color=PALETTE["old"])
    ax.text(5.7, 2.6, "diagonal (EWC, dashed):\naxis-aligned, blind to\nthe coupling", fontsize=9,
            color=PALETTE["new"])
    ax.text(5.7, 0.7, "along the valley: too steep\nacross it: too shallow", fontsize=9, color=PALETTE["warn"])
    arrow(ax, (0.3, 0.3), (1.0, 0.3), text="θ₁")
    arrow(ax, (0.3, 0.3), (0.3, 1.0))
    ax.text(0.2, 1.05, "θ₂", fontsize=8)
    return fig
