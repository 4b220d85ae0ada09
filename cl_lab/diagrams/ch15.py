"""Chapter 15's diagram: where each member of the PEFT family puts its trainable parameters in one GPT-2 block, and
what stays frozen."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

MEMBERS = (  # (name, where it trains, what it trains)
    ("full fine-tuning", "every weight", "W ← W − η∇W"),
    ("LoRA", "beside each projection", "W + (α/r)·BA, rank r"),
    ("IA³", "on activations", "c_attn output, MLP hidden ⊙ ℓ"),
    ("prompt tuning", "before the input", "n soft tokens, [n, d]"),
    ("OSF", "inside each projection", "low singular directions;\ngradient orthogonal to the top ones"),
)


def peft_family(rank: int = 8, n_virtual: int = 4) -> Figure:
    """One transformer block drawn as input → attention → MLP → output, frozen in grey; beside it, one row per
    method naming where its trainable parameters sit (soft tokens at the input, vectors on activations, low-rank
    matrices beside the projections, a subspace inside them, or everything)."""
    fig, ax = canvas(11.5, 5.2, title="the PEFT family: what each method trains in a GPT-2 block")
    y0, h = 0.5, 0.75
    stages = ("tokens\n(+ soft prompt)", "attention\nc_attn · c_proj", "MLP\nc_fc · c_proj", "next-token\nlogits")
    xs = [0.3 + i * 1.45 for i in range(len(stages))]
    for x, text in zip(xs, stages):
        box(ax, x, y0 + 1.9, 1.15, 1.0, text, color=PALETTE["frozen"], alpha=0.25, fontsize=8)
    for a, b in zip(xs[:-1], xs[1:]):
        arrow(ax, (a + 1.15, y0 + 2.4), (b, y0 + 2.4))
    ax.text(3.0, y0 + 3.15, "the pretrained block (frozen unless full fine-tuning)", ha="center", fontsize=8.5,
            color="0.3")
    for x, who in zip(xs, ("prompt tuning", "LoRA · IA³ · OSF", "LoRA · IA³ · OSF", "")):
        ax.text(x + 0.575, y0 + 1.75, who, ha="center", va="top", fontsize=7.5, color=PALETTE["new"])
    ax.text(3.0, y0 + 1.2, "full fine-tuning: every box, embeddings included", ha="center", fontsize=7.5,
            color=PALETTE["warn"])
    colours = (PALETTE["warn"], PALETTE["new"], PALETTE["shared"], PALETTE["old"], PALETTE["new"])
    for i, ((name, where, what), colour) in enumerate(zip(MEMBERS, colours)):
        y = y0 + 4 * 0.86 - i * 0.86
        what = what.replace("rank r", f"rank {rank}").replace("n soft", f"{n_virtual} soft").replace(
            "[n, d]", f"[{n_virtual}, d]")
        box(ax, 6.3, y, 1.9, h, name, color=colour, alpha=0.35, fontsize=8.5)
        box(ax, 8.35, y, 3.0, h, f"{where}:\n{what}", color=colour, alpha=0.12, fontsize=7.5)
    return fig
