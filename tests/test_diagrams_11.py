"""Chapter 11's diagram: ROME's key–value view draws the prompt with the edited token, the key, the memory W,
the value and the rank-one formula, refuses a subject outside the prompt, and closes cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from cl_lab.diagrams import ch11  # noqa: E402


def _texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def test_rome_key_value_draws_the_memory_and_the_edit():
    fig = ch11.rome_key_value(d_model=576, d_key=1536)
    text = _texts(fig)
    for piece in ("key k*\n[1536]", "W [576 × 1536]", "value W k*", "(C⁻¹k*)ᵀ k*", "tr(ΔCΔᵀ)", "v* = W k* + δ",
                  "C = E[k kᵀ]", "Tower", "located"):
        assert piece in text, piece
    boxes = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) == len("The Eiffel Tower is located in the city of".split()) + 5  # the words and 5 parts
    assert sum(isinstance(p, FancyArrowPatch) for p in fig.axes[0].patches) == 5
    fig.canvas.draw()
    plt.close(fig)


def test_a_subject_outside_the_prompt_is_refused():
    with pytest.raises(ValueError, match="subject must occur in the prompt"):
        ch11.rome_key_value(subject="Louvre")
