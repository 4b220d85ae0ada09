"""An exponential moving average of the weights as a cheap consolidation (Polyak & Juditsky 1992; the "mean
teacher" of Tarvainen & Valpola 2017, arXiv 1703.01780; in continual learning, CLS-ER, Arani et al. 2022, arXiv
2201.12604, and the temporal ensembles of Soutif-Cormerais et al. 2023, arXiv 2306.16817).

After every optimizer step, θ̄ ← β·θ̄ + (1 − β)·θ; predictions use θ̄, training uses θ. θ̄ averages the
last ~1/(1 − β) steps, so right after a task switch it still holds much of the previous task: it trades how
fast the served model follows the new task against how much of the old one it keeps. Cost: one extra copy of
the weights and one in-place lerp per step; no extra forward or backward pass.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cl_lab import _validate
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Context, Method


class EMA(Method):
    """θ̄ ← β θ̄ + (1 − β) θ after each step (``beta`` = β); ``logits`` predicts with θ̄ (``self.average``).

    The average starts as a copy of the model when the first task starts and is never reset.
    """

    name = "EMA"

    def __init__(self, beta: float = 0.99) -> None:
        self.beta = _validate.in_range("beta", beta, 0.0, 1.0, high_open=True)
        self.average: nn.Module | None = None

    def on_task_start(self, ctx: Context) -> None:
        if self.average is None:
            self.average = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    @torch.no_grad()
    def after_step(self, ctx: Context) -> None:
        averaged = list(self.average.parameters())
        current = [p.detach() for p in ctx.model.parameters()]
        torch._foreach_lerp_(averaged, current, 1 - self.beta)  # θ̄ + (1 − β)(θ − θ̄)

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        served = model if self.average is None else self.average
        return stream.mask_logits(served(x), t)

    def describe(self) -> dict:
        return {"method": self.name, "beta": self.beta}
