"""Parameter isolation: each task gets parameters no later task may touch, so forgetting is impossible by
construction (Task-IL: the task id picks the parameters at test time).

- ``ProgressiveNet`` + ``ProgNN``: progressive networks (Rusu et al. 2016, arXiv 1606.04671). One column per
  task; older columns are frozen; column k reads the earlier columns' activations through lateral maps,
  eq. (1): h_k^(l) = relu(W_k^(l) h_k^(l-1) + Σ_{j<k} U_{k:j}^(l) h_j^(l-1)). The laterals here are linear
  (the paper's adapters add a small MLP on top).
- ``PackNet``: PackNet (Mallya & Lazebnik 2018, arXiv 1711.05769). One network; after training task k on the
  free weights, prune the ``prune_ratio`` smallest-magnitude ones, retrain the rest, then freeze them. At test
  time task j uses the weights owned by tasks 0..j (a binary mask per task).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cl_lab import _validate
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Context, Method

FREE = -1  # owner id of a PackNet weight no task holds


def _require_task_il(stream: Stream, who: str) -> None:
    if stream.scenario != "task":
        raise ValueError(f"{who} needs the task id at test time: stream scenario must be 'task', "
                         f"got {stream.scenario!r}")


def _rebuild_optimizer(ctx: Context) -> None:
    """Give ``ctx`` a fresh optimizer of the same kind over the model's trainable parameters."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.optimizer = type(ctx.optimizer)(params, **ctx.optimizer.defaults)


class _Column(nn.Module):
    """One progressive column: its own layers, and lateral maps from each earlier column."""

    def __init__(self, in_dim: int, hidden: Sequence[int], n_out: int, n_earlier: int, lateral: bool) -> None:
        super().__init__()
        sizes = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.head = nn.Linear(sizes[-1], n_out)
        n_lat = n_earlier if lateral else 0
        # laterals[l][j]: column j's layer-l activation -> this column's layer l+1 (or the head)
        outs = [*hidden[1:], n_out]
        self.laterals = nn.ModuleList(nn.ModuleList(nn.Linear(a, b, bias=False) for _ in range(n_lat))
                                      for a, b in zip(hidden, outs, strict=True))


class ProgressiveNet(nn.Module):
    """Progressive columns of ReLU MLPs; ``forward(x, task_id)`` runs column ``task_id`` (default: newest).

    Starts with one column; ``add_column()`` freezes every existing column and appends a new one on the
    same device. ``lateral=False`` gives independent columns (the no-transfer control).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (100, 100), n_out: int = 10,
                 lateral: bool = True) -> None:
        super().__init__()
        _validate.positive_int("in_dim", in_dim)
        _validate.positive_int("n_out", n_out)
        if len(hidden) == 0:
            raise ValueError("hidden must hold at least one width, got an empty sequence")
        for width in hidden:
            _validate.positive_int("hidden width", width)
        self.in_dim, self.hidden, self.n_out, self.lateral = in_dim, tuple(hidden), n_out, bool(lateral)
        self.columns = nn.ModuleList([_Column(in_dim, self.hidden, n_out, 0, self.lateral)])

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def add_column(self) -> None:
        device = next(self.parameters()).device
        for p in self.parameters():
            p.requires_grad_(False)
        column = _Column(self.in_dim, self.hidden, self.n_out, self.n_columns, self.lateral)
        self.columns.append(column.to(device))

    def check_task_id(self, task_id: int) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"task_id must be an int, got {type(task_id).__name__} {task_id!r}")
        if not 0 <= task_id < self.n_columns:
            raise ValueError(f"task_id must be a task this network has a column for (0..{self.n_columns - 1}), "
                             f"got {task_id}")
        return task_id

    def forward(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:  # [B, D] -> [B, n_out]
        k = self.n_columns - 1 if task_id is None else self.check_task_id(task_id)
        columns = self.columns[:k + 1]
        hs = [F.relu(c.layers[0](x)) for c in columns]  # every column reads x directly
        for l in range(1, len(self.hidden)):
            hs = [F.relu(c.layers[l](hs[i]) + sum(lat(hs[j]) for j, lat in enumerate(c.laterals[l - 1])))
                  for i, c in enumerate(columns)]
        top = columns[k]
        return top.head(hs[k]) + sum(lat(hs[j]) for j, lat in enumerate(top.laterals[-1]))


def prognn_parameter_count(in_dim: int, hidden: Sequence[int], n_out: int, n_tasks: int,
                           lateral: bool = True) -> int:
    """Total parameters of a progressive net after ``n_tasks`` columns (closed form, no model built)."""
    sizes = [in_dim, *hidden, n_out]
    column = sum(a * b + b for a, b in pairwise(sizes))
    lateral_per_earlier = sum(a * b for a, b in pairwise(sizes[1:])) if lateral else 0
    return n_tasks * column + lateral_per_earlier * n_tasks * (n_tasks - 1) // 2


class ProgNN(Method):
    """Progressive networks as a method: a new column at each task start, old columns frozen, and the
    task id routes each test sample to its own column. Needs a ``ProgressiveNet`` and a Task-IL stream."""

    name = "prognn"

    def on_task_start(self, ctx: Context) -> None:
        if not isinstance(ctx.model, ProgressiveNet):
            raise TypeError(f"model must be a ProgressiveNet for ProgNN, got {type(ctx.model).__name__}")
        _require_task_il(ctx.stream, "ProgNN")
        if ctx.model.n_columns > ctx.task_index + 1:
            raise ValueError(f"model already has {ctx.model.n_columns} columns at task {ctx.task_index}: "
                             "start ProgNN from a fresh ProgressiveNet")
        while ctx.model.n_columns < ctx.task_index + 1:
            ctx.model.add_column()
        _rebuild_optimizer(ctx)

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Each sample through its task's column; a task not trained yet uses the newest column."""
        out = torch.empty(len(x), stream.n_out, device=x.device)
        for task_id in t.unique().tolist():
            rows = t == task_id
            out[rows] = model(x[rows], min(task_id, model.n_columns - 1))
        return stream.mask_logits(out, t)


