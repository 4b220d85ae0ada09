"""Class-IL head-bias remedies: NME is the nearest class mean, WA equalises norms, ER-ACE masks, BiC corrects."""

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.colors import to_rgba
from torch import nn

from cl_lab import data, models, train
from cl_lab.chapters import ch07
from cl_lab.methods.head_bias import (
    ERACE,
    NME,
    REMEDIES,
    BiC,
    WeightAligning,
    align_weights,
    class_means,
    make_remedy,
    nme_scores,
)

matplotlib.use("Agg")


class _Identity(nn.Module):
    """A model whose features are its inputs (so NME works on the raw toy points)."""

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(dim, n_out)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def stream():
    return data.split(data.load("digits"), n_tasks=5, scenario="class", n_train=100)


def test_nme_predicts_the_nearest_class_mean_on_a_toy_set():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -1.0]])
    y_mem = torch.arange(3).repeat_interleave(10)
    x_mem = centres[y_mem] + 0.3 * torch.randn(30, 2)
    method = NME(buffer_size=30)
    method.buffer.add(x_mem, y_mem, torch.zeros(30, dtype=torch.long))
    stream = data.split(data.load("digits"), n_tasks=5, scenario="class", n_train=10)
    stream.n_out = 3  # a 3-class toy head
    x = 5 * torch.randn(200, 2)
    pred = method.logits(_Identity(2, 3), stream, x, torch.zeros(200, dtype=torch.long)).argmax(1)
    phi = nn.functional.normalize(x_mem, dim=1)
    means = nn.functional.normalize(torch.stack([phi[y_mem == c].mean(0) for c in range(3)]), dim=1)
    expected = torch.cdist(nn.functional.normalize(x, dim=1), means).argmin(1)
    assert torch.equal(pred, expected)


def test_nme_ignores_classes_without_exemplars():
    means, present = class_means(torch.randn(4, 3), torch.tensor([0, 0, 2, 2]), 4)
    scores = nme_scores(torch.randn(5, 3), means, present)
    assert not present[1] and not present[3]
    assert set(scores.argmax(1).tolist()) <= {0, 2}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_old=st.integers(1, 8), n_new=st.integers(1, 4))
def test_weight_aligning_equalises_the_mean_norms(seed, n_old, n_new):
    torch.manual_seed(seed)
    head = nn.Linear(6, n_old + n_new)
    with torch.no_grad():
        head.weight[n_old:] *= 5.0  # a head biased towards the new classes
    old, new = list(range(n_old)), list(range(n_old, n_old + n_new))
    gamma = align_weights(head, old, new)
    norms = head.weight.norm(dim=1)
    assert norms[new].mean().item() == pytest.approx(norms[old].mean().item(), rel=1e-5)
    assert gamma < 1


def test_weight_aligning_in_the_loop(stream):
    method = WeightAligning(buffer_size=50)
    model = models.MLP(stream.input_dim, (16,), stream.n_out)
    train.fit(model, stream, method, steps=10, batch_size=32, progress=False)
    norms = model.head.weight.norm(dim=1)
    assert len(method.gammas) == len(stream) - 1
    assert norms[[8, 9]].mean().item() == pytest.approx(norms[:8].mean().item(), rel=1e-5)


def test_er_ace_scores_incoming_samples_only_on_their_classes(stream):
    method = ERACE(buffer_size=50)
    model = models.MLP(stream.input_dim, (16,), stream.n_out)
    train.fit(model, stream, method, steps=5, batch_size=32, progress=False)
    method._n_new = 4
    logits = torch.zeros(6, 10, requires_grad=True)
    y = torch.tensor([2, 3, 2, 3, 0, 1])
    method.task_loss(None, logits, y, torch.zeros(6, dtype=torch.long)).backward()
    grad = logits.grad
    assert torch.all(grad[:4][:, [0, 1, 4, 5, 6, 7, 8, 9]] == 0)  # incoming: absent classes get no gradient
    assert torch.all(grad[4:, 4:] > 0)  # replayed: full softmax pushes every other logit down


