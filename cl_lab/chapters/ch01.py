"""Chapter 01, "Why networks forget": the experiments behind the notebook, as pure functions.

Most of them use the smallest case that forgets: split MNIST in Domain-IL cut to two tasks (0 vs 1,
then 2 vs 3, one shared 2-way head), continuing from one cached task-1 checkpoint.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, data, models, probes, train
from cl_lab.device import seed_everything
from cl_lab.methods.base import Naive
from cl_lab.methods.hygiene import L2, GradClip

HIDDEN = (400, 400)
FIRST_TASK_STEPS = 300


@lru_cache(maxsize=4)
def two_task_stream(scenario: str = "domain") -> data.Stream:
    """Split MNIST cut to its first two tasks (0/1, then 2/3)."""
    return data.split(data.mnist_subset(), 5, scenario).first(2)


@lru_cache(maxsize=16)
def _first_task_state(seed: int, hidden: tuple[int, ...], scenario: str, device: str, first_steps: int) -> dict:
    stream = two_task_stream(scenario)
    seed_everything(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    train.fit(model, stream.first(1), steps=first_steps, seed=seed, device=device, progress=False)
    return copy.deepcopy(model.state_dict())


def first_task_model(seed: int = 0, hidden: tuple[int, ...] = HIDDEN, scenario: str = "domain",
                     device: str = "cpu", first_steps: int = FIRST_TASK_STEPS) -> models.MLP:
    """A fresh copy of the model trained on task 1 only (the training itself is cached)."""
    stream = two_task_stream(scenario)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    model.load_state_dict(_first_task_state(seed, tuple(hidden), scenario, device, first_steps))
    return model.to(device)


def second_task_point(lr: float, steps: int, seed: int = 0, hidden: tuple[int, ...] = HIDDEN,
                      scenario: str = "domain", device: str = "cpu", first_steps: int = FIRST_TASK_STEPS) -> dict:
    """Train the task-1 model on task 2 with ``lr`` and ``steps``; report what task 1 kept.

    Returns old (task-1 accuracy after), old_before, new (task-2 accuracy) and drift ‖θ − θ*‖₂.
    """
    _validate.positive("lr", lr)
    _validate.positive_int("steps", steps)
    stream = two_task_stream(scenario)
    model = first_task_model(seed, hidden, scenario, device, first_steps)
    theta_star = models.flat_params(model)
    old_before = train.accuracy(model, stream, 0, stream.tasks[0].x_test.to(device),
                                stream.tasks[0].y_test.to(device))
    run = train.fit(model, stream.only(1), steps=steps, lr=lr, seed=seed, device=device, progress=False)
    drift = (models.flat_params(model) - theta_star).norm().item()
    return {"lr": lr, "steps": steps, "old_before": old_before, "old": float(run.R[0, 0]),
            "new": float(run.R[0, 1]), "drift": drift, "seconds": run.seconds}


def lr_steps_grid(lrs, steps_list, seed: int = 0, **kwargs) -> pd.DataFrame:
    """``second_task_point`` over a grid of learning rates and step counts, one row per point."""
    return pd.DataFrame([second_task_point(lr, steps, seed, **kwargs) for lr in lrs for steps in steps_list])


def hygiene_table(seed: int = 0, steps: int = 300, device: str = "cpu", first_steps: int = FIRST_TASK_STEPS,
                  hidden: tuple[int, ...] = HIDDEN) -> pd.DataFrame:
    """Task 2 from the task-1 model (Adam, lr 1e-3) with weight decay, L2 towards θ* and gradient clipping.

    One row per setting: method, strength (λ or max norm), old (task-1 accuracy after) and new (task 2).
    """
    settings = [("naive", None, Naive()), ("weight decay", 1e-2, L2(1e-2)), ("weight decay", 1e-1, L2(1e-1)),
                ("L2 to θ*", 1e-2, L2(1e-2, "anchor")), ("L2 to θ*", 1e-1, L2(1e-1, "anchor")),
                ("gradient clipping", 0.1, GradClip(0.1))]
    stream = two_task_stream("domain")
    rows = []
    for name, strength, method in settings:
        model = first_task_model(seed, hidden, "domain", device, first_steps)
        run = train.fit(model, stream.only(1), method, steps=steps, seed=seed, device=device, progress=False)
        rows.append({"method": name, "strength": strength, "old": float(run.R[0, 0]), "new": float(run.R[0, 1])})
    return pd.DataFrame(rows)


def interference(seed: int = 0, steps: int = 300, scenario: str = "domain", every: int = 5,
                 device: str = "cpu", first_steps: int = FIRST_TASK_STEPS) -> tuple[train.Run, pd.DataFrame]:
    """Continue from the task-1 model on task 2 while probing gradients and weights.

    Returns the run (continual evaluation every ``every`` steps) and one row per probe point: step,
    cosine between the task-2 batch gradient and the full task-1 gradient (on all of task 1's training
    images), drift, task-1 accuracy.
    """
    stream = two_task_stream(scenario)
    model = first_task_model(seed, HIDDEN, scenario, device, first_steps)
    cosine = probes.GradientInterference(old_task=0, every=every, n_samples=len(stream.tasks[0].y_train), seed=seed)
    drift = probes.WeightDrift.around(model, every=every)
    run = train.fit(model, stream.only(1), [cosine, drift], steps=steps, seed=seed, eval_every=every,
                    device=device, progress=False)
    old_acc = run.curves[run.curves.task == 0].set_index("step").accuracy
    table = pd.DataFrame(drift.records, columns=["step", "train_task", "drift"]).drop(columns="train_task")
    table["old_acc"] = table.step.map(old_acc)
    cos = pd.DataFrame(cosine.records, columns=["step", "train_task", "cosine"]).set_index("step").cosine
    table["cosine"] = table.step.map(cos)
    return run, table


def class_il_prediction_share(model, stream: data.Stream, device: str = "cpu") -> np.ndarray:
    """Share of all test predictions that fall in each task's classes (Class-IL) [T]."""
    x = torch.cat([t.x_test for t in stream.eval_tasks]).to(device)
    with torch.no_grad():
        pred = model(x).argmax(1).cpu()
    return np.array([np.isin(pred.numpy(), task.classes).mean() for task in stream.eval_tasks])


