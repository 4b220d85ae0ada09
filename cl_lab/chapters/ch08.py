"""Chapter 08 helpers (the stability gap, De Lange, van de Ven & Tuytelaars 2023, arXiv 2205.13452): continual
evaluation runs, Min-ACC / WC-ACC next to end-of-task numbers, worst-case forgetting, and the widget."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cl_lab import _validate, data, metrics, models, timing, train
from cl_lab.data.datasets import Dataset
from cl_lab.data.streams import Stream
from cl_lab.device import seed_everything
from cl_lab.methods.base import Method, Naive
from cl_lab.methods.projection import AGEM
from cl_lab.methods.regularization import EWC
from cl_lab.methods.replay import ER

METHODS = ("naive", "er", "ewc", "agem")


def make_method(method: str, *, buffer_size: int = 500, replay_ratio: float = 0.5, ewc_lam: float = 1.0,
                memory_per_task: int = 100, seed: int = 0) -> Method:
    """A fresh method by name: naive fine-tuning, ER (reservoir), EWC (exact Fisher) or A-GEM."""
    _validate.one_of("method", method, METHODS)
    if method == "er":
        return ER(buffer_size, "reservoir", replay_ratio, seed)
    if method == "ewc":
        return EWC(lam=ewc_lam, fisher="exact", seed=seed)
    if method == "agem":
        return AGEM(memory_per_task=memory_per_task, ref_batch=128, seed=seed)
    return Naive()


def subsample_curves(curves: pd.DataFrame, eval_every: int) -> pd.DataFrame:
    """The evaluations an ``eval_every``-step schedule would have made, from an every-step curve (exact:
    evaluating never changes training). The final evaluation is always kept."""
    _validate.positive_int("eval_every", eval_every)
    last = curves.step.max()
    return curves[(curves.step % eval_every == 0) | (curves.step == last)]


def gap_metrics(run: train.Run, eval_every: int = 1) -> pd.DataFrame:
    """Per old task j: accuracy at the end of its task, the lowest accuracy seen at later task ends, Min-ACC
    from continual evaluation every ``eval_every`` steps, the final accuracy, and two forgetting views:
    end-of-task (R[j, j] − min of later task ends) and worst case during training (R[j, j] − Min-ACC)."""
    curves = subsample_curves(run.curves, eval_every)
    rows = []
    for j in range(len(run.R) - 1):
        after = curves[(curves.task == j) & (curves.step > run.boundaries[j + 1])]
        min_acc = metrics.min_acc(after.accuracy.to_numpy())
        seen_at_ends = run.R[j + 1:, j].min()
        rows.append({"task": j, "end of its task": run.R[j, j], "lowest at later task ends": seen_at_ends,
                     "Min-ACC": min_acc, "final": run.R[-1, j], "hidden dip": seen_at_ends - min_acc,
                     "forgetting (end-of-task view)": run.R[j, j] - seen_at_ends,
                     "forgetting (worst case)": run.R[j, j] - min_acc})
    return pd.DataFrame(rows)


def summary(run: train.Run, eval_every: int = 1) -> dict:
    """AA, WC-ACC from continual evaluation, and the WC-ACC that end-of-task evaluation would report."""
    table = gap_metrics(run, eval_every)
    last = run.R[-1, -1]
    return {"AA": run.aa, "WC-ACC": metrics.wc_acc(last, table["Min-ACC"]),
            "WC-ACC from task ends": metrics.wc_acc(last, table["lowest at later task ends"]),
            "mean hidden dip": table["hidden dip"].mean()}


def plot_switch(runs: dict[str, train.Run], task: int = 0, window: tuple[int, int] = (-20, 100), ax=None):
    """Accuracy on ``task`` around the switch to the next task, one line per run; dots at task ends."""
    ax = ax if ax is not None else plt.subplots(figsize=(6, 3.4))[1]
    for name, run in runs.items():
        switch = run.boundaries[task + 1]
        part = run.curves[(run.curves.task == task) & (run.curves.step.between(switch + window[0], switch + window[1]))]
        ax.plot(part.step - switch, part.accuracy, label=name, lw=1.2)
    ax.axvline(0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"steps since the switch to task {task + 2}")
    ax.set_ylabel(f"accuracy on task {task + 1}")
    ax.set_title("every-iteration evaluation around a task switch", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def plot_worst_case(tables: dict[str, pd.DataFrame], ax=None):
    """Mean forgetting of old tasks: the end-of-task view against the worst case during training."""
    ax = ax if ax is not None else plt.subplots(figsize=(5.5, 3.4))[1]
    names = list(tables)
    pos = np.arange(len(names))
    end_view = [tables[n]["forgetting (end-of-task view)"].mean() for n in names]
    worst = [tables[n]["forgetting (worst case)"].mean() for n in names]
    ax.bar(pos - 0.2, end_view, 0.4, label="seen at task ends")
    ax.bar(pos + 0.2, worst, 0.4, label="worst case during training", color="tab:red")
    ax.set_xticks(pos, names)
    ax.set_ylabel("mean forgetting of old tasks")
    ax.set_title("deployment-safety view: how far did old tasks fall?", fontsize=9)
    ax.legend(fontsize=7)
    return ax


@lru_cache(maxsize=2)
def _split_class_il() -> Stream:
    return data.split_mnist(5, scenario="class")


@lru_cache(maxsize=16)
def _every_step_run(replay_ratio: float, steps: int, buffer_size: int, hidden: tuple[int, ...], seed: int,
                    device: str | torch.device):
    stream = _split_class_il()
    seed_everything(seed)  # the model's initial weights depend on the seed only
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    method = make_method("er", buffer_size=buffer_size, replay_ratio=replay_ratio, seed=seed)
    return train.fit(model, stream, method, steps=steps, lr=0.1, optimizer="sgd", eval_every=1, seed=seed,
                     device=device, progress=False)


def gap_point(eval_every: int, replay_ratio: float, steps: int = 50, buffer_size: int = 500,
              hidden: Sequence[int] = (100, 100), seed: int = 0, device: str | torch.device = "auto") -> dict:
    """ER on split MNIST (Class-IL, SGD lr 0.1) evaluated every ``eval_every`` steps: what that schedule
    sees (its curve, Min-ACC, WC-ACC) against every-step evaluation. One training run per replay ratio."""
    _validate.positive_int("eval_every", eval_every)
    _validate.in_range("replay_ratio", replay_ratio, 0.0, 1.0)
    run = _every_step_run(float(replay_ratio), steps, buffer_size, tuple(hidden), seed, device)
    return {"eval_every": eval_every, "replay_ratio": replay_ratio, "run": run,
            "curves": subsample_curves(run.curves, eval_every), "seen": summary(run, eval_every),
            "truth": summary(run, 1)}


def plot_gap_point(result: dict):
    fig, ax = plt.subplots(figsize=(7, 3.4))
    run, curves = result["run"], result["curves"]
    for task, part in curves.groupby("task"):
        ax.plot(part.step, part.accuracy, lw=1, label=f"task {task + 1}")
    for b in run.boundaries[1:]:
        ax.axvline(b, color="grey", ls="--", lw=0.8)
    seen, truth = result["seen"], result["truth"]
    ax.set_title(f"ER, replay ratio {result['replay_ratio']:.2f}, evaluated every {result['eval_every']} steps: "
                 f"WC-ACC {seen['WC-ACC']:.3f} (every step: {truth['WC-ACC']:.3f}), AA {truth['AA']:.3f}",
                 fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def null_stream(dataset: Dataset | str, n_tasks: int, test_samples: int | None = None, seed: int = 0) -> Stream:
    """The null control: ``n_tasks`` identical tasks (the images rotated by 0°, Domain-IL, one shared head).

    Nothing changes at a switch, so a "hidden dip" measured on this stream is evaluation jitter plus the
    minimum over many evaluations; a dip on a real stream counts only beyond it. ``test_samples`` replaces each
    task's test set by a seeded random draw of that size, to match the test-set size of the stream it controls.
    """
    _validate.positive_int("n_tasks", n_tasks)
    stream = data.rotated(dataset, (0.0,) * n_tasks, scenario="domain", seed=seed)
    if test_samples is not None:
        _validate.positive_int("test_samples", test_samples)
        for j, task in enumerate(stream.tasks):
            x, y, _ = task.sample(test_samples, seed + j, split="test")
            stream.tasks[j] = dataclasses.replace(task, x_test=x, y_test=y)
        stream.eval_tasks = list(stream.tasks)
    return stream


def evaluation_overhead(stream: Stream, hidden: Sequence[int] = (100, 100), batch_size: int = 128,
                        eval_samples: int = 1000, repeats: int = 30, lr: float = 0.1, seed: int = 0) -> dict:
    """Seconds of one SGD training step and of one continual evaluation of every task (no_grad, batched).

    The two are timed interleaved, ``repeats`` rounds, and each keeps its fastest time
    (``cl_lab.timing.best_times``): load from other processes only adds time, and both sides see the same
    bursts of it. The batch and each task's evaluation set are seeded random draws. Both run on the CPU on purpose,
    whatever device the chapter trains on: there their seconds follow their arithmetic (about three forward passes
    per training sample), which is what the ratio is compared with.
    """
    _validate.positive_int("repeats", repeats)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y, _ = stream.tasks[0].sample(batch_size, seed)
    sets = [t.sample(eval_samples, seed + j, split="test")[:2] for j, t in enumerate(stream.eval_tasks)]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def evaluate() -> None:
        for j, (xe, ye) in enumerate(sets):
            train.accuracy(model, stream, j, xe, ye)

    timings = timing.best_times({"train step": step, "evaluation": evaluate}, repeats=repeats)
    return {**timings, "evaluated images": sum(len(s[1]) for s in sets),
            "ratio": timings["evaluation"] / timings["train step"]}