class PackNet(Method):
    """PackNet: prune → retrain → freeze, one binary weight mask per task inside a fixed network.

    The hidden layers' weight matrices are shared out: ``owner`` holds, per weight, the task that keeps it
    (``FREE`` = −1 for none). Task k trains the free weights (older ones are frozen, their gradients zeroed),
    then keeps the largest-|w| (1 − prune_ratio) of them, zeroes the rest and retrains the kept ones for
    ``retrain_steps`` steps. Hidden biases are trained on the first task only (as in the paper); each
    task's head rows are its own (Task-IL). At test time task j sees the weights owned by tasks 0..j.
    """

    name = "packnet"

    def __init__(self, prune_ratio: float = 0.5, retrain_steps: int = 100, lr: float = 1e-3) -> None:
        self.prune_ratio = _validate.in_range("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True)
        self.retrain_steps = _validate.non_negative_int("retrain_steps", retrain_steps)
        self.lr = _validate.positive("lr", lr)
        self.owner: dict[str, torch.Tensor] = {}  # name -> [out, in] int owner id per weight
        self.trained_tasks = 0
        self._trainable: dict[str, torch.Tensor] = {}
        self._snapshot: dict[str, torch.Tensor] = {}

    # --- which parameters are shared out, which are frozen --------------------------------------------
    @staticmethod
    def _head_names(model: nn.Module) -> set[str]:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"model must have a Linear .head for PackNet, got {type(model).__name__}")
        return {"head.weight", "head.bias"}

    def _freeze_all_but_task(self, ctx: Context) -> None:
        """Mark what task ``ctx.task_index`` may change; remember every other value to restore it."""
        k, heads = ctx.task_index, self._head_names(ctx.model)
        rows = torch.zeros(ctx.stream.n_out, dtype=torch.bool, device=ctx.device)
        rows[list(ctx.task.classes)] = True
        self._trainable, self._snapshot = {}, {}
        for name, p in ctx.model.named_parameters():
            if name in self.owner:
                mask = self.owner[name] == k
            elif name in heads:
                mask = rows[:, None].expand_as(p) if p.dim() == 2 else rows
            else:
                mask = torch.full_like(p, k == 0, dtype=torch.bool)
            self._trainable[name] = mask
            self._snapshot[name] = p.detach().clone()

    def on_task_start(self, ctx: Context) -> None:
        _require_task_il(ctx.stream, "PackNet")
        heads = self._head_names(ctx.model)
        if not self.owner:
            self.owner = {name: torch.full_like(p, FREE, dtype=torch.long)
                          for name, p in ctx.model.named_parameters() if p.dim() == 2 and name not in heads}
        for owner in self.owner.values():
            owner[owner == FREE] = ctx.task_index  # the free weights are this task's to train
        self._freeze_all_but_task(ctx)

    def before_step(self, ctx: Context) -> None:
        for name, p in ctx.model.named_parameters():
            if p.grad is not None:
                p.grad.masked_fill_(~self._trainable[name], 0.0)

    @torch.no_grad()
    def after_step(self, ctx: Context) -> None:
        """Restore every frozen value, so isolation holds for any optimizer (momentum, weight decay…)."""
        for name, p in ctx.model.named_parameters():
            p.copy_(torch.where(self._trainable[name], p, self._snapshot[name]))

    # --- prune, retrain, freeze -----------------------------------------------------------------------
    @torch.no_grad()
    def _prune(self, model: nn.Module, task_id: int) -> None:
        params = dict(model.named_parameters())
        for name, owner in self.owner.items():
            mine = owner == task_id
            n_prune = int(self.prune_ratio * mine.sum().item())
            if n_prune == 0:
                continue
            magnitude = params[name].abs().masked_fill(~mine, float("inf")).reshape(-1)
            pruned = magnitude.topk(n_prune, largest=False).indices  # the smallest |w| of this task
            owner.view(-1)[pruned] = FREE
            params[name].view(-1)[pruned] = 0.0

    def _retrain(self, ctx: Context) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr)
        x_all, y_all, t_all = (a.to(ctx.device) for a in (ctx.task.x_train, ctx.task.y_train, ctx.task.t_train))
        for _ in range(self.retrain_steps):
            idx = torch.randint(len(y_all), (ctx.batch_size,), generator=ctx.generator).to(ctx.device)
            loss = F.cross_entropy(ctx.forward(x_all[idx], t_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.before_step(ctx)
            opt.step()
            self.after_step(ctx)

    def on_task_end(self, ctx: Context) -> None:
        self._prune(ctx.model, ctx.task_index)
        self._freeze_all_but_task(ctx)  # pruned weights are now free and held at zero
        self._retrain(ctx)
        self.trained_tasks = ctx.task_index + 1
        self._trainable, self._snapshot = {}, {}  # training state: between tasks PackNet keeps only ``owner``

    # --- prediction ---------------------------------------------------------------------------------
    def check_task_id(self, task_id: int) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"task_id must be an int, got {type(task_id).__name__} {task_id!r}")
        if not 0 <= task_id < self.trained_tasks:
            seen = f"0..{self.trained_tasks - 1}" if self.trained_tasks else "none yet"
            raise ValueError(f"task_id must be a task PackNet has trained ({seen}), got {task_id}")
        return task_id

    def task_mask(self, name: str, task_id: int) -> torch.Tensor:
        """Binary mask of the weights task ``task_id`` uses in parameter ``name`` (owners 0..task_id)."""
        self.check_task_id(task_id)
        owner = self.owner[name]
        return (owner != FREE) & (owner <= task_id)

    def _masked_params(self, model: nn.Module, upto: int) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        for name, owner in self.owner.items():
            params[name] = params[name] * ((owner != FREE) & (owner <= upto))
        return params

    def task_logits(self, model: nn.Module, x: torch.Tensor, task_id: int) -> torch.Tensor:
        """Raw logits [B, n_out] of a trained task's sub-network."""
        self.check_task_id(task_id)
        return functional_call(model, self._masked_params(model, task_id), (x,))

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Each sample through its task's sub-network; a task not trained yet sees every held weight."""
        if not self.owner:
            return stream.mask_logits(model(x), t)
        out = torch.empty(len(x), stream.n_out, device=x.device)
        newest = max(self.trained_tasks, max((int(o.max()) for o in self.owner.values()), default=0))
        for task_id in t.unique().tolist():
            rows = t == task_id
            out[rows] = functional_call(model, self._masked_params(model, min(task_id, newest)), (x[rows],))
        return stream.mask_logits(out, t)

    def free_fraction(self) -> float:
        """Share of the shared-out weights no task holds (what later tasks can still learn with)."""
        total = sum(o.numel() for o in self.owner.values())
        return sum((o == FREE).sum().item() for o in self.owner.values()) / max(total, 1)

    def owned_fraction(self, task_id: int) -> float:
        total = sum(o.numel() for o in self.owner.values())
        return sum((o == task_id).sum().item() for o in self.owner.values()) / max(total, 1)
