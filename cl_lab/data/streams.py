"""Task streams: split, permuted and rotated, each as Task-IL, Domain-IL or Class-IL.

The three scenarios follow van de Ven & Tolias (2019, arXiv 1904.07734):

- ``"task"``: the task id is known at test time. One output per class of the whole stream; a task's
  logits are masked to its own classes (a multi-head network by logit masking).
- ``"domain"``: no task id; every task shares one head of ``classes per task`` outputs.
- ``"class"``: no task id; one head over every class seen in the stream.

Every batch the library hands around is ``(x, y, t)``: inputs ``[B, D]``, labels in the scenario's
output space ``[B]``, and the task id of each sample ``[B]`` (needed for Task-IL masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cl_lab import _validate
from cl_lab.data.datasets import Dataset, load

SCENARIOS = ("task", "domain", "class")
MASKED_LOGIT = -1e9  # finite, so distillation terms stay free of 0 * inf


@dataclass
class Task:
    """One task of a stream; ``classes`` are the output units it uses."""

    id: int
    name: str
    x_train: torch.Tensor  # [N, D]
    y_train: torch.Tensor  # [N]
    x_test: torch.Tensor  # [M, D]
    y_test: torch.Tensor  # [M]
    classes: tuple[int, ...]
    t_train: torch.Tensor | None = None  # [N] task id per sample; None means all ``id``

    def __post_init__(self) -> None:
        if self.t_train is None:
            self.t_train = torch.full((len(self.y_train),), self.id, dtype=torch.long)
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"task {self.name!r}: x and y must have the same length, got "
                             f"{len(self.x_train)}/{len(self.y_train)} train, "
                             f"{len(self.x_test)}/{len(self.y_test)} test")

    def t_test(self) -> torch.Tensor:
        return torch.full((len(self.y_test),), self.id, dtype=torch.long)

    def sample(self, n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A seeded random draw of ``n`` samples (all of them if fewer): x [n, D], y [n], t [n].

        Stored data can be sorted by class, so a subset is never ``x[:n]``: Fisher samples, probes and
        sweeps all draw here.
        """
        _validate.positive_int("n", n)
        _validate.one_of("split", split, ("train", "test"))
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        t = self.t_train if split == "train" else self.t_test()
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx], t[idx]


