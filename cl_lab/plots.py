"""The chapters' recurring figures. Each takes an optional ``ax`` and returns it."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab.data.streams import Stream


def _ax(ax):
    return ax if ax is not None else plt.subplots(figsize=(4.5, 3.6))[1]


def accuracy_matrix(R, ax=None, title: str = "accuracy matrix R", task_names: Sequence[str] | None = None):
    """Heatmap of R: row i = after training task i, column j = accuracy on task j."""
    ax = _ax(ax)
    R = np.asarray(R)
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(R):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                fontsize=8)
    names = list(task_names) if task_names else [str(j + 1) for j in range(R.shape[1])]
    ax.set_xticks(range(R.shape[1]), names)
    ax.set_yticks(range(R.shape[0]), [str(i + 1) for i in range(R.shape[0])])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    return ax


def accuracy_curves(run, ax=None, title: str = "accuracy during training", tasks: Sequence[int] | None = None):
    """Per-task accuracy over training steps, with dashed lines at task boundaries."""
    ax = _ax(ax)
    curves: pd.DataFrame = run.curves
    if curves.empty:
        raise ValueError("run has no continual evaluation: call fit(..., eval_every=N)")
    for task, part in curves.groupby("task"):
        if tasks is None or task in tasks:
            ax.plot(part.step, part.accuracy, label=f"task {task + 1}")
    for boundary in run.boundaries[1:]:
        ax.axvline(boundary, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    return ax


def method_comparison(table: pd.DataFrame, metric: str = "AA", by: str = "method", ax=None,
                      title: str | None = None):
    """Bar chart of ``metric`` per ``by`` (one bar per row, or grouped if ``scenario`` is a column)."""
    ax = _ax(ax)
    if "scenario" in table.columns:
        pivot = table.pivot_table(index=by, columns="scenario", values=metric, sort=False)
        pivot.plot.bar(ax=ax, rot=0)
    else:
        ax.bar(table[by].astype(str), table[metric])
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by {by}")
    return ax


@torch.no_grad()
def decision_boundary(model, stream: Stream, ax=None, title: str = "", resolution: int = 200,
                      limits: tuple[float, float] = (-4.0, 4.0)):
    """For 2-D inputs: the predicted class over a grid, with every task's test points on top."""
    ax = _ax(ax)
    device = next(model.parameters()).device
    axis = torch.linspace(*limits, resolution)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device)  # [res², 2]
    pred = model(grid).argmax(1).reshape(resolution, resolution).cpu()
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=["#c6dbef", "#fdd0a2"], alpha=0.8)
    markers = "os^v"
    for task in stream.eval_tasks:
        x, y = task.x_test, task.y_test
        for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
            pts = x[y == label]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, c=colour, marker=markers[task.id % 4],
                       label=f"{task.name}, class {label}")
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_title(title)
    return ax


def tradeoff(old_acc: Sequence[float], new_acc: Sequence[float], labels: Sequence[str], ax=None,
             title: str = "stability–plasticity trade-off"):
    """Old-task accuracy (stability) against new-task accuracy (plasticity), one labelled point each."""
    ax = _ax(ax)
    ax.plot(new_acc, old_acc, "o-", color="tab:purple")
    for x, y, label in zip(new_acc, old_acc, labels):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("new-task accuracy (plasticity)")
    ax.set_ylabel("old-task accuracy (stability)")
    ax.set_title(title)
    return ax


def strength_sweep(curve: Sequence[dict], point: dict, strength: str, symbol: str, title: str):
    """Old- and new-task accuracy against a penalty strength (log axis, 0 drawn at 1e-3): the reference
    ``curve`` as lines, the slider's ``point`` as large hollow markers. Rows carry ``strength``, old, new."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if curve:
        xs = [max(r[strength], 1e-3) for r in curve]
        ax.semilogx(xs, [r["old"] for r in curve], "o-", color="tab:blue", label="old task (1)")
        ax.semilogx(xs, [r["new"] for r in curve], "s-", color="tab:orange", label="new task (2)")
    x = max(point[strength], 1e-3)
    ax.semilogx([x], [point["old"]], "o", color="tab:blue", ms=14, mfc="none")
    ax.semilogx([x], [point["new"]], "s", color="tab:orange", ms=14, mfc="none")
    ax.set(xlabel=f"{symbol} (0 drawn at 1e-3)", ylabel="accuracy after task 2", ylim=(0, 1.02))
    ax.set_title(f"{title}: {symbol}={point[strength]:g} → old {point['old']:.2f}, new {point['new']:.2f}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig
