"""Chapters 12 and 13's diagrams: the alignment chain draws base, SFT, policy, reference and the KL; the
production loop draws its four stages and five arrows; bad arguments are refused; figures close cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from cl_lab.diagrams import ch12, ch13  # noqa: E402


def _texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def _count(fig, kind) -> int:
    return sum(isinstance(p, kind) for p in fig.axes[0].patches)


def test_alignment_chain_draws_the_reference_and_the_kl():
    fig = ch12.alignment_chain(beta=0.1)
    text = _texts(fig)
    for piece in ("base model", "SFT model", "policy π_θ", "reference π_ref", "frozen", "KL(π_θ ‖ π_ref)",
                  "β = 0.1", "alignment tax"):
        assert piece in text, piece
    assert _count(fig, FancyBboxPatch) == 4 and _count(fig, FancyArrowPatch) == 4
    fig.canvas.draw()
    plt.close(fig)


def test_production_loop_draws_the_four_stages_and_the_way_back():
    fig = ch13.production_loop(canary_share=0.1)
    text = _texts(fig)
    for piece in ("continual pretraining", "release rule", "canary\n(10% of traffic)", "drift monitoring",
                  "drift → new data", "fails: back"):
        assert piece in text, piece
    assert _count(fig, FancyBboxPatch) == 4 and _count(fig, FancyArrowPatch) == 5
    fig.canvas.draw()
    plt.close(fig)


@pytest.mark.parametrize(("draw", "bad"), [(ch12.alignment_chain, 0.0), (ch13.production_loop, 0.0),
                                           (ch13.production_loop, 1.0)])
def test_bad_arguments_are_refused(draw, bad):
    with pytest.raises(ValueError):
        draw(bad)
    plt.close("all")
