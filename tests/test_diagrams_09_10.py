"""Chapters 09 and 10's diagrams: each returns a figure that draws what it names (LoRA's W₀ + B·A; task vectors
adding in weight space), with its labels, and closes cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cl_lab.diagrams import ch09, ch10  # noqa: E402


def _texts(fig: Figure) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def test_lora_update_shows_the_frozen_weight_the_two_factors_and_the_count():
    fig = ch09.lora_update(d_in=128, d_out=384, rank=8)
    text = _texts(fig)
    for piece in ("W₀", "frozen", "B [384 × 8]", "A [8 × 128]", "= 0 at the start", f"{8 * (128 + 384):,}"):
        assert piece in text
    assert len(fig.axes[0].patches) >= 5  # W₀, B, A and the two notes
    fig.canvas.draw()
    plt.close(fig)


def test_task_vectors_draws_the_merge_the_soup_and_negation():
    fig = ch10.task_vectors(lam=0.8)
    text = _texts(fig)
    for piece in ("θ₀ (pretrained)", "λ = 0.8", "soup", "negation", "τ₁", "τ₂"):
        assert piece in text
    assert len(fig.axes[0].patches) == 5  # τ₁, τ₂, τ₂ from θ₁, the merge, the negation
    assert len(fig.axes[0].lines) == 6  # the six points
    fig.canvas.draw()
    plt.close(fig)
