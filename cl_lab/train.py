"""One readable training loop over a task stream, with named hook points for methods (see
``cl_lab.methods.base``) and continual evaluation at any interval."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cl_lab import _validate, metrics
from cl_lab.data.streams import Stream
from cl_lab.device import pick_device, seed_everything
from cl_lab.methods.base import Context, Method, Naive

OPTIMIZERS = ("adam", "sgd")
PROGRESS_AUTO_STEPS = 2000  # show a progress bar from this many steps on when progress="auto"


@dataclass
class Run:
    """What ``fit`` returns: the accuracy matrix, the curves, timing, and the configuration."""

    R: np.ndarray  # [tasks trained, tasks evaluated]; R[i, j] after training task i, on task j
    b: np.ndarray  # [tasks evaluated] accuracy of the freshly initialised model
    curves: pd.DataFrame  # step, train_task, task, accuracy (continual evaluation)
    losses: pd.DataFrame  # step, train_task, loss
    boundaries: list[int]  # global step at which each training task started
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def aa(self) -> float:
        return metrics.average_accuracy(self.R)

    @property
    def bwt(self) -> float:
        return metrics.backward_transfer(self.R)

    @property
    def fwt(self) -> float:
        return metrics.forward_transfer(self.R, self.b)

    @property
    def forgetting(self) -> float:
        return metrics.forgetting(self.R)

    def min_acc(self, task: int, until_task: int | None = None) -> float:
        """Min-ACC (De Lange et al. 2023): min over evaluations at steps n > t_j of the accuracy on ``task``.

        t_j is the step at which ``task`` ended; the evaluation taken at that step (before the next task's
        first update) is the end-of-task model and is excluded. ``until_task`` keeps only evaluations up to
        the end of that later task (default: the whole run).
        """
        if self.curves.empty:
            raise ValueError("min_acc needs continual evaluation: call fit(..., eval_every=N)")
        if not 0 <= task < len(self.boundaries) - 1:
            raise ValueError(f"task must have a later task to measure Min-ACC (0..{len(self.boundaries) - 2}), "
                             f"got {task}")
        until_task = len(self.boundaries) - 1 if until_task is None else until_task
        if not task < until_task < len(self.boundaries):
            raise ValueError(f"until_task must be in {task + 1}..{len(self.boundaries) - 1}, got {until_task}")
        end_of_task = self.boundaries[task + 1]
        last = self.boundaries[until_task + 1] if until_task + 1 < len(self.boundaries) else self.curves.step.max()
        c = self.curves
        after = c[(c.task == task) & (c.step > end_of_task) & (c.step <= last)]
        return metrics.min_acc(after.accuracy.to_numpy())

    def wc_acc(self, k: int | None = None) -> float:
        """WC-ACC after training task k (default: the last task), from evaluations up to the end of task k."""
        k = len(self.R) - 1 if k is None else k
        return metrics.wc_acc(self.R[k, k], [self.min_acc(j, until_task=k) for j in range(k)])

    def summary(self) -> dict:
        row = {"method": self.config.get("method", "?"), "AA": self.aa, "seconds": self.seconds}
        if self.R.shape[0] == self.R.shape[1] > 1:
            row.update(BWT=self.bwt, FWT=self.fwt)
        return row


def _index_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index batches, reshuffling each epoch."""
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


@torch.no_grad()
def accuracy(model: nn.Module, stream: Stream, task_id: int, x: torch.Tensor, y: torch.Tensor,
             method: Method | None = None, batch_size: int = 2048) -> float:
    """Accuracy of ``model`` on inputs x [N, D], labels y [N] of task ``task_id`` (batched, no_grad)."""
    stream.check_task_id(task_id)
    method = method or Naive()
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        t = torch.full((len(yb),), task_id, dtype=torch.long, device=xb.device)
        correct += (method.logits(model, stream, xb, t).argmax(1) == yb).sum().item()
    model.train(was_training)
    return correct / max(len(y), 1)


class _Evaluator:
    """Fixed evaluation sets: full test sets for R, a seeded subsample per task for the curves."""

    def __init__(self, stream: Stream, device: torch.device, eval_samples: int, seed: int,
                 predictor: Method) -> None:
        self.stream, self.predictor = stream, predictor
        gen = torch.Generator().manual_seed(seed + 10_000)
        self.full, self.sub = [], []
        for task in stream.eval_tasks:
            x, y = task.x_test.to(device), task.y_test.to(device)
            idx = torch.randperm(len(y), generator=gen)[:eval_samples].to(device)
            self.full.append((x, y))
            self.sub.append((x[idx], y[idx]))

    def row(self, model: nn.Module, subsample: bool) -> list[float]:
        sets = self.sub if subsample else self.full
        return [accuracy(model, self.stream, j, x, y, self.predictor) for j, (x, y) in enumerate(sets)]


def _as_methods(method: Method | Sequence[Method] | None) -> list[Method]:
    if method is None:
        return [Naive()]
    methods = [method] if isinstance(method, Method) else list(method)
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"method must be a cl_lab Method or a list of them, got {type(m).__name__}")
    return methods


