"""Chapter 04's diagram: the replay loop. New samples and a buffer draw share every batch; the new samples are then
offered to the buffer, whose policy decides what it keeps."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas


def replay_loop(batch_size: int = 64, replay_ratio: float = 0.5, buffer_size: int = 200) -> Figure:
    """One step of experience replay (``cl_lab.methods.replay.ER``) with its numbers: B·(1 − r) new samples and
    B·r drawn from a buffer of M, one optimizer step on the batch of B, then the new samples offered to the buffer
    (reservoir: the t-th sample seen is kept with probability M/t, in a random slot)."""
    B = _validate.positive_int("batch_size", batch_size)
    r = _validate.in_range("replay_ratio", replay_ratio, 0.0, 1.0)
    M = _validate.positive_int("buffer_size", buffer_size)
    n_old = round(r * B)
    fig, ax = canvas(10.0, 4.6, title="Experience replay: every batch mixes the stream with the memory")
    box(ax, 0.2, 3.0, 2.0, 0.9, "stream of task t\n(new data)", color=PALETTE["new"], alpha=0.3)
    box(ax, 3.1, 3.0, 2.0, 0.9, f"new: B·(1 − r)\n= {B - n_old} samples", color=PALETTE["new"], alpha=0.45)
    box(ax, 0.2, 0.6, 2.6, 1.2, f"buffer: M = {M} slots\nold tasks' samples", color=PALETTE["old"], alpha=0.3)
    box(ax, 3.1, 1.0, 2.0, 0.9, f"replay: B·r\n= {n_old} samples", color=PALETTE["old"], alpha=0.45)
    box(ax, 6.0, 2.0, 1.7, 0.9, f"batch of\nB = {B}", color=PALETTE["shared"], alpha=0.35)
    box(ax, 8.3, 2.0, 1.5, 0.9, "one step:\nloss on all B", color=PALETTE["shared"], alpha=0.5)
    arrow(ax, (2.2, 3.45), (3.1, 3.45), text="draw")
    arrow(ax, (2.8, 1.35), (3.1, 1.4))
    ax.text(2.95, 1.9, "draw", fontsize=8, ha="center")
    arrow(ax, (5.1, 3.3), (6.0, 2.7))
    arrow(ax, (5.1, 1.5), (6.0, 2.2))
    arrow(ax, (7.7, 2.45), (8.3, 2.45))
    arrow(ax, (4.1, 3.0), (2.4, 1.8), color=PALETTE["warn"], linestyle="--")
    ax.text(3.75, 2.4, "then offered to the buffer:\nreservoir keeps the t-th\nseen with probability M/t",
            fontsize=8, color=PALETTE["warn"], ha="left", va="center")
    ax.text(6.0, 0.5, f"r = {r:g}: the old share of every batch, exactly\n(a coin flip per new sample gives r/(1 + r))",
            fontsize=8)
    return fig
