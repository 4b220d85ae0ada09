"""Chapter 08 exercises: Min-ACC and WC-ACC from every-iteration accuracy curves (De Lange et al. 2023).

The curves are arrays ``acc`` [T, N + 1]: ``acc[j, n]`` is the accuracy on task j after n updates, and task j's
last update is step ``t_end[j]``. The checkers build a ``train.Run`` from the same curves and compare with its
``min_acc`` and ``wc_acc``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from cl_lab import train
from cl_lab.exercises._core import Exercise, expect, register


def _as_run(acc: np.ndarray, t_end: list[int]) -> train.Run:
    """A ``train.Run`` holding the curves ``acc`` [T, N + 1] of a stream whose task j ends at step t_end[j]."""
    T, n_evals = acc.shape
    steps = np.arange(n_evals)
    starts = [0, *t_end[:-1]]
    train_task = np.searchsorted(np.asarray(t_end), steps, side="left").clip(max=T - 1)  # the task being trained
    curves = pd.DataFrame({"step": np.repeat(steps, T), "train_task": np.repeat(train_task, T),
                           "task": np.tile(np.arange(T), n_evals), "accuracy": acc.T.reshape(-1)})
    R = np.array([[acc[j, t_end[i]] for j in range(T)] for i in range(T)])  # R[i, j]: on task j after task i
    return train.Run(R=R, b=np.zeros(T), curves=curves, losses=pd.DataFrame(), boundaries=starts, seconds=0.0)


def _curves(seed: int, T: int = 4, steps_per_task: int = 12) -> tuple[np.ndarray, list[int]]:
    """Accuracy curves [T, N + 1] with a stability gap: task j climbs to 0.9 while it is trained, falls right after
    every later switch and recovers towards a slowly sinking level, plus evaluation jitter. Returns (acc, t_end)."""
    rng = np.random.default_rng(seed)
    t_end = [steps_per_task * (j + 1) for j in range(T)]
    steps = np.arange(t_end[-1] + 1)
    acc = np.zeros((T, len(steps)))
    for j, end in enumerate(t_end):
        start = end - steps_per_task
        learning = 0.9 * (steps - start).clip(0, steps_per_task) / steps_per_task
        since_switch = (steps - end) % steps_per_task  # 0 at every task end
        dip = np.where(since_switch > 0, 0.5 * np.exp(-since_switch / 3), 0.0)
        later = 0.8 - 0.05 * ((steps - end) // steps_per_task) - dip
        acc[j] = np.where(steps <= end, learning, later) + rng.uniform(-0.02, 0.02, len(steps))
    return acc.clip(0, 1), t_end


# --- Exercise 8.1 · Min-ACC -----------------------------------------------------------------------------------------

def _min_acc_stub(acc: np.ndarray, t_end: list[int]) -> list[float]:
    """acc: [T, N + 1] accuracy of task j after n updates; t_end: [T] the step of each task's last update.
    Returns [T − 1] Min-ACC_j = min over n > t_end[j] of acc[j, n], for every task but the last."""
    raise NotImplementedError


def _min_acc_solution(acc: np.ndarray, t_end: list[int]) -> list[float]:
    """acc: [T, N + 1] accuracy of task j after n updates; t_end: [T] the step of each task's last update.
    Returns [T − 1] Min-ACC_j = min over n > t_end[j] of acc[j, n], for every task but the last."""
    # strictly after t_j: the evaluation at t_j is the end-of-task model, before the next task's first update
    return [float(acc[j, t_end[j] + 1:].min()) for j in range(len(t_end) - 1)]


def _min_acc_including_t_end(acc, t_end):
    acc = np.asarray(acc)
    return [float(acc[j, t_end[j]:].min()) for j in range(len(t_end) - 1)]


def _min_acc_whole_curve(acc, t_end):
    acc = np.asarray(acc)
    return [float(acc[j].min()) for j in range(len(t_end) - 1)]


def _min_acc_task_ends_only(acc, t_end):
    acc = np.asarray(acc)
    return [float(min(acc[j, t] for t in t_end[j + 1:])) for j in range(len(t_end) - 1)]


def _min_acc_properties(fn: Callable) -> None:
    def min_accs(acc: np.ndarray, t_end: list[int]) -> np.ndarray:
        got = np.asarray(fn(acc.copy(), list(t_end)), dtype=float)
        expect(got.shape == (len(t_end) - 1,), "returns one Min-ACC per task but the last", (len(t_end) - 1,),
               got.shape)
        return got

    # hand-made, T = 3, t_end = (2, 4, 6): task 1 learns (0 → 0.9), dips to 0.4 after the switch, then 0.85 and 0.8
    # at the later task ends
    acc = np.array([[0.0, 0.5, 0.9, 0.4, 0.85, 0.6, 0.8], [0.0, 0.0, 0.0, 0.5, 0.9, 0.7, 0.75], [0.0] * 5 + [0.5, 0.9]])
    got = min_accs(acc, [2, 4, 6])
    expect(got[0] > 0.2, "ignores the evaluations before the task was learnt (hand-made curve: task 1 starts at 0, "
           "its Min-ACC is 0.4)", 0.4, got[0])
    expect(np.isclose(got[0], 0.4), "sees the dip between task ends, not only the later task ends (hand-made curve: "
           "0.4, where the task ends show 0.85 and 0.8)", 0.4, got[0])
    # the end-of-task evaluation n = t_j is the lowest point of this curve: it must not count
    got = min_accs(np.array([[0.0, 0.5, 0.3, 0.6, 0.55, 0.7], [0.1, 0.1, 0.1, 0.4, 0.8, 0.9]]), [2, 5])
    expect(np.isclose(got[0], 0.55), "excludes n = t_j itself, the end-of-task model (hand-made curve: 0.55, not 0.3)",
           0.55, got[0])
    for seed in (0, 1):
        acc, t_end = _curves(seed)
        got = min_accs(acc, t_end)
        run = _as_run(acc, t_end)
        expected = [run.min_acc(j) for j in range(len(t_end) - 1)]
        expect(np.allclose(got, expected, atol=1e-12), f"equals Run.min_acc on a 4-task curve (seed {seed})",
               np.round(expected, 4).tolist(), got.round(4).tolist())


check_min_acc = register(Exercise(
    name="min_acc", chapter="08", title="Min-ACC from the curves", difficulty=1, minutes=10,
    stub=_min_acc_stub, solution=_min_acc_solution, properties=_min_acc_properties,
    wrong_answers={"includes n = t_j": _min_acc_including_t_end,
                   "minimum over the whole curve": _min_acc_whole_curve,
                   "later task ends only (what R sees)": _min_acc_task_ends_only},
))


# --- Exercise 8.2 · WC-ACC ------------------------------------------------------------------------------------------

def _wc_acc_stub(acc: np.ndarray, t_end: list[int], k: int) -> float:
    """acc: [T, N + 1]; t_end: [T]; k: a task index (0-based). Returns WC-ACC after training task k: task k's
    accuracy at t_end[k] weighted 1/(k + 1), and the mean Min-ACC of tasks 0..k − 1 over t_end[j] < n ≤ t_end[k]
    weighted k/(k + 1)."""
    raise NotImplementedError


def _wc_acc_solution(acc: np.ndarray, t_end: list[int], k: int) -> float:
    """acc: [T, N + 1]; t_end: [T]; k: a task index (0-based). Returns WC-ACC after training task k: task k's
    accuracy at t_end[k] weighted 1/(k + 1), and the mean Min-ACC of tasks 0..k − 1 over t_end[j] < n ≤ t_end[k]
    weighted k/(k + 1)."""
    newest = acc[k, t_end[k]]  # a_k(t_k): the newest task at its own end
    if k == 0:
        return float(newest)
    mins = [acc[j, t_end[j] + 1: t_end[k] + 1].min() for j in range(k)]  # only what happened up to t_k
    return float(newest / (k + 1) + (1 - 1 / (k + 1)) * sum(mins) / k)


def _wc_acc_whole_run(acc, t_end, k):
    acc = np.asarray(acc)
    if k == 0:
        return float(acc[0, t_end[0]])
    mins = [acc[j, t_end[j] + 1:].min() for j in range(k)]
    return float(acc[k, t_end[k]] / (k + 1) + (1 - 1 / (k + 1)) * np.mean(mins))


def _wc_acc_newest_at_the_end(acc, t_end, k):
    acc = np.asarray(acc)
    if k == 0:
        return float(acc[0, -1])
    mins = [acc[j, t_end[j] + 1: t_end[k] + 1].min() for j in range(k)]
    return float(acc[k, -1] / (k + 1) + (1 - 1 / (k + 1)) * np.mean(mins))


def _wc_acc_half_and_half(acc, t_end, k):
    acc = np.asarray(acc)
    if k == 0:
        return float(acc[0, t_end[0]])
    mins = [acc[j, t_end[j] + 1: t_end[k] + 1].min() for j in range(k)]
    return float(0.5 * acc[k, t_end[k]] + 0.5 * np.mean(mins))


def _wc_acc_properties(fn: Callable) -> None:
    acc, t_end = _curves(0)
    T = len(t_end)
    got = float(fn(acc.copy(), list(t_end), 0))
    expect(np.isclose(got, acc[0, t_end[0]]), "after the first task WC-ACC is that task's accuracy at its end",
           round(float(acc[0, t_end[0]]), 4), round(got, 4))
    flat = np.repeat(np.linspace(0.6, 0.9, T)[:, None], acc.shape[1], axis=1)  # no dip, nothing forgotten
    got = float(fn(flat, list(t_end), T - 1))
    expect(np.isclose(got, flat[:, -1].mean()), "with flat curves (no dip) WC-ACC equals the average accuracy",
           round(float(flat[:, -1].mean()), 4), round(got, 4))
    run = _as_run(acc, t_end)
    for k in range(1, T):
        got = float(fn(acc.copy(), list(t_end), k))
        average = float(acc[: k + 1, t_end[k]].mean())
        expect(got <= average + 1e-12, f"WC-ACC after task {k + 1} is at most the average accuracy then",
               f"≤ {average:.4f}", round(got, 4))
        expected = run.wc_acc(k)
        expect(np.isclose(got, expected, atol=1e-12), f"after task {k + 1} equals Run.wc_acc (only evaluations up "
               "to t_k count)", round(expected, 4), round(got, 4))


check_wc_acc = register(Exercise(
    name="wc_acc", chapter="08", title="WC-ACC after task k", difficulty=2, minutes=15,
    stub=_wc_acc_stub, solution=_wc_acc_solution, properties=_wc_acc_properties,
    wrong_answers={"Min-ACC over the whole run, not up to t_k": _wc_acc_whole_run,
                   "the newest task at the end of the run": _wc_acc_newest_at_the_end,
                   "weights ½ and ½": _wc_acc_half_and_half},
))
