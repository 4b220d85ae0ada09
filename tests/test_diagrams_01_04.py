"""Chapters 01–04's diagrams: each draws what it names (R's layout; EWC's two bowls; SI's path; the replay loop),
with its labels, and closes cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch  # noqa: E402

from cl_lab.diagrams import ch01, ch02, ch03, ch04  # noqa: E402


def _texts(fig: Figure) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def _patches(fig: Figure, kind: type) -> list:
    return [p for p in fig.axes[0].patches if isinstance(p, kind)]


def _draw_and_close(fig: Figure) -> None:
    fig.canvas.draw()
    plt.close(fig)


@pytest.mark.parametrize("n_tasks", [3, 5])
def test_accuracy_matrix_layout_draws_every_entry_and_the_three_summaries(n_tasks):
    fig = ch01.accuracy_matrix_layout(n_tasks)
    text = _texts(fig)
    cells = [t.get_text() for t in fig.axes[0].texts if t.get_text().startswith("R") and len(t.get_text()) == 3]
    assert len(cells) == n_tasks ** 2 and "R₁₁" in cells and f"R{n_tasks}{n_tasks}".translate(ch01._SUBSCRIPTS) in cells
    assert len(_patches(fig, FancyBboxPatch)) == n_tasks ** 2 + len(ch01.KINDS)  # the grid and the legend
    assert len(_patches(fig, FancyArrowPatch)) == n_tasks - 1  # one BWT arrow per old task
    for piece in ("AA = mean of the last row", "BWT", "R[T, j] − R[j, j]", "FWT", "R[j−1, j] − b_j",
                  "not trained yet"):
        assert piece in text
    _draw_and_close(fig)


def test_accuracy_matrix_layout_refuses_a_matrix_it_cannot_label():
    with pytest.raises(ValueError, match="n_tasks must be between 2 and 9"):
        ch01.accuracy_matrix_layout(10)


def test_diagonal_vs_full_tilts_the_full_bowl_and_keeps_the_diagonal_upright():
    fig = ch02.diagonal_vs_full([[1.0, 0.9], [0.9, 1.0]])
    ellipses = _patches(fig, Ellipse)
    assert len(ellipses) == 2 * len(ch02.LEVELS)
    full, diagonal = ellipses[0::2], ellipses[1::2]
    assert all(abs(abs(e.angle) % 180 - 45) < 1e-6 or abs(abs(e.angle) % 180 - 135) < 1e-6 for e in full)
    assert all(np.isclose(e.width, e.height) for e in diagonal)  # equal diagonal entries: circles
    assert all(max(f.width, f.height) > max(d.width, d.height) for f, d in zip(full, diagonal))  # the valley
    for piece in ("θ*", "valley", "full F", "diagonal (EWC, dashed)", "too steep", "too shallow"):
        assert piece in _texts(fig)
    _draw_and_close(fig)


def test_diagonal_vs_full_refuses_a_matrix_that_is_not_a_fisher():
    with pytest.raises(ValueError, match="symmetric positive-definite"):
        ch02.diagonal_vs_full([[1.0, 2.0], [2.0, 1.0]])


def test_si_path_integral_draws_each_step_its_gradient_and_the_total_change():
    steps = 6
    fig = ch03.si_path_integral(steps)
    arrows = _patches(fig, FancyArrowPatch)
    assert len(arrows) == 2 * steps + 1  # Δθ(t) and −g(t) per step, and Δ
    assert arrows[-1].get_linestyle() == "--"
    path = ch03.training_path(steps)
    loss = [0.5 * (p - ch03.MINIMUM) @ ch03.HESSIAN @ (p - ch03.MINIMUM) for p in path]
    assert loss[-1] < loss[0] / 10  # the path goes downhill
    assert len(_patches(fig, Ellipse)) == len(ch03.LEVELS)
    for piece in ("ω_k = Σ_t −g_k(t)·Δθ_k(t)", "Ω_k = ω_k / (Δ_k² + ξ)", "Δ: the total change", "not the length"):
        assert piece in _texts(fig)
    _draw_and_close(fig)


def test_replay_loop_shows_the_split_of_the_batch_and_the_buffer_policy():
    fig = ch04.replay_loop(batch_size=64, replay_ratio=0.25, buffer_size=500)
    text = _texts(fig)
    for piece in ("= 48 samples", "= 16 samples", "B = 64", "M = 500", "M/t", "r = 0.25", "r/(1 + r)"):
        assert piece in text
    assert len(_patches(fig, FancyBboxPatch)) == 6
    assert len(_patches(fig, FancyArrowPatch)) == 6
    _draw_and_close(fig)