@dataclass
class Stream:
    """A sequence of tasks with explicit boundaries, trained in order."""

    name: str
    scenario: str
    tasks: list[Task]
    n_out: int
    input_shape: tuple[int, ...]
    eval_tasks: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        _validate.one_of("scenario", self.scenario, SCENARIOS)
        if not self.tasks:
            raise ValueError("tasks must hold at least one task, got an empty stream")
        if not self.eval_tasks:
            self.eval_tasks = list(self.tasks)
        masks = torch.zeros(len(self.eval_tasks), self.n_out, dtype=torch.bool)  # [T, n_out]
        for task in self.eval_tasks:
            masks[task.id, list(task.classes)] = True
        self.masks = masks

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def __iter__(self):
        return iter(self.tasks)

    @property
    def input_dim(self) -> int:
        return int(torch.tensor(self.input_shape).prod())

    def mask_logits(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Task-IL: hide other tasks' outputs (logits [B, n_out], t [B]); other scenarios: unchanged."""
        if self.scenario != "task":
            return logits
        mask = self.masks.to(logits.device)[t]  # [B, n_out]
        return logits.masked_fill(~mask, MASKED_LOGIT)

    def first(self, n: int) -> Stream:
        """The stream cut after its first ``n`` tasks."""
        _validate.positive_int("n", n)
        if n > len(self.tasks):
            raise ValueError(f"n must be at most the {len(self.tasks)} tasks of {self.name!r}, got {n}")
        return Stream(self.name, self.scenario, self.tasks[:n], self.n_out, self.input_shape,
                      eval_tasks=self.eval_tasks[:n])

    def only(self, task_id: int) -> Stream:
        """Train on one task only, still evaluating every task up to it (to continue from a checkpoint)."""
        self.check_task_id(task_id)
        return Stream(self.name, self.scenario, [self.tasks[task_id]], self.n_out, self.input_shape,
                      eval_tasks=self.eval_tasks[:task_id + 1])

    def reordered(self, order: Sequence[int]) -> Stream:
        """The same tasks trained (and evaluated) in ``order``, a permutation of 0..T−1."""
        if sorted(order) != list(range(len(self.tasks))):
            raise ValueError(f"order must be a permutation of 0..{len(self.tasks) - 1}, got {list(order)}")
        return Stream(self.name, self.scenario, [self.tasks[i] for i in order], self.n_out, self.input_shape,
                      eval_tasks=[self.eval_tasks[i] for i in order])

    def check_task_id(self, task_id: int) -> int:
        if not 0 <= task_id < len(self.eval_tasks):
            raise ValueError(f"task_id must be in 0..{len(self.eval_tasks) - 1} for stream "
                             f"{self.name!r}, got {task_id}")
        return task_id


def _as_dataset(dataset: Dataset | str, **load_kwargs) -> Dataset:
    return load(dataset, **load_kwargs) if isinstance(dataset, str) else dataset


def _subsample(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random order of (x, y), cut to ``n`` samples when given: any prefix is then a fair sample."""
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def _test_seed(seed: int, task: int) -> int:
    return 7919 * (seed + 1) + task  # distinct from the train order's seed + task


def split(dataset: Dataset | str, n_tasks: int = 5, scenario: str = "class", *,
          n_train: int | None = None, seed: int = 0) -> Stream:
    """Split the classes into ``n_tasks`` groups in class order (0-1, 2-3, … for 5 MNIST tasks).

    Every task's train and test samples are stored in a seeded random order (``seed``), whatever the
    dataset's order: the first n of a task are a fair sample of its classes.
    """
    _validate.positive_int("n_tasks", n_tasks)
    _validate.one_of("scenario", scenario, SCENARIOS)
    data = _as_dataset(dataset)
    if data.n_classes % n_tasks:
        raise ValueError(f"n_tasks must divide the {data.n_classes} classes of {data.name}, got {n_tasks}")
    per_task = data.n_classes // n_tasks
    tasks = []
    for i in range(n_tasks):
        digits = tuple(range(i * per_task, (i + 1) * per_task))
        x_tr, y_tr = _select(data.x_train, data.y_train, digits)
        x_tr, y_tr = _subsample(x_tr, y_tr, n_train, seed + i)
        x_te, y_te = _subsample(*_select(data.x_test, data.y_test, digits), None, _test_seed(seed, i))
        if scenario == "domain":
            y_tr, y_te = y_tr - digits[0], y_te - digits[0]
            classes = tuple(range(per_task))
        else:
            classes = digits
        tasks.append(Task(i, "/".join(map(str, digits)), x_tr, y_tr, x_te, y_te, classes))
    n_out = per_task if scenario == "domain" else data.n_classes
    return Stream(f"split-{data.name}", scenario, tasks, n_out, data.image_shape)


def _select(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _transformed_stream(data: Dataset, transforms: list, names: list[str], scenario: str,
                        kind: str, n_train: int | None, seed: int) -> Stream:
    k = data.n_classes
    tasks = []
    for i, (transform, name) in enumerate(zip(transforms, names)):
        x_tr, y_tr = _subsample(data.x_train, data.y_train, n_train, seed + i)
        x_te, y_te = _subsample(data.x_test, data.y_test, None, _test_seed(seed, i))
        offset = 0 if scenario == "domain" else i * k
        classes = tuple(range(offset, offset + k))
        tasks.append(Task(i, name, transform(x_tr), y_tr + offset, transform(x_te), y_te + offset, classes))
    n_out = k if scenario == "domain" else k * len(tasks)
    return Stream(f"{kind}-{data.name}", scenario, tasks, n_out, data.image_shape)


def permuted(dataset: Dataset | str, n_tasks: int = 5, scenario: str = "domain", *,
             n_train: int | None = None, seed: int = 0) -> Stream:
    """Task 1 is the original images; each later task applies its own fixed pixel permutation."""
    _validate.positive_int("n_tasks", n_tasks)
    _validate.one_of("scenario", scenario, SCENARIOS)
    data = _as_dataset(dataset)
    gen = torch.Generator().manual_seed(seed)
    n_pixels = data.x_train.shape[1]
    perms = [torch.arange(n_pixels)] + [torch.randperm(n_pixels, generator=gen) for _ in range(n_tasks - 1)]
    transforms = [lambda x, p=p: x[:, p] for p in perms]
    names = ["original"] + [f"perm {i}" for i in range(1, n_tasks)]
    return _transformed_stream(data, transforms, names, scenario, "permuted", n_train, seed)


def rotate_images(x: torch.Tensor, image_shape: tuple[int, int, int], degrees: float) -> torch.Tensor:
    """Rotate flat images x [N, C*H*W] by ``degrees`` counter-clockwise (bilinear, zero fill)."""
    c, h, w = image_shape
    theta = torch.tensor(float(degrees), dtype=x.dtype, device=x.device) * torch.pi / 180
    zero = torch.zeros_like(theta)
    rot = torch.stack([torch.stack([torch.cos(theta), -torch.sin(theta), zero]),
                       torch.stack([torch.sin(theta), torch.cos(theta), zero])])  # [2, 3]
    images = x.reshape(-1, c, h, w)
    grid = F.affine_grid(rot.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).reshape(len(x), -1)


def rotated(dataset: Dataset | str, angles: tuple[float, ...] = (0, 80, 160), scenario: str = "domain", *,
            n_train: int | None = None, seed: int = 0) -> Stream:
    """One task per rotation angle (degrees), as in De Lange et al. (2023)."""
    _validate.one_of("scenario", scenario, SCENARIOS)
    if len(angles) == 0:
        raise ValueError("angles must hold at least one angle, got an empty sequence")
    data = _as_dataset(dataset)
    transforms = [lambda x, a=a: rotate_images(x, data.image_shape, a) for a in angles]
    names = [f"{a:g}°" for a in angles]
    return _transformed_stream(data, transforms, names, scenario, "rotated", n_train, seed)


def joint(stream: Stream) -> Stream:
    """Joint training as a stream: one task holding every task's training data, evaluated per task."""
    tasks = stream.tasks
    t_train = torch.cat([t.t_train for t in tasks])  # [N]
    order = torch.randperm(len(t_train), generator=torch.Generator().manual_seed(0))  # a fair prefix here too
    union = Task(0, "joint", torch.cat([t.x_train for t in tasks])[order], torch.cat([t.y_train for t in tasks])[order],
                 tasks[0].x_test, tasks[0].y_test, tuple(range(stream.n_out)), t_train=t_train[order])
    return Stream(f"joint({stream.name})", stream.scenario, [union], stream.n_out, stream.input_shape,
                  eval_tasks=list(stream.eval_tasks))


def split_mnist(n_tasks: int = 5, scenario: str = "class", **kwargs) -> Stream:
    """Split MNIST (5 tasks of 2 digits by default); ``root``/``download`` go to ``datasets.load``."""
    load_kwargs = {k: kwargs.pop(k) for k in ("root", "download") if k in kwargs}
    return split(load("mnist", **load_kwargs), n_tasks, scenario, **kwargs)


def permuted_mnist(n_tasks: int = 5, scenario: str = "domain", **kwargs) -> Stream:
    load_kwargs = {k: kwargs.pop(k) for k in ("root", "download") if k in kwargs}
    return permuted(load("mnist", **load_kwargs), n_tasks, scenario, **kwargs)


def rotated_mnist(angles: tuple[float, ...] = (0, 80, 160), scenario: str = "domain", **kwargs) -> Stream:
    load_kwargs = {k: kwargs.pop(k) for k in ("root", "download") if k in kwargs}
    return rotated(load("mnist", **load_kwargs), angles, scenario, **kwargs)
