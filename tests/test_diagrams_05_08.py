"""Chapters 05–08's diagrams: each figure draws the structure it names (GEM's cases and A-GEM's half-plane, ProgNN's
columns and laterals, PackNet's masks, the Class-IL head before and after Weight Aligning, the stability gap's
timeline), with its labels, and closes cleanly."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Polygon, Rectangle  # noqa: E402

from cl_lab.diagrams import ch05, ch06, ch07, ch08  # noqa: E402
from cl_lab.methods.projection import gem_project  # noqa: E402


def _texts(fig: Figure) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def _count(fig: Figure, kind: type) -> int:
    return sum(isinstance(p, kind) for p in fig.axes[0].patches)


def _draw_and_close(fig: Figure) -> None:
    fig.canvas.draw()
    plt.close(fig)
    assert not plt.fignum_exists(fig.number)


def test_projection_cases_draws_four_regions_and_the_vectors_of_each_case():
    fig = ch05.projection_cases()
    text = _texts(fig)
    for piece in ("no conflict", "one constraint active", "both active", "A-GEM: one half-plane", "g̃ = 0", "g_ref"):
        assert piece in text
    assert _count(fig, Polygon) == 4  # one shaded feasible region per panel
    # g₁, g₂, g in every panel; g̃ where it moved and is not 0 (cases 2 and 4); g_ref in A-GEM's
    assert _count(fig, FancyArrowPatch) == 4 * 3 + 2 + 1
    dotted = [line for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert len(dotted) == 3  # the projection of g in every case where it moves
    _draw_and_close(fig)


def test_projection_cases_are_the_cases_they_claim():
    for (_, g, G, _), active in zip(ch05.CASES[:3], (0, 1, 2), strict=True):
        g = torch.tensor(g, dtype=torch.float64)
        g_tilde = gem_project(g, G, margin=0.0, eps=0.0)
        assert int((G @ g < 0).sum()) == active  # constraints g violates
        assert int(((G @ g_tilde).abs() < 1e-9).sum()) == active  # … and the edges g̃ ends up on
    _, g, G, _ = ch05.CASES[3]
    g = torch.tensor(g, dtype=torch.float64)
    ref = G.mean(0)
    g_tilde = g - (g @ ref) / (ref @ ref) * ref
    assert float(G[0] @ g_tilde) < 0  # the conflict A-GEM leaves, which the panel's note states


@pytest.mark.parametrize("n_columns, n_layers", [(3, 2), (2, 3)])
def test_prognn_columns_has_a_box_per_layer_and_a_lateral_per_earlier_column(n_columns, n_layers):
    fig = ch06.prognn_columns(n_columns, n_layers)
    arrows = [p for p in fig.axes[0].patches if isinstance(p, FancyArrowPatch)]
    laterals = [a for a in arrows if a.get_linestyle() == "--"]
    pairs = n_columns * (n_columns - 1) // 2
    assert len(laterals) == n_layers * pairs  # into every layer above the first, and into the head
    assert len(arrows) - len(laterals) == n_columns * (n_layers + 1)  # x → h¹ → … → head in every column
    boxes = len(fig.axes[0].patches) - len(arrows)
    assert boxes == n_columns * (n_layers + 1) + 1  # the layers, the heads, and the shared input
    text = _texts(fig)
    assert f"task {n_columns}\n(training)" in text and "task 1\n(frozen)" in text and "T(T−1)/2" in text
    _draw_and_close(fig)


def test_packnet_owners_follow_the_prune_ratio_and_never_overlap():
    owner = ch06.packnet_owners(n_tasks=3, prune_ratio=0.5, size=8)
    assert [int((owner == k).sum()) for k in (0, 1, 2, -1)] == [32, 16, 8, 8]


def test_packnet_masks_draws_one_grid_per_task_with_the_counts():
    fig = ch06.packnet_masks(n_tasks=3, prune_ratio=0.5, size=8)
    cells = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(cells) == 3 * 64
    faces = [tuple(np.round(c.get_facecolor(), 3)) for c in cells]
    white = (1.0, 1.0, 1.0, 1.0)
    assert [sum(f != white for f in faces[k * 64:(k + 1) * 64]) for k in range(3)] == [32, 48, 56]  # M_j grows
    text = _texts(fig)
    assert "own 32, reused frozen 0" in text and "own 8, reused frozen 48" in text and "8 after 3 tasks" in text
    _draw_and_close(fig)


def test_classil_head_shows_every_row_before_and_after_weight_aligning():
    fig = ch07.classil_head(n_old=8, n_new=2)
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(bars) == 2 * 10
    before, after = [b.get_width() for b in bars[:10]], [b.get_width() for b in bars[10:]]
    assert before[:8] == after[:8]  # the old rows are not touched
    assert np.mean(after[8:]) == pytest.approx(np.mean(after[:8]))  # WA equalises the mean norms
    assert np.mean(before[8:]) > np.mean(before[:8])
    text = _texts(fig)
    for piece in ("WA: × γ = 0.71", "on rows 8–9 only", "mean‖w_old‖ / mean‖w_new‖", "softmax"):
        assert piece in text
    _draw_and_close(fig)


def test_stability_gap_timeline_marks_the_task_ends_the_dip_and_min_acc():
    fig = ch08.stability_gap_timeline(n_tasks=3, steps=100)
    ax = fig.axes[0]
    curve, ends = ax.lines[0], next(line for line in ax.lines if line.get_marker() == "o")
    assert len(curve.get_xdata()) == 301
    assert list(ends.get_xdata()) == [100, 200, 300]
    switches = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(switches) == 2
    n, acc = ch08.gap_curve(3, 100)
    min_acc = acc[n > 100].min()
    assert min_acc < acc[[200, 300]].min() - 0.2  # the dip sits well below every later task end
    marker = next(line for line in ax.lines if line.get_marker() == "v")
    assert marker.get_ydata()[0] == pytest.approx(min_acc)
    text = _texts(fig) + " ".join(t.get_text() for t in ax.get_legend().get_texts())
    for piece in ("Min-ACC₁ = min over n > t₁", "task ends: what R sees", "hidden dip", "switch to task 3"):
        assert piece in text
    _draw_and_close(fig)
