"""Measuring instruments that plug into the loop like methods but change nothing: they record how
training on a new task moves the weights and how its gradient relates to an old task's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_lab import _validate
from cl_lab.methods.base import Context, Method
from cl_lab.models import flat_params


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


class GradientInterference(Method):
    """Cosine between the current batch gradient and the gradient of an old task's loss.

    Every ``every`` steps of each task after ``old_task``, records (step, task id, cosine). A
    negative cosine means the step that lowers the new loss raises the old one, to first order.
    """

    name = "gradient-interference probe"

    def __init__(self, old_task: int = 0, every: int = 10, n_samples: int = 256, seed: int = 0) -> None:
        self.old_task = _validate.non_negative_int("old_task", old_task)
        self.every = _validate.positive_int("every", every)
        self.n_samples = _validate.positive_int("n_samples", n_samples)
        self.seed = _validate.non_negative_int("seed", seed)
        self.records: list[tuple[int, int, float]] = []

    def old_sample(self, stream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The old task's loss is measured on one fixed, seeded random draw of its training data (x, y, t):
        stored data may be sorted by class, so never its first n samples."""
        return stream.eval_tasks[self.old_task].sample(self.n_samples, seed=self.seed)

    def before_step(self, ctx: Context) -> None:
        if ctx.task.id <= self.old_task or ctx.task_step % self.every:
            return
        x, y, t = (v.to(ctx.device) for v in self.old_sample(ctx.stream))
        params = list(ctx.model.parameters())
        old_grads = torch.autograd.grad(F.cross_entropy(ctx.forward(x, t), y), params)
        g_old = torch.cat([g.reshape(-1) for g in old_grads])  # [P]
        cosine = F.cosine_similarity(_flat_grad(ctx.model), g_old, dim=0).item()
        self.records.append((ctx.step, ctx.task_index, cosine))


class WeightDrift(Method):
    """‖θ − θ*‖₂ every ``every`` steps of each later task, keyed like the curves (steps taken).

    θ* = the weights at the end of task ``anchor_task``, or the weights given to ``around(model)`` when
    continuing from a checkpoint.
    """

    name = "weight-drift probe"

    def __init__(self, anchor_task: int = 0, every: int = 10) -> None:
        self.anchor_task: int | None = _validate.non_negative_int("anchor_task", anchor_task)
        self.every = _validate.positive_int("every", every)
        self.anchor: torch.Tensor | None = None
        self.records: list[tuple[int, int, float]] = []

    @classmethod
    def around(cls, model, every: int = 10) -> WeightDrift:
        """Measure drift away from ``model``'s current weights."""
        probe = cls(every=every)
        probe.anchor_task, probe.anchor = None, flat_params(model)
        return probe

    def on_task_end(self, ctx: Context) -> None:
        if ctx.task.id == self.anchor_task:
            self.anchor = flat_params(ctx.model)

    def before_step(self, ctx: Context) -> None:
        if self.anchor is None or ctx.task_step % self.every:
            return
        drift = (flat_params(ctx.model) - self.anchor).norm().item()  # weights after ctx.step steps
        self.records.append((ctx.step, ctx.task.id, drift))


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same N inputs, a [N, D1], b [N, D2]
    (Kornblith et al. 2019, eq. 5): ‖bᵀa‖_F² / (‖aᵀa‖_F ‖bᵀb‖_F) after centring each column. 1 = the same up to
    rotation and isotropic scale; near 0 = unrelated."""
    if a.dim() != 2 or b.dim() != 2 or len(a) != len(b):
        raise ValueError(f"a and b must be [N, D] with the same N, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a - a.mean(0), b - b.mean(0)
    return ((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def layer_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each Linear layer of an MLP produces for x [N, D], after its ReLU for hidden layers:
    {layer name: [N, width]}, the names being those of its parameters (``features.0``, …, ``head``)."""
    outputs, h = {}, x
    with torch.no_grad():
        for index, module in enumerate(model.features):
            h = module(h)
            if isinstance(module, torch.nn.ReLU):
                outputs[f"features.{index - 1}"] = h
        outputs["head"] = model.head(h)
    return outputs
