"""Shared drawing pieces for the diagrams: a blank canvas, labelled boxes and arrows (matplotlib only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

PALETTE = {"old": "#4c72b0", "new": "#dd8452", "frozen": "#8c8c8c", "shared": "#55a868", "warn": "#c44e52"}


def canvas(width: float = 8.0, height: float = 4.0, *, title: str = "") -> tuple[Figure, Axes]:
    """A figure with one axis in data units 0..width × 0..height, no ticks or frame."""
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig, ax


def box(ax: Axes, x: float, y: float, w: float, h: float, text: str = "", *, color: str = "#4c72b0",
        alpha: float = 0.25, fontsize: float = 9) -> FancyBboxPatch:
    """A rounded box with its lower-left corner at (x, y) and ``text`` centred in it."""
    patch = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                           edgecolor=color, alpha=alpha, linewidth=1.5)
    ax.add_patch(patch)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)
    return patch


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], *, color: str = "#333333",
          style: str = "-|>", linestyle: str = "-", text: str = "", fontsize: float = 8) -> FancyArrowPatch:
    """An arrow from ``start`` to ``end``, with ``text`` at its middle."""
    patch = FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linestyle=linestyle,
                            linewidth=1.3)
    ax.add_patch(patch)
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, text, ha="center", va="bottom",
                fontsize=fontsize, color=color)
    return patch
