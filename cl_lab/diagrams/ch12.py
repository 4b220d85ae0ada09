"""Chapter 12's diagram: the alignment chain. A base model is fine-tuned on demonstrations (SFT); a frozen copy of
the SFT model becomes the reference, and DPO moves the policy towards chosen answers over rejected ones while
β·KL(π_θ ‖ π_ref) holds it near that reference — the alignment tax is what the base model knew and the policy
lost on the way."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas


def alignment_chain(beta: float = 0.1) -> Figure:
    """Base → SFT → DPO, with the frozen reference model (a copy of the SFT model) and DPO's implicit KL of
    strength ``beta`` (> 0) tying the policy to it."""
    beta = _validate.positive("beta", beta)
    fig, ax = canvas(10.0, 4.6, title="The alignment chain: base → SFT → DPO, held near a frozen reference")
    box(ax, 0.3, 2.6, 2.2, 1.0, "base model\n(pretrained)", color=PALETTE["old"], alpha=0.3)
    box(ax, 3.8, 2.6, 2.2, 1.0, "SFT model\n(demonstrations)", color=PALETTE["shared"], alpha=0.3)
    box(ax, 7.3, 2.6, 2.4, 1.0, "policy π_θ\n(DPO on preference pairs)", color=PALETTE["new"], alpha=0.35,
        fontsize=8.5)
    box(ax, 3.8, 0.6, 2.2, 1.0, "reference π_ref\n(frozen SFT copy)", color=PALETTE["frozen"], alpha=0.3)
    arrow(ax, (2.5, 3.1), (3.8, 3.1), text="SFT")
    arrow(ax, (6.0, 3.1), (7.3, 3.1), text="DPO")
    arrow(ax, (4.9, 2.6), (4.9, 1.6), text="copy, freeze")
    arrow(ax, (6.0, 1.1), (8.5, 2.6), color=PALETTE["warn"], style="<|-|>", linestyle="--")
    ax.text(7.4, 1.45, f"β·KL(π_θ ‖ π_ref), β = {beta:g}\n(implicit in DPO's loss)", fontsize=8.5,
            color=PALETTE["warn"], va="center")
    ax.text(0.3, 0.25, "alignment tax: what the base model knew (facts, skills) that the aligned policy lost",
            fontsize=8.5, va="center")
    return fig
