"""Chapter 14's diagram: the post-training chain base → SFT → DPO → RL, what each stage trains on, which model each
stage is anchored to, and the capability probe run after every stage."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas

STAGES = (  # (name, what it starts from / learns, its signal)
    ("base", "pretrained on\nfacts and text", "next-token loss"),
    ("SFT", "question format\n\"Q: … A:\" → \"baker .\"", "demonstrations\n(cross-entropy)"),
    ("DPO", "privacy preference\n\"in a city .\" ≻ \"Paris .\"", "preference pairs\n(β = implicit KL)"),
    ("RL", "answer right\nG samples a question", "verifier reward\n(GRPO, β·KL)"),
)


def post_training_chain(group_size: int = 8) -> Figure:
    """Four stage boxes left to right, each with its training signal underneath; solid arrows hand each
    checkpoint to the next stage, dashed arrows mark the reference each later stage is anchored to (DPO: the SFT
    model; RL: the DPO model); a strip along the bottom is the capability probe run after every stage."""
    fig, ax = canvas(11.8, 5.0, title="post-training as a continual-learning chain: each stage starts from the last")
    width, height, gap, y = 2.3, 1.15, 0.65, 2.55
    xs = [0.35 + i * (width + gap) for i in range(len(STAGES))]
    colours = (PALETTE["frozen"], PALETTE["old"], PALETTE["shared"], PALETTE["new"])
    for x, (name, what, signal), colour in zip(xs, STAGES, colours):
        text = what.replace("G samples", f"G = {group_size} samples") if name == "RL" else what
        box(ax, x, y, width, height, f"{name}\n{text}", color=colour, alpha=0.3, fontsize=8.5)
        ax.text(x + width / 2, y - 0.35, signal, ha="center", va="top", fontsize=8, color="0.25")
    for a, b in zip(xs[:-1], xs[1:]):
        arrow(ax, (a + width, y + height * 0.62), (b, y + height * 0.62), text="checkpoint")
    for ref, stage, label, lift in ((1, 2, "DPO's reference π_ref: the SFT model", 0.15),
                                    (2, 3, "RL's reference π_ref: the DPO model", 0.75)):
        left, right = xs[ref] + width * 0.6, xs[stage] + width * 0.4
        arrow(ax, (left, y + height + lift), (right, y + height + lift), color=PALETTE["warn"], linestyle="--")
        ax.text((left + right) / 2, y + height + lift + 0.08, label, ha="center", fontsize=8, color=PALETTE["warn"])
    box(ax, 0.35, 0.3, xs[-1] + width - 0.35, 0.6,
        "capability probe after every stage: recall · unseen recall · question answers · format · win rate · "
        "perplexity", color=PALETTE["frozen"], alpha=0.15, fontsize=8.5)
    for x in xs:
        arrow(ax, (x + width / 2, y - 1.0), (x + width / 2, 0.92), color="0.55")
    return fig
