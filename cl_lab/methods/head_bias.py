"""Remedies for the Class-IL output head's recency bias, each built on experience replay (``ER``) so they can
be compared with the same buffer. Each targets a different symptom:

- ``NME`` — nearest-mean-of-exemplars (iCaRL, Rebuffi et al. 2017, arXiv 1611.07725, eq. in sec. 2.1):
  predict y* = argmin_c ‖φ(x) − μ_c‖, μ_c the mean of the normalised features of class c's buffer samples.
  Bypasses the biased head altogether.
- ``WeightAligning`` — Weight Aligning (Zhao et al. 2020, arXiv 1911.07053, eq. 6–8): after a task, multiply
  the new classes' head rows by γ = mean_old ‖w‖ / mean_new ‖w‖, which equalises the mean norms.
- ``ERACE`` — ER with asymmetric cross-entropy (Caccia et al. 2022, arXiv 2104.05025, eq. 5): incoming samples
  are scored only against the classes present in the incoming batch, so they cannot push old logits down;
  replayed samples use the full cross-entropy.
- ``BiC`` — bias correction (Wu et al. 2019, arXiv 1905.13260, eq. 5): after a task, fit two scalars on a
  class-balanced set and predict with q_c = α·o_c + β for the newest task's classes c (others unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.data.streams import MASKED_LOGIT, Stream
from cl_lab.methods.base import Context
from cl_lab.methods.replay import ER, features_and_logits, replay_split


def seen_classes(stream: Stream, upto: int) -> list[int]:
    """Classes of tasks 0..upto (inclusive) of ``stream``."""
    return sorted({c for task in stream.tasks[:upto + 1] for c in task.classes})


def class_means(features: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """iCaRL prototypes: per class the mean of L2-normalised features, renormalised.

    features [N, H], y [N] -> means [n_classes, H] and a mask [n_classes] of the classes that have samples.
    """
    phi = F.normalize(features, dim=1)  # [N, H]
    sums = torch.zeros(n_classes, phi.shape[1], device=phi.device).index_add_(0, y, phi)  # [C, H]
    present = torch.bincount(y, minlength=n_classes) > 0  # [C]
    return F.normalize(sums, dim=1), present


def nme_scores(features: torch.Tensor, means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Scores [B, C] = −‖φ(x) − μ_c‖² (higher is nearer); classes without exemplars get MASKED_LOGIT."""
    phi = F.normalize(features, dim=1)  # [B, H]
    scores = -torch.cdist(phi, means).pow(2)  # [B, C]
    return scores.masked_fill(~present, MASKED_LOGIT)


class NME(ER):
    """ER training, iCaRL's nearest-mean-of-exemplars prediction from the buffer (module docstring)."""

    name = "ER + NME"

    @torch.no_grad()
    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not len(self.buffer):
            return stream.mask_logits(model(x), t)
        h_mem, _ = features_and_logits(model, self.buffer.x)
        means, present = class_means(h_mem, self.buffer.y, stream.n_out)
        h, _ = features_and_logits(model, x)
        return stream.mask_logits(nme_scores(h, means, present), t)


def head_rows(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"model must have a Linear .head, got {type(model).__name__}")
    return head


@torch.no_grad()
def align_weights(head: nn.Linear, old: list[int], new: list[int]) -> float:
    """Scale the ``new`` rows (weights and bias) so their mean weight norm equals the ``old`` rows'; return γ."""
    norms = head.weight.norm(dim=1)  # [C]
    gamma = (norms[old].mean() / norms[new].mean()).item()
    head.weight[new] *= gamma
    head.bias[new] *= gamma
    return gamma


class WeightAligning(ER):
    """ER, then Weight Aligning of the head at the end of every task after the first (module docstring).

    The new rows' biases are scaled by γ too, so every new-class logit is scaled by γ."""

    name = "ER + WA"

    def __init__(self, buffer_size: int, policy: str = "reservoir", replay_ratio: float = 0.5, seed: int = 0) -> None:
        super().__init__(buffer_size, policy, replay_ratio, seed)
        self.gammas: list[float] = []

    def on_task_end(self, ctx: Context) -> None:
        super().on_task_end(ctx)
        if ctx.task_index == 0:
            return
        old = seen_classes(ctx.stream, ctx.task_index - 1)
        self.gammas.append(align_weights(head_rows(ctx.model), old, list(ctx.task.classes)))


