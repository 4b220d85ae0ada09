"""Chapter 06 exercises: PackNet's pruning step, and a progressive network's forward pass with lateral connections.

The checkers compare with ``cl_lab.methods.isolation`` (``PackNet``'s pruning, ``ProgressiveNet.forward``) on small
seeded random layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.methods.isolation import FREE, PackNet, ProgressiveNet

# --- Exercise 6.1 · PackNet's pruning step --------------------------------------------------------------------------


def _prune_stub(weight: torch.Tensor, owner: torch.Tensor, task: int, prune_ratio: float) -> torch.Tensor:
    """weight: [out, in] float; owner: [out, in] long, the task that holds each weight (−1 = free). Returns a new
    owner tensor in which the int(prune_ratio · n) smallest-|w| of the n weights ``task`` holds are free (−1)."""
    raise NotImplementedError


def _prune_solution(weight: torch.Tensor, owner: torch.Tensor, task: int, prune_ratio: float) -> torch.Tensor:
    """weight: [out, in] float; owner: [out, in] long, the task that holds each weight (−1 = free). Returns a new
    owner tensor in which the int(prune_ratio · n) smallest-|w| of the n weights ``task`` holds are free (−1)."""
    mine = owner == task  # [out, in]: only this task's weights may be released
    n_prune = int(prune_ratio * mine.sum().item())
    magnitude = weight.abs().masked_fill(~mine, float("inf")).reshape(-1)  # others can never be among the smallest
    pruned = magnitude.topk(n_prune, largest=False).indices
    new_owner = owner.clone()
    new_owner.view(-1)[pruned] = -1
    return new_owner


def _prune_every_task(weight, owner, task, prune_ratio):
    n_prune = int(prune_ratio * (owner == task).sum().item())
    held = owner != FREE
    magnitude = weight.abs().masked_fill(~held, float("inf")).reshape(-1)
    new_owner = owner.clone()
    new_owner.view(-1)[magnitude.topk(n_prune, largest=False).indices] = FREE
    return new_owner


def _prune_largest(weight, owner, task, prune_ratio):
    mine = owner == task
    n_prune = int(prune_ratio * mine.sum().item())
    magnitude = weight.abs().masked_fill(~mine, -1.0).reshape(-1)
    new_owner = owner.clone()
    new_owner.view(-1)[magnitude.topk(n_prune, largest=True).indices] = FREE
    return new_owner


def _prune_ratio_of_layer(weight, owner, task, prune_ratio):
    mine = owner == task
    n_prune = int(prune_ratio * owner.numel())
    magnitude = weight.abs().masked_fill(~mine, float("inf")).reshape(-1)
    new_owner = owner.clone()
    new_owner.view(-1)[magnitude.topk(n_prune, largest=False).indices] = FREE
    return new_owner


def _library_prune(weight: torch.Tensor, owner: torch.Tensor, task: int, prune_ratio: float) -> torch.Tensor:
    """What ``PackNet`` does at the end of ``task``, on one weight matrix."""
    layer = nn.Module()
    layer.weight = nn.Parameter(weight.clone())
    packnet = PackNet(prune_ratio=prune_ratio)
    packnet.owner = {"weight": owner.clone()}
    packnet._prune(layer, task)
    return packnet.owner["weight"]


def _prune_case(seed: int, shape: tuple[int, int], task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer after tasks 0..task−1 were packed: owners drawn at random among them, the rest held by ``task``."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=gen)
    owner = torch.randint(-1, task + 1, shape, generator=gen)  # older tasks, free, and ``task``
    return weight, owner


def _prune_properties(fn: Callable) -> None:
    for seed, shape, task, ratio in ((0, (6, 5), 1, 0.5), (1, (12, 9), 2, 0.3), (2, (20, 16), 3, 0.75)):
        weight, owner = _prune_case(seed, shape, task)
        w_copy, o_copy = weight.clone(), owner.clone()
        out = fn(w_copy, o_copy, task, ratio)
        expect(isinstance(out, torch.Tensor) and out.shape == owner.shape, "returns an owner tensor shaped like the "
               "weight [out, in]", tuple(owner.shape), getattr(out, "shape", type(out).__name__))
        expect(torch.equal(w_copy, weight) and torch.equal(o_copy, owner), "leaves weight and owner unchanged "
               "(returns a new tensor)", "inputs untouched", "an input was modified")
        others = owner != task
        moved = int((out[others] != owner[others]).sum())
        expect(moved == 0, "weights held by other tasks (or free) keep their owner: the tasks' masks stay disjoint",
               "no change outside the task", f"{moved} changed")
        mine = owner == task
        released = mine & (out == FREE)
        expect(bool(((out[mine] == task) | (out[mine] == FREE)).all()), "the task's weights are either kept or freed",
               f"owner {task} or {FREE}", out[mine].unique().tolist())
        n_expected = int(ratio * mine.sum().item())
        expect(int(released.sum()) == n_expected, f"frees int(prune_ratio · n) of the task's n = {int(mine.sum())} "
               "weights", n_expected, int(released.sum()))
        kept = mine & ~released
        if released.any() and kept.any():
            largest_freed, smallest_kept = weight.abs()[released].max(), weight.abs()[kept].min()
            expect(bool(largest_freed <= smallest_kept), "frees the smallest |w|: every freed weight is smaller than "
                   "every kept one", f"max freed ≤ min kept = {smallest_kept:.3f}", f"max freed {largest_freed:.3f}")
        expected = _library_prune(weight, owner, task, ratio)
        expect(torch.equal(out, expected), "equals PackNet's pruning step", "the same owners",
               f"{int((out != expected).sum())} entries differ")
    weight, owner = _prune_case(3, (4, 4), 1)
    expect(torch.equal(fn(weight.clone(), owner.clone(), 1, 0.0), owner), "prune_ratio 0 frees nothing",
           "owner unchanged", "weights freed")


check_packnet_prune = register(Exercise(
    name="packnet_prune", chapter="06", title="PackNet's pruning step", difficulty=2, minutes=15,
    stub=_prune_stub, solution=_prune_solution, properties=_prune_properties,
    wrong_answers={"prunes the smallest weights of every task": _prune_every_task,
                   "frees the largest weights": _prune_largest,
                   "prune_ratio of the whole layer, not of the task's weights": _prune_ratio_of_layer},
))


# --- Exercise 6.2 · A progressive network's forward pass ------------------------------------------------------------

def _progressive_stub(net: ProgressiveNet, x: torch.Tensor, task_id: int) -> torch.Tensor:
    """net: a ProgressiveNet; x: [B, in_dim]. Returns column ``task_id``'s logits [B, n_out], computed from
    net.columns[k].layers, .laterals and .head (eq. 1 of Rusu et al.), without calling net(...)."""
    raise NotImplementedError


def _progressive_solution(net: ProgressiveNet, x: torch.Tensor, task_id: int) -> torch.Tensor:
    """net: a ProgressiveNet; x: [B, in_dim]. Returns column ``task_id``'s logits [B, n_out], computed from
    net.columns[k].layers, .laterals and .head (eq. 1 of Rusu et al.), without calling net(...)."""
    columns = net.columns[:task_id + 1]  # later columns are never read
    h = [torch.relu(c.layers[0](x)) for c in columns]  # layer 1 reads x in every column: [B, hidden[0]] each
    for l in range(1, len(columns[0].layers)):
        # column k, layer l: relu(W_k h_k + Σ_{j<k} U_{k:j} h_j), every h from layer l − 1
        h = [torch.relu(c.layers[l](h[k]) + sum(u(h[j]) for j, u in enumerate(c.laterals[l - 1])))
             for k, c in enumerate(columns)]
    top = columns[task_id]
    return top.head(h[task_id]) + sum(u(h[j]) for j, u in enumerate(top.laterals[-1]))  # the head reads them too


def _progressive_no_head_laterals(net, x, task_id):
    columns = net.columns[:task_id + 1]
    h = [torch.relu(c.layers[0](x)) for c in columns]
    for l in range(1, len(columns[0].layers)):
        h = [torch.relu(c.layers[l](h[k]) + sum(u(h[j]) for j, u in enumerate(c.laterals[l - 1])))
             for k, c in enumerate(columns)]
    return columns[task_id].head(h[task_id])


def _progressive_relu_before_laterals(net, x, task_id):
    columns = net.columns[:task_id + 1]
    h = [torch.relu(c.layers[0](x)) for c in columns]
    for l in range(1, len(columns[0].layers)):
        h = [torch.relu(c.layers[l](h[k])) + sum(u(h[j]) for j, u in enumerate(c.laterals[l - 1]))
             for k, c in enumerate(columns)]
    top = columns[task_id]
    return top.head(h[task_id]) + sum(u(h[j]) for j, u in enumerate(top.laterals[-1]))


def _progressive_previous_column_only(net, x, task_id):
    columns = net.columns[:task_id + 1]
    h = [torch.relu(c.layers[0](x)) for c in columns]

    def lateral(c, k, maps):
        return maps[k - 1](h[k - 1]) if k > 0 else 0.0

    for l in range(1, len(columns[0].layers)):
        h = [torch.relu(c.layers[l](h[k]) + lateral(c, k, c.laterals[l - 1])) for k, c in enumerate(columns)]
    top = columns[task_id]
    return top.head(h[task_id]) + lateral(top, task_id, top.laterals[-1])


def _progressive_net(seed: int, hidden: tuple[int, ...], n_columns: int) -> ProgressiveNet:
    torch.manual_seed(seed)
    net = ProgressiveNet(5, hidden, 3)
    for _ in range(n_columns - 1):
        net.add_column()
    return net


def _progressive_properties(fn: Callable) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen)
    for hidden, n_columns in (((6,), 2), ((6, 4), 2), ((6, 4), 3), ((4, 5, 3), 3)):
        net = _progressive_net(len(hidden) + n_columns, hidden, n_columns)
        with torch.no_grad():
            for task_id in range(n_columns):
                out = fn(net, x.clone(), task_id)
                expected = net(x, task_id)
                where = f"hidden {hidden}, {n_columns} columns, task {task_id}"
                expect(isinstance(out, torch.Tensor) and out.shape == expected.shape, f"returns logits [B, n_out] "
                       f"({where})", tuple(expected.shape), getattr(out, "shape", type(out).__name__))
                expect(torch.allclose(out, expected, atol=1e-5), f"equals ProgressiveNet's forward ({where})",
                       expected[0].tolist(), out[0].tolist())
            before = fn(net, x, 0)
            for p in net.columns[-1].parameters():
                p.add_(1.0)  # change the newest column only
            expect(torch.equal(fn(net, x, 0), before), "column 1's output ignores every later column "
                   "(changing the newest column leaves it bit-identical)", "unchanged", "changed")


check_progressive_forward = register(Exercise(
    name="progressive_forward", chapter="06", title="A progressive network's forward pass", difficulty=2, minutes=20,
    stub=_progressive_stub, solution=_progressive_solution, properties=_progressive_properties,
    wrong_answers={"the head ignores the laterals": _progressive_no_head_laterals,
                   "relu before adding the laterals": _progressive_relu_before_laterals,
                   "laterals from the previous column only": _progressive_previous_column_only},
))
