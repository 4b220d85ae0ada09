"""Chapter 10's diagram: task vectors adding (and subtracting) in weight space."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, arrow, canvas


def task_vectors(lam: float = 0.8) -> Figure:
    """θ₀ and two fine-tunes θ₁, θ₂ in a 2-D sketch of weight space: τ_k = θ_k − θ₀, the merge θ₀ + λ(τ₁ + τ₂),
    the soup (λ = 1/K, the plain average of the fine-tunes) and negation θ₀ − τ₁."""
    fig, ax = canvas(8.0, 5.0, title="task vectors: fine-tune separately, then add in weight space")
    theta0, tau1, tau2 = (2.6, 1.6), (3.0, 0.6), (0.9, 2.4)
    at = lambda *steps: (theta0[0] + sum(s[0] * c for s, c in steps),  # noqa: E731
                         theta0[1] + sum(s[1] * c for s, c in steps))
    theta1, theta2 = at((tau1, 1)), at((tau2, 1))
    merged, soup, negated = at((tau1, lam), (tau2, lam)), at((tau1, 0.5), (tau2, 0.5)), at((tau1, -0.6))
    arrow(ax, theta0, theta1, color=PALETTE["old"])
    arrow(ax, theta0, theta2, color=PALETTE["new"])
    arrow(ax, theta1, at((tau1, 1), (tau2, 1)), color=PALETTE["new"], linestyle="--")
    arrow(ax, theta0, merged, color=PALETTE["shared"])
    arrow(ax, theta0, negated, color=PALETTE["warn"], linestyle="--")
    points = {"θ₀ (pretrained)": (theta0, "k"), "θ₁": (theta1, PALETTE["old"]), "θ₂": (theta2, PALETTE["new"]),
              f"θ₀ + λ(τ₁ + τ₂), λ = {lam:g}": (merged, PALETTE["shared"]),
              "soup: (θ₁ + θ₂)/2 (λ = 1/K)": (soup, PALETTE["frozen"]),
              "θ₀ − τ₁ (negation)": (negated, PALETTE["warn"])}
    for label, ((x, y), color) in points.items():
        ax.plot(x, y, "o", color=color, ms=7)
        below = label.startswith(("soup", "θ₀ +", "θ₀ −"))
        ax.text(x + 0.12, y - 0.3 if below else y + 0.1, label, fontsize=8, color=color)
    ax.text(*at((tau1, 1.05), (tau2, 1.02)), "λ = 1", color=PALETTE["new"], fontsize=8)
    ax.text(*at((tau1, 0.5), (tau2, -0.12)), "τ₁", color=PALETTE["old"], fontsize=10)
    ax.text(*at((tau2, 0.45), (tau1, -0.15)), "τ₂", color=PALETTE["new"], fontsize=10)
    ax.text(0.2, 0.25, "Near-orthogonal τ's still interfere: the merge passes every input through both changes.",
            fontsize=8, color="0.3")
    return fig