class ERACE(ER):
    """ER with asymmetric cross-entropy: incoming samples see only their batch's classes (module docstring).

    loss = CE(logits_in masked to the classes present in y_in, y_in) + CE(logits_buf, y_buf)."""

    name = "ER-ACE"

    def compose_batch(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._n_new, _ = replay_split(len(x), self.replay_ratio, len(self.buffer))
        return super().compose_batch(ctx, x, y, t)

    def task_loss(self, ctx: Context, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = self._n_new
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[y[:n].unique()] = True
        loss = F.cross_entropy(logits[:n].masked_fill(~present, MASKED_LOGIT), y[:n])
        if len(y) > n:
            loss = loss + F.cross_entropy(logits[n:], y[n:])
        return loss


class BiC(ER):
    """ER, then BiC's two-parameter bias correction of the newest task's logits (module docstring).

    After each task, (α, β) are fitted by cross-entropy on a class-balanced set: ``val_per_class`` buffer
    samples per old class and as many training samples per new class, with the network frozen. Unlike the
    paper, these samples were seen in training (the paper holds a split out). The correction is dropped
    when the next task starts (its classes are then old) and refitted at that task's end.
    """

    name = "ER + BiC"

    def __init__(self, buffer_size: int, policy: str = "reservoir", replay_ratio: float = 0.5, seed: int = 0,
                 val_per_class: int = 20, fit_steps: int = 100, lr: float = 0.05) -> None:
        super().__init__(buffer_size, policy, replay_ratio, seed)
        self.val_per_class = _validate.positive_int("val_per_class", val_per_class)
        self.fit_steps = _validate.positive_int("fit_steps", fit_steps)
        self.lr = _validate.positive("lr", lr)
        self.alpha, self.beta = 1.0, 0.0
        self.corrected: list[int] = []  # classes the correction applies to
        self.history: list[tuple[float, float]] = []

    def on_task_start(self, ctx: Context) -> None:
        super().on_task_start(ctx)
        self.alpha, self.beta, self.corrected = 1.0, 0.0, []

    def _balanced_set(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + ctx.task_index)
        xs, ys = [], []
        new = set(ctx.task.classes)
        for source_x, source_y, classes in ((self.buffer.x, self.buffer.y, None),
                                            (ctx.task.x_train, ctx.task.y_train, new)):
            for c in source_y.unique().tolist():
                if (classes is None and c in new) or (classes is not None and c not in classes):
                    continue
                idx = torch.nonzero(source_y == c).flatten()
                idx = idx[torch.randperm(len(idx), generator=gen)[:self.val_per_class].to(idx.device)]
                xs.append(source_x[idx].to(ctx.device))
                ys.append(source_y[idx].to(ctx.device))
        return torch.cat(xs), torch.cat(ys)

    def on_task_end(self, ctx: Context) -> None:
        super().on_task_end(ctx)
        if ctx.task_index == 0 or not len(self.buffer):
            return
        x, y = self._balanced_set(ctx)
        with torch.no_grad():
            was_training = ctx.model.training
            ctx.model.eval()
            raw = ctx.model(x)  # [N, C] the frozen network's logits
            ctx.model.train(was_training)
        new = torch.zeros(raw.shape[1], dtype=torch.bool, device=raw.device)
        new[list(ctx.task.classes)] = True
        seen = torch.zeros_like(new)
        seen[seen_classes(ctx.stream, ctx.task_index)] = True
        params = torch.tensor([1.0, 0.0], device=raw.device, requires_grad=True)
        opt = torch.optim.Adam([params], lr=self.lr)
        for _ in range(self.fit_steps):
            corrected = torch.where(new, params[0] * raw + params[1], raw).masked_fill(~seen, MASKED_LOGIT)
            loss = F.cross_entropy(corrected, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.alpha, self.beta = params.detach().tolist()
        self.corrected = list(ctx.task.classes)
        self.history.append((self.alpha, self.beta))

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x)  # [B, C]
        if self.corrected:
            cols = torch.tensor(self.corrected, device=out.device)
            out = out.index_copy(1, cols, self.alpha * out[:, cols] + self.beta)
        return stream.mask_logits(out, t)


REMEDIES = {"er": ER, "nme": NME, "wa": WeightAligning, "er-ace": ERACE, "bic": BiC}


def make_remedy(remedy: str, buffer_size: int, *, replay_ratio: float = 0.5, seed: int = 0) -> ER:
    """One of ``REMEDIES`` ("er" is the plain-replay reference) with a reservoir buffer of ``buffer_size``."""
    _validate.one_of("remedy", remedy, REMEDIES)
    return REMEDIES[remedy](buffer_size, "reservoir", replay_ratio, seed)
