"""Training hygiene that is often offered as a cure for forgetting: weight decay and gradient clipping.

- ``L2(strength, target="zero")`` is weight decay: the gradient of (strength/2)·‖θ‖², i.e. strength·θ added to
  ``p.grad`` (what ``torch.optim.Adam(weight_decay=...)`` does). It pulls every weight towards 0, a point
  no task cares about.
- ``L2(strength, target="anchor")`` pulls towards θ*, the weights at the start of the current task: the
  plain-L2 baseline of Kirkpatrick et al. (2017, arXiv 1612.00796, Fig. 2A), i.e. EWC with every F_i = 1.
- ``GradClip(max_norm)`` rescales the whole gradient to norm ≤ max_norm before the step
  (``torch.nn.utils.clip_grad_norm_``). Adam divides by a running gradient scale, so clipping barely changes
  its steps.

Chapter 01 measures all three against naive fine-tuning.
"""

from __future__ import annotations

import torch

from cl_lab import _validate
from cl_lab.methods.base import Context, Method

L2_TARGETS = ("zero", "anchor")


class L2(Method):
    """Adds strength·(θ − target) to every gradient: weight decay (target 0) or L2 towards θ* (anchor)."""

    name = "L2"

    def __init__(self, strength: float, target: str = "zero") -> None:
        self.strength = _validate.non_negative("strength", strength)
        self.target = _validate.one_of("target", target, L2_TARGETS)
        self.name = "weight decay" if target == "zero" else "L2 to θ*"
        self._anchor: list[torch.Tensor] = []

    def on_task_start(self, ctx: Context) -> None:
        self._anchor = [p.detach().clone() for p in ctx.model.parameters()]

    def before_step(self, ctx: Context) -> None:
        for p, anchor in zip(ctx.model.parameters(), self._anchor, strict=True):
            if p.grad is None:
                continue
            pull = p.detach() if self.target == "zero" else p.detach() - anchor
            p.grad.add_(pull, alpha=self.strength)


class GradClip(Method):
    """Rescales the gradient of all parameters together to an L2 norm of at most ``max_norm``."""

    name = "gradient clipping"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _validate.positive("max_norm", max_norm)

    def before_step(self, ctx: Context) -> None:
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), self.max_norm)
