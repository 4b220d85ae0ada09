"""Gradient projection against an episodic memory: GEM and A-GEM.

- GEM (Lopez-Paz & Ranzato 2017, arXiv 1706.08840, Eq. 10–13): with g the batch gradient and g_k the
  gradient of the loss on task k's memory, find g̃ = argmin ½‖g̃ − g‖² s.t. ⟨g̃, g_k⟩ ≥ 0 for every old
  task k. Solved, as the authors did, on the dual: min_v ½ vᵀ(GGᵀ)v + gᵀGᵀv s.t. v ≥ γ, then
  g̃ = Gᵀv + g. γ ≥ 0 is the "memory strength" margin (0.5 in their code); a small ridge ``eps`` on
  GGᵀ keeps the QP strictly convex for quadprog.
- A-GEM (Chaudhry et al. 2019, arXiv 1812.00420, Eq. 11): one constraint against g_ref, the gradient on
  a random batch drawn from all memories: if ⟨g, g_ref⟩ < 0, g̃ = g − (⟨g, g_ref⟩ / ‖g_ref‖²) g_ref.
  Only the average is protected; an individual old task can still see ⟨g̃, g_k⟩ < 0.

Both keep ``memory_per_task`` random training samples of each finished task. GEM's constraints use each
whole memory (as in the paper) unless ``memory_batch`` asks for a random draw per task and step; A-GEM's
g_ref uses ``ref_batch`` samples, by default the training batch size (the A-GEM authors' MNIST script uses
10 and 10). With ``audit=True`` they
record, at every step on a later task, whether the projection fired and ⟨g̃, g_k⟩ for every old task k
(A-GEM then pays for the per-task gradients it does not otherwise need).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import quadprog
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.fisher import LayerCapture
from cl_lab.methods.base import Context, Method


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's closed-form projection of g [P] so that ⟨g̃, g_ref⟩ ≥ 0; g itself when there is no conflict."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    # dot < 0 implies g_ref ≠ 0; in float64 the squared norm of float32 values cannot underflow to zero
    # (on the CPU: MPS has no float64)
    g64, ref64 = g.cpu().double(), g_ref.cpu().double()
    return (g64 - torch.dot(g64, ref64) / torch.dot(ref64, ref64) * ref64).to(g)


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """GEM's projection of g [P] against old-task gradients G [K, P], through the dual QP (quadprog).

    Returns g̃ = Gᵀv* + g with v* = argmin_{v ≥ margin} ½vᵀ(GGᵀ + eps·I)v + (Gg)ᵀv. With margin = 0 and
    eps → 0 this is the Euclidean projection of g onto {v : Gv ≥ 0}.
    """
    _validate.non_negative("margin", margin)
    _validate.non_negative("eps", eps)
    G, g = G.detach(), g.detach()
    k = G.shape[0]
    P = (G @ G.T).cpu().double().numpy()  # [K, K]: the dual only needs inner products
    P = 0.5 * (P + P.T) + eps * np.eye(k)
    q = -(G @ g).cpu().double().numpy()  # quadprog maximises aᵀv − ½vᵀPv  →  a = −Gg
    v = quadprog.solve_qp(P, q, np.eye(k), np.full(k, float(margin)))[0]  # s.t. v ≥ margin
    return g + torch.from_numpy(v).to(G) @ G  # g̃ = Gᵀv + g  [P]


def _params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradient currently in ``p.grad`` as one vector [P] (zeros where a grad is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_grad(params: list[torch.nn.Parameter], vector: torch.Tensor) -> None:
    """Copy vector [P] back into the parameters' ``.grad``."""
    start = 0
    for p in params:
        n = p.numel()
        p.grad = vector[start:start + n].view_as(p).clone()
        start += n


