"""Chapter 07 helpers (Class-IL head bias): diagnostics of a trained head, the remedy runner, the widget."""

from __future__ import annotations

import copy
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from cl_lab import data, models, train
from cl_lab.data.streams import Stream
from cl_lab.device import seed_everything
from cl_lab.methods.base import Method, Naive
from cl_lab.methods.head_bias import align_weights, head_rows, make_remedy, seen_classes


@torch.no_grad()
def diagnose(model: nn.Module, stream: Stream, method: Method | None = None) -> dict:
    """Recency-bias diagnostics after the last task of a Class-IL ``stream``.

    norms: ‖w_c‖ of each head row [C]; mean_logit_old/new: mean raw logit over old-class columns and over the
    last task's columns, on every test input; bias_gap: mean head bias of new minus old classes;
    confusion [C, C] (rows: true class, columns: predicted, with ``method``'s prediction); pred_new_share:
    share of test inputs predicted as a last-task class.
    """
    method = method or Naive()
    model.eval()
    x = torch.cat([task.x_test for task in stream.eval_tasks])
    y = torch.cat([task.y_test for task in stream.eval_tasks])
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    t = torch.zeros(len(y), dtype=torch.long, device=device)
    new = list(stream.tasks[-1].classes)
    old = seen_classes(stream, len(stream) - 2)
    raw = model(x)  # [N, C]
    pred = method.logits(model, stream, x, t).argmax(1)  # [N]
    confusion = torch.zeros(stream.n_out, stream.n_out, dtype=torch.long)
    confusion.index_put_((y.cpu(), pred.cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
    head = head_rows(model)
    return {"norms": head.weight.norm(dim=1).cpu().numpy(),
            "bias_gap": (head.bias[new].mean() - head.bias[old].mean()).item(),
            "mean_logit_old": raw[:, old].mean().item(), "mean_logit_new": raw[:, new].mean().item(),
            "confusion": confusion.numpy(), "pred_new_share": torch.isin(pred, torch.tensor(new, device=device))
            .float().mean().item(), "accuracy": (pred == y).float().mean().item(), "new_classes": new}


def aligned_copy(model: nn.Module, stream: Stream) -> tuple[nn.Module, float]:
    """A copy of ``model`` whose head has had Weight Aligning applied for the last task of ``stream``
    (the new rows scaled by γ = mean old norm / mean new norm); the model itself is untouched. Returns (copy, γ)."""
    aligned = copy.deepcopy(model)
    gamma = align_weights(head_rows(aligned), seen_classes(stream, len(stream) - 2), list(stream.tasks[-1].classes))
    return aligned, gamma


@torch.no_grad()
def old_input_logits(model: nn.Module, stream: Stream) -> dict:
    """On the test digits of the old classes (every task but the last): the mean of the best old-class logit and
    the mean of the new classes' logits. Their signs decide what scaling the new rows does."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.cat([task.x_test for task in stream.eval_tasks[:-1]]).to(device)
    raw = model(x)  # [N, C]
    old, new = seen_classes(stream, len(stream) - 2), list(stream.tasks[-1].classes)
    return {"best old logit": raw[:, old].max(1).values.mean().item(), "new logits": raw[:, new].mean().item()}


def plot_diagnostics(diags: dict[str, dict], figsize_per: float = 3.0):
    """One column per run: head-row norms (new classes highlighted) above the confusion matrix."""
    fig, axes = plt.subplots(2, len(diags), figsize=(figsize_per * len(diags), 5.6), squeeze=False)
    for col, (name, d) in enumerate(diags.items()):
        colours = ["tab:red" if c in d["new_classes"] else "tab:blue" for c in range(len(d["norms"]))]
        axes[0, col].bar(range(len(d["norms"])), d["norms"], color=colours)
        axes[0, col].set_title(f"{name}\nlogit old {d['mean_logit_old']:.1f} / new {d['mean_logit_new']:.1f}",
                               fontsize=8)
        axes[0, col].set_xlabel("class (red: last task)", fontsize=7)
        axes[0, col].set_ylabel("‖w_c‖", fontsize=7)
        conf = d["confusion"] / np.maximum(d["confusion"].sum(1, keepdims=True), 1)
        axes[1, col].imshow(conf, vmin=0, vmax=1, cmap="Greys")
        axes[1, col].set_title(f"confusion, acc {d['accuracy']:.2f}", fontsize=8)
        axes[1, col].set_xlabel("predicted", fontsize=7)
        axes[1, col].set_ylabel("true", fontsize=7)
    fig.tight_layout()
    return fig


@lru_cache(maxsize=2)
def _class_il_stream(n_tasks: int) -> Stream:
    return data.split_mnist(n_tasks, scenario="class")


def remedy_point(remedy: str, buffer_size: int, steps: int = 100, hidden: tuple[int, ...] = (100, 100),
                 replay_ratio: float = 0.5, seed: int = 0, device: str | torch.device = "auto") -> dict:
    """Train one remedy on split MNIST Class-IL with a reservoir buffer; AA plus the diagnostics."""
    method = make_remedy(remedy, buffer_size, replay_ratio=replay_ratio, seed=seed)
    stream = _class_il_stream(5)
    seed_everything(seed)  # the model's initial weights depend on the seed only
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    run = train.fit(model, stream, method, steps=steps, seed=seed, device=device, progress=False)
    return {"remedy": remedy, "buffer_size": buffer_size, "AA": run.aa, "R": run.R,
            **diagnose(model, stream, method)}


def plot_remedy_point(result: dict):
    fig = plot_diagnostics({f"{result['remedy']}, buffer {result['buffer_size']}": result}, figsize_per=4.0)
    fig.suptitle(f"AA = {result['AA']:.3f}", fontsize=9)
    return fig
