"""Chapter 09's diagram: LoRA's update, a frozen W₀ beside a trainable low-rank product B·A."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab.diagrams._draw import PALETTE, box, canvas


def lora_update(d_in: int = 128, d_out: int = 384, rank: int = 8) -> Figure:
    """h = W₀x + (α/r)·B A x: W₀ [d_out, d_in] frozen; B [d_out, r] (zero at the start) and A [r, d_in] (random)
    trainable, drawn to scale in their thin dimension so the parameter counts read off the picture."""
    fig, ax = canvas(10.0, 4.6, title="LoRA: the frozen weight plus a trainable low-rank correction")
    height, width = 3.0, 1.0 + 1.6 * d_in / max(d_in, d_out)  # W₀'s box, taller than wide when d_out > d_in
    thin = max(0.18, 3.0 * rank / d_out)  # the rank-r side, exaggerated just enough to be seen
    y0 = 0.7
    box(ax, 0.3, y0, width, height, f"W₀\n[{d_out} × {d_in}]\nfrozen", color=PALETTE["frozen"], alpha=0.35)
    ax.text(0.3 + width + 0.35, y0 + height / 2, "+", fontsize=22, ha="center", va="center")
    ax.text(0.3 + width + 0.95, y0 + height / 2, "α/r ·", fontsize=11, ha="center", va="center")
    bx = 0.3 + width + 1.45
    box(ax, bx, y0, thin, height, "", color=PALETTE["new"], alpha=0.5)
    ax.text(bx + thin / 2, y0 - 0.25, f"B [{d_out} × {rank}]\n= 0 at the start", ha="center", va="top", fontsize=8)
    ax_ = bx + thin + 0.25
    box(ax, ax_, y0 + height - thin, width, thin, "", color=PALETTE["new"], alpha=0.5)
    ax.text(ax_ + width / 2, y0 + height - thin - 0.15, f"A [{rank} × {d_in}]\nrandom ±1/√d_in", ha="center",
            va="top", fontsize=8)
    ax.text(ax_ + width / 2, y0 + 0.9, f"trainable: r·(d_in + d_out)\n= {rank * (d_in + d_out):,} numbers\n"
            f"(W₀ holds {d_in * d_out:,})", ha="center", va="center", fontsize=8.5)
    right = ax_ + width + 0.6
    box(ax, right, y0 + 1.9, 2.6, 0.8, "h = W₀x + (α/r)·B(Ax)", color=PALETTE["shared"], alpha=0.3, fontsize=9)
    box(ax, right, y0 + 0.5, 2.6, 0.9, "GPT-2's Conv1D stores W₀ as\n[d_in, d_out]: y = xW₀ + b\n"
        "the adapter path is x Aᵀ Bᵀ", color=PALETTE["old"], alpha=0.2, fontsize=8)
    ax.text(right + 1.3, y0 + 3.25, "B = 0 ⇒ the adapted model is the\npretrained one until the first step",
            ha="center", fontsize=8, color=PALETTE["warn"])
    return fig