def test_bic_fits_a_correction_and_changes_only_the_newest_logits(stream):
    method = BiC(buffer_size=60, val_per_class=5, fit_steps=20)
    model = models.MLP(stream.input_dim, (16,), stream.n_out)
    train.fit(model, stream, method, steps=10, batch_size=32, progress=False)
    assert len(method.history) == len(stream) - 1 and method.corrected == [8, 9]
    x = stream.tasks[0].x_test[:20]
    t = torch.zeros(20, dtype=torch.long)
    raw, corrected = model(x), method.logits(model, stream, x, t)
    assert torch.equal(raw[:, :8], corrected[:, :8])
    assert torch.allclose(corrected[:, 8:], method.alpha * raw[:, 8:] + method.beta)


def test_unknown_remedy_is_rejected():
    with pytest.raises(ValueError, match="remedy"):
        make_remedy("lucir", 100)
    assert set(REMEDIES) == {"er", "nme", "wa", "er-ace", "bic"}


def test_diagnostics_and_widget_point():
    result = ch07.remedy_point("nme", 50, steps=3, hidden=(16,))
    n_test = sum(len(task.y_test) for task in ch07._class_il_stream(5).eval_tasks)
    assert result["confusion"].sum() == n_test
    assert 0 <= result["pred_new_share"] <= 1 and result["norms"].shape == (10,)
    with pytest.raises(ValueError, match="remedy"):
        ch07.remedy_point("unknown", 50)


def test_remedy_figure_shows_the_norms_the_confusion_and_the_numbers():
    result = ch07.remedy_point("er", 50, steps=3, hidden=(16,))
    fig = ch07.plot_remedy_point(result)
    norms_ax, confusion_ax = fig.axes
    bars = norms_ax.patches
    assert [b.get_height() for b in bars] == pytest.approx(result["norms"].tolist())
    red = to_rgba("tab:red")
    assert [c for c, b in enumerate(bars) if b.get_facecolor() == red] == result["new_classes"] == [8, 9]
    assert f"logit old {result['mean_logit_old']:.1f} / new {result['mean_logit_new']:.1f}" in norms_ax.get_title()
    assert f"AA = {result['AA']:.3f}" in fig._suptitle.get_text()
    assert f"acc {result['accuracy']:.2f}" in confusion_ax.get_title()
    shown = confusion_ax.images[0].get_array()  # row-normalised confusion: each true class sums to 1
    assert shown.shape == (10, 10) and np.allclose(shown.sum(1), 1.0)
    expected = result["confusion"] / result["confusion"].sum(1, keepdims=True)
    assert np.allclose(shown, expected)


def test_remedy_widget_moves_headlessly(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch07.remedy_point, ch07.plot_remedy_point, fixed={"steps": 2, "hidden": (8,)},
                           remedy=w.Dropdown(options=list(REMEDIES), value="nme"),
                           buffer_size=w.SelectionSlider(options=[50, 100], value=50))
    widget.children[0].value = "bic"
    assert widget.result["remedy"] == "bic" and widget.result["buffer_size"] == 50
    widget.children[1].value = 100
    assert widget.result["buffer_size"] == 100 and len(widget.cache) == 3


def test_aligned_copy_scales_only_the_copy_and_shrinks_negative_logits_towards_zero(stream):
    model = models.MLP(stream.input_dim, (16,), stream.n_out)
    with torch.no_grad():
        model.head.weight[8:] *= 3.0  # longer new rows
        model.head.bias.fill_(-5.0)  # every logit negative on typical inputs
    before = model.head.weight.detach().clone()
    aligned, gamma = ch07.aligned_copy(model, stream)
    assert torch.equal(model.head.weight, before)  # the original is untouched
    norms = aligned.head.weight.norm(dim=1)
    assert gamma < 1 and norms[8:].mean().item() == pytest.approx(norms[:8].mean().item(), rel=1e-5)
    logits, scaled = ch07.old_input_logits(model, stream), ch07.old_input_logits(aligned, stream)
    assert logits["new logits"] < 0 and scaled["new logits"] == pytest.approx(gamma * logits["new logits"], rel=1e-4)
    assert scaled["new logits"] > logits["new logits"]  # γ < 1 raises a negative logit
    assert scaled["best old logit"] == logits["best old logit"]
