"""Two-dimensional toy tasks, small enough to draw the decision boundary."""

from __future__ import annotations

import torch

from cl_lab import _validate
from cl_lab.data.streams import Stream, Task

# (centre of class 0, centre of class 1) per task: the second task's rule is flipped and moved right,
# so a boundary that suits task 2 alone misclassifies task 1, while both together are learnable.
TWO_TASK_CENTRES = (((-2.0, -1.0), (-2.0, 1.0)), ((2.0, 1.0), (2.0, -1.0)))


def _blobs(centres, n_per_class: int, spread: float, gen: torch.Generator):
    xs, ys = [], []
    for label, centre in enumerate(centres):
        xs.append(torch.tensor(centre) + spread * torch.randn(n_per_class, 2, generator=gen))
        ys.append(torch.full((n_per_class,), label, dtype=torch.long))
    order = torch.randperm(2 * n_per_class, generator=gen)  # stored shuffled: any prefix holds both classes
    return torch.cat(xs)[order], torch.cat(ys)[order]  # [2n, 2], [2n]


def two_blob_tasks(n_per_class: int = 200, spread: float = 0.5, seed: int = 0) -> Stream:
    """Two binary 2-D tasks sharing one head (Domain-IL)."""
    _validate.positive_int("n_per_class", n_per_class)
    _validate.positive("spread", spread)
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i, centres in enumerate(TWO_TASK_CENTRES):
        x_tr, y_tr = _blobs(centres, n_per_class, spread, gen)
        x_te, y_te = _blobs(centres, n_per_class, spread, gen)
        tasks.append(Task(i, f"task {i + 1}", x_tr, y_tr, x_te, y_te, (0, 1)))
    return Stream("two-blobs", "domain", tasks, 2, (2,))
