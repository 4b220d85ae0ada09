"""Continual-learning metrics, each defined once by its paper's formula.

``R`` is the accuracy matrix: ``R[i, j]`` is the accuracy on task j after training task i (T×T; tasks
counted from 0 here, from 1 in the papers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty 2-D matrix, got shape {R.shape}")
    return R


def _square(R) -> np.ndarray:
    R = _matrix(R)
    if R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be square (T×T: after task i, on task j), got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    """AA = (1/T) Σ_j R[T, j]: mean accuracy over all tasks after the last one (Lopez-Paz & Ranzato 2017)."""
    return float(_matrix(R)[-1].mean())


def backward_transfer(R) -> float:
    """BWT = 1/(T−1) Σ_{j<T} (R[T, j] − R[j, j]) (Lopez-Paz & Ranzato 2017, eq. 3). Negative = forgetting."""
    R = _square(R)
    T = len(R)
    if T < 2:
        raise ValueError("R must cover at least 2 tasks for backward transfer, got 1")
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float:
    """FWT = 1/(T−1) Σ_{j≥2} (R[j−1, j] − b_j), b_j a freshly initialised model's accuracy (eq. 4)."""
    R = _square(R)
    b = np.asarray(b, dtype=float)
    T = len(R)
    if b.shape != (T,):
        raise ValueError(f"b must hold one baseline accuracy per task ({T}), got shape {b.shape}")
    if T < 2:
        raise ValueError("R must cover at least 2 tasks for forward transfer, got 1")
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk, eq. 8), after the last task T:

        f_j = max_{l < T} R[l, j] − R[T, j],      F = 1/(T−1) Σ_{j<T} f_j

    The max runs over every earlier row l < T, including rows before task j was trained (l < j), and the
    average over every task but the last. Another common reading replaces the max with the accuracy when
    the task was learnt, R[j, j] − R[T, j] (Avalanche's ``forgetting`` metric); it is −BWT, and it is
    smaller whenever a task was better at some later row than at its own.
    """
    R = _square(R)
    T = len(R)
    if T < 2:
        raise ValueError("R must cover at least 2 tasks for forgetting, got 1")
    return float(np.mean([R[:T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def min_acc(accuracies_after_learning: Sequence[float]) -> float:
    """Min-ACC of one task (De Lange et al. 2023): min_{n > t_j} a_j(n), its lowest accuracy at any evaluation
    strictly after the last iteration t_j of its own task (the caller selects those evaluations)."""
    acc = np.asarray(accuracies_after_learning, dtype=float)
    if acc.ndim != 1 or acc.size == 0:
        raise ValueError("accuracies_after_learning must be a non-empty 1-D sequence, "
                         f"got shape {acc.shape}")
    return float(acc.min())


def wc_acc(current_accuracy: float, previous_min_accs: Sequence[float]) -> float:
    """WC-ACC_k = (1/k)·a_k + (1 − 1/k)·mean of the k−1 earlier tasks' Min-ACC (De Lange et al. 2023)."""
    mins = np.asarray(previous_min_accs, dtype=float)
    k = mins.size + 1
    if k == 1:
        return float(current_accuracy)
    return float(current_accuracy / k + (1 - 1 / k) * mins.mean())
