"""Chapter 14's diagram: the post-training chain draws its four stages, their signals, the two references and the
probe strip, and closes cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from cl_lab.diagrams import ch14  # noqa: E402


def test_post_training_chain_draws_the_stages_the_references_and_the_probe():
    fig = ch14.post_training_chain(group_size=8)
    ax = fig.axes[0]
    text = " ".join(t.get_text() for t in ax.texts + [ax.title])
    for piece in ("base", "SFT", "DPO", "RL", "G = 8 samples", "demonstrations", "preference pairs", "verifier reward",
                  "DPO's reference π_ref: the SFT model", "RL's reference π_ref: the DPO model", "capability probe"):
        assert piece in text
    boxes = [p for p in ax.patches if type(p).__name__ == "FancyBboxPatch"]
    arrows = [p for p in ax.patches if type(p).__name__ == "FancyArrowPatch"]
    assert len(boxes) == 5  # four stages and the probe strip
    assert len(arrows) == 3 + 2 + 4  # checkpoints handed on, the two references, one probe per stage
    fig.canvas.draw()
    plt.close(fig)
