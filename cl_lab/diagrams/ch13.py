"""Chapter 13's diagram: the production loop of a language model that keeps learning. Continual pretraining on
new data, an evaluation gate with a release rule, a canary on a slice of traffic, serving with drift monitoring,
and drift sending new data back to the start."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas


def production_loop(canary_share: float = 0.1) -> Figure:
    """The loop: continual pretraining → evaluation and release rule → canary (``canary_share`` of traffic,
    0 < share < 1) → serving with drift monitoring → back to continual pretraining; a failed gate or canary
    goes back too."""
    share = _validate.in_range("canary_share", _validate.positive("canary_share", canary_share), 0.0, 1.0,
                               high_open=True)
    fig, ax = canvas(10.0, 5.0, title="The production loop: train, gate, canary, serve, watch — and again")
    box(ax, 0.4, 3.2, 2.6, 1.0, "continual pretraining\n(re-warm LR, replay in tokens)", color=PALETTE["new"],
        alpha=0.35, fontsize=8.5)
    box(ax, 6.8, 3.2, 2.8, 1.0, "evaluation + release rule\n(new ≥ +10 pts, old ≤ −5 pts)", color=PALETTE["shared"],
        alpha=0.35, fontsize=8.5)
    box(ax, 6.8, 0.6, 2.8, 1.0, f"canary\n({share:.0%} of traffic)", color=PALETTE["warn"], alpha=0.25,
        fontsize=8.5)
    box(ax, 0.4, 0.6, 2.6, 1.0, "serving\n+ drift monitoring", color=PALETTE["old"], alpha=0.3, fontsize=8.5)
    arrow(ax, (3.0, 3.7), (6.8, 3.7), text="candidate model")
    arrow(ax, (8.2, 3.2), (8.2, 1.6), text="passes")
    arrow(ax, (6.8, 1.1), (3.0, 1.1), text="promote")
    arrow(ax, (1.7, 1.6), (1.7, 3.2), text="drift → new data")
    arrow(ax, (6.9, 1.6), (3.0, 3.25), color=PALETTE["warn"], linestyle="--", text="gate or canary fails: back")
    return fig
