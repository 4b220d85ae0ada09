"""Chapter 16's diagram: three experts fine-tuned from one base, and the three ways to one model, each with what it
needs (weights, labelled data, or prompts and the experts themselves)."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

ROUTES = (  # (name, what it needs, what it does)
    ("task arithmetic", "needs: θ₀ and the experts' weights\nno data, no training",
     "θ₀ + λ Σₖ (θₖ − θ₀)"),
    ("multi-task training", "needs: every task's labelled data\nno experts",
     "θ₀ trained on the union of the tasks"),
    ("multi-teacher distillation", "needs: the experts and the tasks' prompts\nno labels",
     "θ₀ trained to match expert k's\nnext-token distribution on task k's prompts"),
)


def experts_to_one(n_experts: int = 3) -> Figure:
    """The base θ₀ on the left, ``n_experts`` experts fanned out from it, and the three routes to one model on the
    right, each box saying what the route needs and what it computes."""
    fig, ax = canvas(11.5, 4.6, title="three experts, three ways to one model")
    box(ax, 0.2, 1.9, 1.2, 0.8, "pretrained\nθ₀", color=PALETTE["frozen"], alpha=0.3, fontsize=9)
    ys = [3.3 - i * 1.35 for i in range(n_experts)]
    for k, y in enumerate(ys):
        box(ax, 2.1, y, 1.65, 0.75, f"expert θ{k + 1}\n(fine-tuned on task {k + 1})", color=PALETTE["old"], alpha=0.3,
            fontsize=7.5)
        arrow(ax, (1.4, 2.3), (2.1, y + 0.37))
    colours = (PALETTE["shared"], PALETTE["warn"], PALETTE["new"])
    for i, ((name, needs, does), colour) in enumerate(zip(ROUTES, colours)):
        y = 3.3 - i * 1.35
        box(ax, 4.6, y, 2.3, 0.75, name, color=colour, alpha=0.35, fontsize=8.5)
        box(ax, 7.05, y, 4.3, 0.75, f"{needs}\n{does}", color=colour, alpha=0.12, fontsize=7)
        arrow(ax, (3.75, 2.3), (4.6, y + 0.37), color=colour, linestyle=":" if i == 1 else "-")
    ax.text(4.1, 0.35, "dotted: multi-task training does not use the experts", ha="center", fontsize=7.5, color="0.3")
    return fig
