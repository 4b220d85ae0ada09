"""Hide the task boundaries from a method: it consolidates on a fixed schedule instead (chapter 03).

SI (Zenke et al. 2017, eq. 5), EWC and MAS all consolidate at a task's end: they fold what they measured into
their importance and move their anchor θ̃ to the current weights. A stream with no announced boundaries (task-free
continual learning, Aljundi, Kelchtermans & Tuytelaars 2019, arXiv 1812.03596) leaves that moment to the user.
``ConsolidateEvery(method, every)`` swallows the loop's task-end signal and calls the method's consolidation every
``every`` optimizer steps instead, counted over the whole stream.

What it cannot hide: ``train.fit`` still creates a fresh optimizer at each task, and a method's task-end estimate
still reads samples of the task now streaming (EWC's Fisher draws from ``ctx.task``, what a window of recent
inputs would hold).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from cl_lab import _validate
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Context, Method


class ConsolidateEvery(Method):
    """Run ``method`` without task boundaries: its task end and start happen every ``every`` steps instead."""

    def __init__(self, method: Method, every: int) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a cl_lab Method, got {type(method).__name__}")
        self.inner = method
        self.every = _validate.positive_int("every", every)
        self.name = f"{method.name}, consolidating every {self.every} steps"
        self.consolidations = 0
        self.consolidation_seconds = 0.0  # wall time spent inside the method's consolidations
        self._started = False

    def describe(self) -> dict:
        return {**self.inner.describe(), "method": self.name, "every": self.every}

    def on_task_start(self, ctx: Context) -> None:
        if not self._started:  # the stream's first step: the only start the method is told about
            self.inner.on_task_start(ctx)
            self._started = True

    def compose_batch(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner.compose_batch(ctx, x, y, t)

    def task_loss(self, ctx: Context, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.task_loss(ctx, logits, y, t)

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        return self.inner.extra_loss(ctx, x, y, t, logits)

    def before_step(self, ctx: Context) -> None:
        self.inner.before_step(ctx)

    def after_step(self, ctx: Context) -> None:
        self.inner.after_step(ctx)
        if (ctx.step + 1) % self.every == 0:  # ctx.step counts the steps taken before this one
            start = time.perf_counter()
            self.inner.on_task_end(ctx)
            self.inner.on_task_start(ctx)
            self.consolidation_seconds += time.perf_counter() - start
            self.consolidations += 1

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(model, stream, x, t)

    def overrides_predict(self) -> bool:
        return self.inner.overrides_predict()
