"""Chapter 11's diagram: ROME's key–value view of an MLP. At the edited token the MLP's hidden layer computes a key
k, the output projection W reads it and writes the value W k into the residual stream; ROME changes W by a rank-one
term so that k* retrieves v*, while keys that C⁻¹k* is blind to keep their values."""

from __future__ import annotations

from matplotlib.figure import Figure

from cl_lab import _validate
from cl_lab.diagrams._draw import PALETTE, arrow, box, canvas


def rome_key_value(d_model: int = 576, d_key: int = 1536, subject: str = "Eiffel Tower",
                   prompt: str = "The Eiffel Tower is located in the city of") -> Figure:
    """The key–value view of layer l's MLP at the last subject token (SmolLM2-135M's sizes by default:
    ``d_model`` residual width, ``d_key`` the MLP's hidden width), and ROME's rank-one edit of its output
    projection W [d_model, d_key]."""
    d_model, d_key = _validate.positive_int("d_model", d_model), _validate.positive_int("d_key", d_key)
    if not subject or subject not in prompt:
        raise ValueError(f"subject must occur in the prompt, got subject {subject!r} and prompt {prompt!r}")
    fig, ax = canvas(11.0, 5.2, title="ROME's view: an MLP output projection is a key → value memory")
    words = prompt.split()
    last_subject = subject.split()[-1]
    x = 0.3
    for word in words:  # the prompt, with the edited token marked
        width = 0.11 * len(word) + 0.25
        box(ax, x, 4.3, width, 0.45, word, color=PALETTE["new"] if word == last_subject else PALETTE["frozen"],
            alpha=0.5 if word == last_subject else 0.15, fontsize=8)
        if word == last_subject:
            at = x + width / 2
        x += width + 0.08
    box(ax, at - 0.9, 3.0, 1.8, 0.7, f"residual h\n[{d_model}]", color=PALETTE["old"], alpha=0.25, fontsize=8)
    arrow(ax, (at, 4.3), (at, 3.7), text="layer l")
    box(ax, at - 0.9, 1.5, 1.8, 0.75, f"key k*\n[{d_key}]", color=PALETTE["new"], alpha=0.4, fontsize=8.5)
    arrow(ax, (at, 3.0), (at, 2.25), text="MLP hidden layer")
    box(ax, at + 1.6, 1.2, 2.4, 1.35, f"W [{d_model} × {d_key}]\nmlp.down_proj (c_proj)\nstores keys → values",
        color=PALETTE["shared"], alpha=0.35, fontsize=8.5)
    arrow(ax, (at + 0.9, 1.87), (at + 1.6, 1.87))
    box(ax, at + 4.6, 1.5, 1.6, 0.75, "value W k*\n→ h + W k*", color=PALETTE["old"], alpha=0.3, fontsize=8.5)
    arrow(ax, (at + 4.0, 1.87), (at + 4.6, 1.87))
    formula = "Ŵ = W + (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)"
    box(ax, at + 1.4, 3.0, 5.2, 0.95, f"ROME: {formula}\nthe least change tr(ΔCΔᵀ) with Ŵ k* = v*",
        color=PALETTE["warn"], alpha=0.15, fontsize=8.5)
    arrow(ax, (at + 2.8, 3.0), (at + 2.8, 2.55), color=PALETTE["warn"])
    ax.text(at + 4.6, 1.2, "v* = W k* + δ: δ optimised so the\nmodel says the new object", fontsize=8, va="top")
    ax.text(0.3, 0.55, "C = E[k kᵀ] over the keys of a corpus (every token): the layer's other memories. "
            "A key k with (C⁻¹k*)ᵀ k = 0 keeps its value exactly;\nthe rank-one term moves only the direction "
            "C⁻¹k*, away from the directions that many stored keys share.", fontsize=8, va="center")
    return fig
