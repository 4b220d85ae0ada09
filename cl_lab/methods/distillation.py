"""Output-space constraints: Learning without Forgetting (LwF)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.methods.base import Context, Method


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(old/T) ‖ softmax(new/T)), averaged over the batch (logits [B, C] over one head).

    Equals Hinton et al.'s soft cross-entropy minus the old outputs' entropy (a constant), so its gradient
    is the same; the T² keeps gradient scale independent of T (Hinton, Vinyals & Dean 2015).
    """
    _validate.positive("temperature", temperature)
    old = F.log_softmax(old_logits / temperature, dim=1)
    new = F.log_softmax(new_logits / temperature, dim=1)
    return temperature ** 2 * F.kl_div(new, old, log_target=True, reduction="batchmean")


class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2016, arXiv 1606.09282, eq. 2 / sec. 3).

    After each task a frozen copy of the model is kept. While training a new task, its outputs on the
    *new task's inputs* become soft targets: loss += alpha · distillation_loss(new, old, temperature), on
    each old head separately in Task-IL (Li & Hoiem's multi-head setting) and on the classes seen so far
    otherwise. No old data is stored: the constraint lives in output space, and it is only as good as
    the new inputs are at probing the old function.
    """

    name = "lwf"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        self.alpha = _validate.non_negative("alpha", alpha)
        self.temperature = _validate.positive("temperature", temperature)
        self.old_model: nn.Module | None = None
        self.heads: list[tuple[int, ...]] = []  # output groups to distil

    def on_task_end(self, ctx: Context) -> None:
        self.old_model = copy.deepcopy(ctx.model).eval()
        for p in self.old_model.parameters():
            p.requires_grad_(False)
        seen = [task.classes for task in ctx.stream.tasks[:ctx.task_index + 1]]
        if ctx.stream.scenario == "task":
            self.heads = seen
        else:
            self.heads = [tuple(sorted({c for classes in seen for c in classes}))]

    def penalty(self, model: nn.Module, x: torch.Tensor, new_logits: torch.Tensor | None = None) -> torch.Tensor:
        """alpha · mean over old heads of the distillation loss on inputs x [B, D].

        ``new_logits`` [B, C]: the model's unmasked outputs on x, if already computed.
        """
        if self.old_model is None:
            raise ValueError("LwF penalty needs a consolidated task first: train a task with the method, "
                             "got none consolidated")
        with torch.no_grad():
            old = self.old_model(x)  # [B, C]
        new = model(x) if new_logits is None else new_logits  # [B, C]
        losses = [distillation_loss(new[:, list(h)], old[:, list(h)], self.temperature) for h in self.heads]
        return self.alpha * torch.stack(losses).mean()

    def extra_loss(self, ctx, x, y, t, logits):
        if self.old_model is None or self.alpha == 0:
            return None
        unmasked = None if ctx.stream.scenario == "task" else logits  # Task-IL logits hide the old heads
        return self.penalty(ctx.model, x, unmasked)
