"""The method protocol: a continual-learning method is a small object that implements only the moments of
the training loop it needs. Naive fine-tuning is the method with no moments.

| moment              | hook                                   | examples                          |
|---------------------|----------------------------------------|-----------------------------------|
| task start          | ``on_task_start(ctx)``                  | ProgNN adds a column              |
| batch composition   | ``compose_batch(ctx, x, y, t)``         | ER mixes in buffer samples        |
| the task loss       | ``task_loss(ctx, logits, y, t)``        | ER-ACE masks old logits           |
| extra loss terms    | ``extra_loss(ctx, x, y, t, logits)``    | EWC / SI / MAS penalties, LwF     |
| after backward      | ``before_step(ctx)``                    | GEM / A-GEM project the gradient  |
| after step          | ``after_step(ctx)``                     | SI accumulates its path integral  |
| task end            | ``on_task_end(ctx)``                    | EWC computes its Fisher           |
| predict             | ``logits(model, stream, x, t)``         | NME, BiC                          |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab.data.streams import Stream, Task


@dataclass
class Context:
    """What the loop knows at a moment: handed to every hook."""

    model: nn.Module
    stream: Stream
    task: Task
    task_index: int  # position of ``task`` in the stream
    step: int  # global optimizer steps taken so far
    task_step: int  # steps taken on the current task
    optimizer: torch.optim.Optimizer
    device: torch.device
    batch_size: int
    generator: torch.Generator

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Masked logits [B, n_out] of the current model for inputs x [B, D] of tasks t [B]."""
        return self.stream.mask_logits(self.model(x), t)


class Method:
    """Base class: every hook does nothing, so a subclass is exactly its moments."""

    name = "naive"

    def on_task_start(self, ctx: Context) -> None:
        pass

    def compose_batch(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x, y, t

    def task_loss(self, ctx: Context, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_step(self, ctx: Context) -> None:
        pass

    def after_step(self, ctx: Context) -> None:
        pass

    def on_task_end(self, ctx: Context) -> None:
        pass

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return stream.mask_logits(model(x), t)

    def overrides_predict(self) -> bool:
        return type(self).logits is not Method.logits

    def describe(self) -> dict:
        """The method's configuration, for caching and result tables."""
        return {"method": self.name, **{k: v for k, v in vars(self).items()
                                         if isinstance(v, (int, float, str, bool, tuple))}}


class Naive(Method):
    """Naive fine-tuning: train on each task in turn with nothing to protect the old ones."""

    name = "naive"
