"""Remedies for the stability gap that act only in the first steps after a task switch (chapter 08).

De Lange, van de Ven & Tuytelaars (2023, arXiv 2205.13452) show old-task accuracy dropping sharply in the first
iterations on a new task. The dip comes from large new-task gradients hitting shared weights before replay or a
penalty can push back. Two cheap ways to soften those first steps, each combinable with any other method:

- ``SwitchWarmup``: the learning rate ramps linearly from ``start_factor``·η to η over the first ``steps`` steps
  of every task after the first, η_n = η·(f + (1 − f)·n / steps), the warm-up of Goyal et al. (2017) restarted at
  each switch.
- ``HeadFirst``: for the first ``steps`` steps of every task after the first, only the output layer learns (the
  body's gradients are dropped), so the new classes' logits catch up before the features move. This is the
  "linear probe, then fine-tune" order of Kumar et al. (2022, arXiv 2202.10054).
"""

from __future__ import annotations

from torch import nn

from cl_lab import _validate
from cl_lab.methods.base import Context, Method


def _switch_window(ctx: Context, steps: int) -> bool:
    """True in the first ``steps`` steps of every task but the first."""
    return ctx.task_index > 0 and ctx.task_step < steps


class SwitchWarmup(Method):
    """Linear learning-rate warm-up from ``start_factor``·η to η over ``steps`` steps after each task switch."""

    name = "lr warm-up at switches"

    def __init__(self, steps: int = 20, start_factor: float = 0.1) -> None:
        self.steps = _validate.positive_int("steps", steps)
        self.start_factor = _validate.in_range("start_factor", start_factor, 0.0, 1.0)
        self._base_lrs: list[float] | None = None

    def on_task_start(self, ctx: Context) -> None:
        self._base_lrs = [group["lr"] for group in ctx.optimizer.param_groups]

    def before_step(self, ctx: Context) -> None:
        ramp = min(ctx.task_step / self.steps, 1.0) if ctx.task_index > 0 else 1.0
        factor = self.start_factor + (1.0 - self.start_factor) * ramp
        for group, base in zip(ctx.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor


class HeadFirst(Method):
    """Only the model's ``.head`` learns during the first ``steps`` steps after each task switch."""

    name = "head first at switches"

    def __init__(self, steps: int = 20) -> None:
        self.steps = _validate.positive_int("steps", steps)

    def before_step(self, ctx: Context) -> None:
        if not _switch_window(ctx, self.steps):
            return
        head = getattr(ctx.model, "head", None)
        if not isinstance(head, nn.Module):
            raise TypeError(f"model must have a .head module for HeadFirst, got {type(ctx.model).__name__}")
        head_params = {id(p) for p in head.parameters()}
        for p in ctx.model.parameters():
            if id(p) not in head_params:
                p.grad = None  # the optimizer skips a parameter without a gradient (momentum included)