def plot_second_task_point(result: dict):
    """The playground's figure: task-1 accuracy before and after, task-2 accuracy, and the drift."""
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["task 1 before", "task 1 after", "task 2"]
    values = [result["old_before"], result["old"], result["new"]]
    ax.bar(labels, values, color=["tab:grey", "tab:red", "tab:green"])
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"lr={result['lr']:.1e}, steps={result['steps']}: drift ‖θ−θ*‖ = {result['drift']:.2f}")
    fig.tight_layout()
    return fig


def _with_layers(model: torch.nn.Module, source: dict[str, torch.Tensor], layer: str) -> torch.nn.Module:
    """A copy of ``model`` whose parameters of ``layer`` (e.g. ``features.0``) are taken from state ``source``."""
    patched = copy.deepcopy(model)
    state = patched.state_dict()
    for name in state:
        if name.startswith(layer + "."):
            state[name].copy_(source[name])
    return patched


def layer_report(seed: int = 0, steps: int = 300, lr: float = 1e-3, hidden: tuple[int, ...] = HIDDEN,
                 scenario: str = "domain", device: str = "cpu", first_steps: int = FIRST_TASK_STEPS) -> pd.DataFrame:
    """Where does task 1 go? Train the task-1 model on task 2, then per Linear layer: the relative weight change
    ‖ΔW‖/‖W*‖, the linear CKA between its outputs on task-1 test images before and after, task-1 accuracy with
    only that layer put back to θ* ("restore"), and with only that layer's change applied to θ* ("change only").
    ``attrs`` hold task-1 accuracy before and after."""
    stream = two_task_stream(scenario)
    before = first_task_model(seed, hidden, scenario, device, first_steps)
    after = copy.deepcopy(before)
    train.fit(after, stream.only(1), steps=steps, lr=lr, seed=seed, device=device, progress=False)
    x, y = stream.tasks[0].x_test.to(device), stream.tasks[0].y_test.to(device)

    def task1(model) -> float:
        return train.accuracy(model, stream, 0, x, y)

    old_state, new_state = before.state_dict(), after.state_dict()
    old_out, new_out = probes.layer_outputs(before, x), probes.layer_outputs(after, x)
    rows = []
    for layer in old_out:
        names = [n for n in old_state if n.startswith(layer + ".")]
        change = sum(((new_state[n] - old_state[n]) ** 2).sum() for n in names) ** 0.5
        size = sum((old_state[n] ** 2).sum() for n in names) ** 0.5
        rows.append({"layer": layer, "relative weight change": (change / size).item(),
                     "CKA before/after": probes.linear_cka(old_out[layer].cpu(), new_out[layer].cpu()),
                     "task 1, this layer restored": task1(_with_layers(after, old_state, layer)),
                     "task 1, only this layer changed": task1(_with_layers(before, new_state, layer))})
    table = pd.DataFrame(rows).set_index("layer")
    table.attrs = {"task 1 before": task1(before), "task 1 after": task1(after)}
    return table