def fit(model: nn.Module, stream: Stream, method: Method | Sequence[Method] | None = None, *,
        steps: int = 500, lr: float = 1e-3, batch_size: int = 128, optimizer: str = "adam",
        eval_every: int | None = None, eval_samples: int = 1000, seed: int = 0,
        device: str | torch.device = "auto", progress: bool | str = "auto", baseline: bool = True) -> Run:
    """Train ``model`` on each task of ``stream`` in order for ``steps`` optimizer steps per task.

    ``method`` (one or a list) plugs into the loop's hooks; ``eval_every`` adds continual evaluation on
    ``eval_samples`` test samples per task every N steps (1 = every iteration). R is always filled at
    task ends on the full test sets. The optimizer is created afresh for each task. ``baseline=False`` skips
    the evaluation before training (``Run.b`` is then NaN, and so FWT), for callers that chain runs.
    """
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be a cl_lab Stream, got {type(stream).__name__}")
    _validate.positive_int("steps", steps)
    _validate.positive("lr", lr)
    _validate.positive_int("batch_size", batch_size)
    _validate.one_of("optimizer", optimizer, OPTIMIZERS)
    _validate.positive_int("eval_samples", eval_samples)
    if eval_every is not None:
        _validate.positive_int("eval_every", eval_every)
    methods = _as_methods(method)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model must have trainable parameters, got none with requires_grad=True")
    device = pick_device(device, verbose=False)
    gen = seed_everything(seed)
    model.to(device).train()
    _check_shapes(model, stream, device)
    predictor = next((m for m in methods if m.overrides_predict()), methods[0])
    evaluator = _Evaluator(stream, device, eval_samples, seed, predictor)

    b = np.array(evaluator.row(model, subsample=False) if baseline else [np.nan] * len(stream.eval_tasks))
    R = np.zeros((len(stream), len(stream.eval_tasks)))
    curves, losses, boundaries = [], [], []
    total = steps * len(stream)
    show = progress is True or (progress == "auto" and total >= PROGRESS_AUTO_STEPS)
    bar = tqdm(total=total, desc=f"{methods[0].name} on {stream.name}", disable=not show, leave=False)
    start, step = time.perf_counter(), 0
    for i, task in enumerate(stream):
        boundaries.append(step)
        x_all, y_all, t_all = task.x_train.to(device), task.y_train.to(device), task.t_train.to(device)
        opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr)
        ctx = Context(model, stream, task, i, step, 0, opt, device, batch_size, gen)
        for m in methods:
            m.on_task_start(ctx)
        opt = ctx.optimizer  # a hook may have replaced it (e.g. after adding parameters)
        for task_step, idx in enumerate(_index_batches(len(y_all), batch_size, steps, gen)):
            if eval_every is not None and step % eval_every == 0:
                curves += [(step, i, j, a) for j, a in enumerate(evaluator.row(model, subsample=True))]
            ctx.step, ctx.task_step = step, task_step
            idx = idx.to(device)
            loss = _train_step(ctx, methods, x_all[idx], y_all[idx], t_all[idx])
            losses.append((step, i, loss))
            step += 1
            bar.update(1)
        ctx.step = step
        for m in methods:
            m.on_task_end(ctx)
        R[i] = evaluator.row(model, subsample=False)
    if eval_every is not None:
        curves += [(step, len(stream) - 1, j, a) for j, a in enumerate(evaluator.row(model, subsample=True))]
    bar.close()
    config = {**methods[0].describe(), "stream": stream.name, "scenario": stream.scenario, "steps": steps,
              "lr": lr, "batch_size": batch_size, "optimizer": optimizer, "seed": seed, "device": device.type}
    return Run(R, b, pd.DataFrame(curves, columns=["step", "train_task", "task", "accuracy"]),
               pd.DataFrame(losses, columns=["step", "train_task", "loss"]), boundaries,
               time.perf_counter() - start, config)


@torch.no_grad()
def _check_shapes(model: nn.Module, stream: Stream, device: torch.device) -> None:
    """Fail early, naming both sides, when the model does not fit the stream's inputs or outputs."""
    x = stream.tasks[0].x_train[:1].to(device)  # [1, D]
    try:
        out = model(x)
    except RuntimeError as err:
        raise ValueError(f"model does not accept the stream's inputs of shape {tuple(x.shape[1:])} "
                         f"({stream.name}): {err}") from err
    if out.shape[-1] != stream.n_out:
        raise ValueError(f"model must output stream.n_out = {stream.n_out} logits for {stream.name} "
                         f"({stream.scenario}-IL), got {out.shape[-1]}")


def _train_step(ctx: Context, methods: list[Method], x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> float:
    for m in methods:
        x, y, t = m.compose_batch(ctx, x, y, t)
    logits = ctx.forward(x, t)  # [B, n_out]
    loss = methods[0].task_loss(ctx, logits, y, t)
    for m in methods:
        extra = m.extra_loss(ctx, x, y, t, logits)
        if extra is not None:
            loss = loss + extra
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for m in methods:
        m.before_step(ctx)
    ctx.optimizer.step()
    for m in methods:
        m.after_step(ctx)
    return loss.item()
