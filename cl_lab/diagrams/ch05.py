"""Chapter 05's diagram: GEM's projection case by case in 2-D, and A-GEM's single half-plane beside it."""

from __future__ import annotations

import math

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from cl_lab.diagrams._draw import PALETTE, arrow, canvas
from cl_lab.methods.projection import agem_project, gem_project

SCALE = 0.85  # data units per unit of gradient
RADIUS = 1.5  # how far the shaded feasible region reaches from each panel's origin

G_TWO = torch.tensor([[1.0, 0.1], [0.3, 1.0]], dtype=torch.float64)  # two old tasks' memory gradients
CASES = (  # (title, g, constraints, what the rule says)
    ("no conflict", (0.9, 1.3), G_TWO, "g is in the cone:\ng̃ = g"),
    ("one constraint active", (-1.4, 0.9), G_TWO, "drop g onto g₁'s edge\n(g₂'s constraint holds)"),
    ("both active", (-1.2, -1.2), G_TWO, "no edge works alone:\ng̃ = the apex (0 in 2-D)"),
    ("A-GEM: one half-plane", (-1.6, -0.4), G_TWO, "drop g onto g_ref's line;\n⟨g̃, g₁⟩ < 0 is left"),
)


def _feasible_polygon(constraints: torch.Tensor, n: int = 180) -> list[tuple[float, float]]:
    """The region {v : ⟨v, c⟩ ≥ 0 for every row c} within RADIUS, as a polygon from the origin (a cone in 2-D)."""
    points = [(0.0, 0.0)]
    for i in range(n + 1):
        angle = 2 * math.pi * i / n
        v = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        if bool((constraints @ v >= 0).all()):
            points.append((RADIUS * float(v[0]), RADIUS * float(v[1])))
        elif len(points) > 1:
            points.append((0.0, 0.0))  # close a wedge before the arc leaves the feasible region
    return points


def _vector(ax: Axes, origin: tuple[float, float], v: torch.Tensor, label: str, color: str) -> None:
    end = (origin[0] + SCALE * float(v[0]), origin[1] + SCALE * float(v[1]))
    arrow(ax, origin, end, color=color)
    unit = v / max(float(v.norm()), 1e-12)
    ax.text(end[0] + 0.15 * float(unit[0]), end[1] + 0.15 * float(unit[1]), label, fontsize=9, color=color,
            ha="center", va="center")


def _panel(ax: Axes, origin: tuple[float, float], title: str, g: torch.Tensor, G: torch.Tensor, note: str) -> None:
    agem = title.startswith("A-GEM")
    constraints = G.mean(0, keepdim=True) if agem else G
    region = [(origin[0] + x, origin[1] + y) for x, y in _feasible_polygon(constraints)]
    ax.add_patch(Polygon(region, closed=True, facecolor=PALETTE["shared"], alpha=0.15, edgecolor="none"))
    g_tilde = agem_project(g, G.mean(0)) if agem else gem_project(g, G, margin=0.0, eps=0.0)
    for k, gk in enumerate(G):
        _vector(ax, origin, gk, f"g{'₁₂'[k]}", PALETTE["old"])
    if agem:
        _vector(ax, origin, G.mean(0), "g_ref", PALETTE["frozen"])
    _vector(ax, origin, g, "g", PALETTE["warn"])
    moved = not torch.allclose(g_tilde, g)
    end = (origin[0] + SCALE * float(g[0]), origin[1] + SCALE * float(g[1]))
    tilde_end = (origin[0] + SCALE * float(g_tilde[0]), origin[1] + SCALE * float(g_tilde[1]))
    if moved:
        ax.plot([end[0], tilde_end[0]], [end[1], tilde_end[1]], ls=":", color="#333333", lw=1)
    if float(g_tilde.norm()) < 1e-9:
        ax.plot(*origin, "o", color=PALETTE["shared"], ms=6)
        ax.text(origin[0] + 0.08, origin[1] - 0.22, "g̃ = 0", fontsize=8.5, color=PALETTE["shared"])
    elif moved:
        _vector(ax, origin, g_tilde, "g̃", PALETTE["shared"])
    ax.text(origin[0], origin[1] + 1.95, title, ha="center", fontsize=10, weight="bold")
    ax.text(origin[0], origin[1] - 1.75, note, ha="center", va="top", fontsize=8.5)


def projection_cases() -> Figure:
    """Four 2-D panels. GEM (margin 0) projects g onto the cone where ⟨v, g_k⟩ ≥ 0 for every old task k: with no
    conflict g stays; with one active constraint g drops onto that edge; with both active it lands on their
    intersection (the apex, in 2-D). A-GEM keeps only the half-plane of g_ref (here the mean of g₁ and g₂) and can
    leave a conflict with one task. Shaded: the feasible region; dotted: the projection. The g̃ are computed by
    ``gem_project`` and ``agem_project``."""
    fig, ax = canvas(13.0, 4.9, title="Projection against old tasks' gradients (shaded: the directions allowed)")
    for i, (title, g, G, note) in enumerate(CASES):
        _panel(ax, (1.6 + 3.25 * i, 2.55), title, torch.tensor(g, dtype=torch.float64), G, note)
    return fig