def memory_gradient(ctx: Context, params: list, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gradient [P] of the cross-entropy on a memory batch x [N, D], y [N], t [N] (p.grad untouched)."""
    loss = F.cross_entropy(ctx.forward(x, t), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                      for gr, p in zip(grads, params, strict=True)])


def grouped_gradients(ctx: Context, params: list, batches: list) -> torch.Tensor | None:
    """Mean-loss gradients of K equal-sized groups, G [K, P], from one forward and one backward.

    The per-sample losses are scaled by 1/M and differentiated with respect to each Linear layer's output
    z only; group k's weight gradient is then Σ_{b∈k} ∂ℓ_b/∂z_b a_bᵀ, one batched matmul for all groups.
    Equals stacking ``memory_gradient`` per group (pinned by a test) and only saves per-pass overhead.
    None when it does not apply: unequal groups, or a trainable parameter outside a Linear layer fed
    flat inputs once per forward (a CNN, a shared layer).
    """
    if len({len(y) for _, y, _ in batches}) != 1:
        return None
    try:
        capture = LayerCapture(ctx.model)
    except TypeError:  # a trainable parameter outside Linear/Conv2d
        return None
    x, y, t = (torch.cat(parts) for parts in zip(*batches, strict=True))  # [K·M, …]
    k, m = len(batches), len(batches[0][1])
    try:
        loss = F.cross_entropy(ctx.forward(x, t), y, reduction="none").sum() / m
        flat = len(capture.inputs) == len(capture.layers) and all(
            isinstance(layer, nn.Linear) and a.dim() == 2 for (_, layer), a in zip(capture.layers, capture.inputs))
        if not flat:
            return None
        outs = torch.autograd.grad(loss, capture.outputs, allow_unused=True)
    finally:
        capture.close()
    per_param = {}
    for (_, layer), a, g in zip(capture.layers, capture.inputs, outs, strict=True):
        g = a.new_zeros(len(a), layer.out_features) if g is None else g  # [K·M, out]
        g, a = g.reshape(k, m, -1), a.reshape(k, m, -1)  # [K, M, out], [K, M, in]
        per_param[id(layer.weight)] = torch.bmm(g.transpose(1, 2), a)  # [K, out, in]
        if layer.bias is not None:
            per_param[id(layer.bias)] = g.sum(1)  # [K, out]
    return torch.cat([per_param[id(p)].reshape(k, -1) for p in params], dim=1)  # [K, P]


class _EpisodicMemory(Method):
    """Keeps ``memory_per_task`` random training samples of each finished task; optional step audit."""

    def __init__(self, memory_per_task: int, audit: bool, seed: int) -> None:
        self.memory_per_task = _validate.positive_int("memory_per_task", memory_per_task)
        self.audit = bool(audit)
        self.seed = _validate.non_negative_int("seed", seed)
        self.memories: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per task: x, y, t
        self.records: list[tuple[int, int, int, bool, float, float]] = []
        self._gen = torch.Generator().manual_seed(seed)

    def on_task_end(self, ctx: Context) -> None:
        task = ctx.task
        n = len(task.y_train)
        if self.memory_per_task > n:
            raise ValueError(f"memory_per_task must be ≤ the {n} samples seen in task {task.name!r}, "
                             f"got {self.memory_per_task}")
        idx = torch.randperm(n, generator=self._gen)[: self.memory_per_task]
        self.memories.append(tuple(v[idx].to(ctx.device) for v in (task.x_train, task.y_train, task.t_train)))

    def task_gradients(self, ctx: Context, params: list, per_task: int | None = None) -> torch.Tensor:
        """Memory gradients of every old task, G [K, P] (on ``per_task`` random memories each, or all)."""
        batches = []
        for x, y, t in self.memories:
            if per_task is not None and per_task < len(y):
                idx = torch.randperm(len(y), generator=self._gen)[:per_task].to(y.device)
                x, y, t = x[idx], y[idx], t[idx]
            batches.append((x, y, t))
        grouped = grouped_gradients(ctx, params, batches)
        if grouped is not None:
            return grouped
        return torch.stack([memory_gradient(ctx, params, *batch) for batch in batches])

    def _record(self, ctx: Context, fired: bool, G: torch.Tensor, g: torch.Tensor, g_tilde: torch.Tensor) -> None:
        before, after = (G @ g).tolist(), (G @ g_tilde).tolist()
        for k, (b, a) in enumerate(zip(before, after, strict=True)):
            self.records.append((ctx.step, ctx.task_index, k, fired, b, a))

    def audit_table(self) -> pd.DataFrame:
        """One row per (step, old task): whether the step projected, ⟨g, g_k⟩ before and ⟨g̃, g_k⟩ after."""
        return pd.DataFrame(self.records, columns=["step", "train_task", "old_task", "fired", "dot_before",
                                                   "dot_after"])


class GEM(_EpisodicMemory):
    """Gradient Episodic Memory: one constraint ⟨g̃, g_k⟩ ≥ 0 per old task, the dual QP solved by quadprog."""

    name = "GEM"

    def __init__(self, memory_per_task: int = 256, margin: float = 0.5, eps: float = 1e-3, audit: bool = False,
                 seed: int = 0, memory_batch: int | None = None) -> None:
        super().__init__(memory_per_task, audit, seed)
        self.margin = _validate.non_negative("margin", margin)
        self.eps = _validate.non_negative("eps", eps)
        self.memory_batch = None if memory_batch is None else _validate.positive_int("memory_batch", memory_batch)

    def before_step(self, ctx: Context) -> None:
        if not self.memories:
            return
        params = _params(ctx.model)
        g = flat_grad(params)  # [P]
        G = self.task_gradients(ctx, params, self.memory_batch)  # [K, P]
        fired = bool((G @ g < 0).any())
        g_tilde = gem_project(g, G, self.margin, self.eps) if fired else g
        if fired:
            write_grad(params, g_tilde)
        if self.audit:
            self._record(ctx, fired, G, g, g_tilde)


class AGEM(_EpisodicMemory):
    """Averaged GEM: one constraint against the gradient on ``ref_batch`` samples drawn from all memories."""

    name = "A-GEM"

    def __init__(self, memory_per_task: int = 256, ref_batch: int | None = None, audit: bool = False,
                 seed: int = 0) -> None:
        super().__init__(memory_per_task, audit, seed)
        self.ref_batch = None if ref_batch is None else _validate.positive_int("ref_batch", ref_batch)

    def on_task_end(self, ctx: Context) -> None:
        super().on_task_end(ctx)
        self._union = tuple(torch.cat(parts) for parts in zip(*self.memories, strict=True))  # x, y, t
        sizes = [len(y) for _, y, _ in self.memories]
        self.memories = list(zip(*(part.split(sizes) for part in self._union), strict=True))  # views: held once

    def reference_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` samples drawn at random from the union of all memories."""
        x, y, t = self._union
        idx = torch.randperm(len(y), generator=self._gen)[:n].to(y.device)
        return x[idx], y[idx], t[idx]

    def before_step(self, ctx: Context) -> None:
        if not self.memories:
            return
        params = _params(ctx.model)
        g = flat_grad(params)  # [P]
        g_ref = memory_gradient(ctx, params, *self.reference_batch(self.ref_batch or ctx.batch_size))  # [P]
        fired = bool(torch.dot(g, g_ref) < 0)
        g_tilde = agem_project(g, g_ref)
        if fired:
            write_grad(params, g_tilde)
        if self.audit:
            self._record(ctx, fired, self.task_gradients(ctx, params), g, g_tilde)
