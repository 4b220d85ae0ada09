"""Chapter 09 helpers (LoRA for continual learning): a backbone trained on a base task, the stream of new
tasks after it, the rank sweep against full fine-tuning, adapter interference without the task id, the
cost table, and the rank/α playground callback."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate, data, models, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.data.streams import Stream
from cl_lab.device import seed_everything
from cl_lab.methods.base import Context, Method
from cl_lab.methods.isolation import prognn_parameter_count
from cl_lab.methods.lora import LoRAModel, SharedLoRA, lora_parameter_count, subspace_overlap

# ---------------------------------------------------------------- the stream and the backbone

@lru_cache(maxsize=4)
def permuted_stream(n_tasks: int = 4, seed: int = 0) -> Stream:
    """Permuted MNIST in Domain-IL (one 10-way head): task 0 the original images (the base task), tasks
    1..n−1 each a fixed pixel permutation."""
    _validate.positive_int("n_tasks", n_tasks)
    if n_tasks < 2:
        raise ValueError(f"n_tasks must be ≥ 2 (a base task and at least one new task), got {n_tasks}")
    return data.permuted(mnist(), n_tasks, "domain", seed=seed)


def after_base(stream: Stream, n_new: int | None = None) -> Stream:
    """The stream's tasks 1..n_new to train on, evaluated on every task from the base task 0 on."""
    n_new = len(stream) - 1 if n_new is None else _validate.positive_int("n_new", n_new)
    if n_new > len(stream) - 1:
        raise ValueError(f"n_new must be at most the {len(stream) - 1} tasks after the base task, got {n_new}")
    return Stream(f"{stream.name} after its base task", stream.scenario, stream.tasks[1:n_new + 1], stream.n_out,
                  stream.input_shape, eval_tasks=stream.tasks[:n_new + 1])


def train_backbone(stream: Stream, hidden: Sequence[int] = (100, 100), steps: int = 300, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[nn.Module, float]:
    """An MLP trained on the stream's base task 0 alone; returns it (on ``device``) and its base accuracy."""
    seed_everything(seed)
    model = models.MLP(stream.input_dim, tuple(hidden), stream.n_out)
    run = train.fit(model, stream.first(1), steps=steps, seed=seed, device=device, progress=False)
    return model, float(run.R[0, 0])


@lru_cache(maxsize=8)
def _cached_backbone(n_tasks: int, hidden: tuple[int, ...], steps: int, seed: int,
                     device: str) -> tuple[dict, float]:
    model, base_acc = train_backbone(permuted_stream(n_tasks), hidden, steps, seed, device)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, base_acc


def cached_backbone(n_tasks: int = 4, hidden: Sequence[int] = (100, 100), steps: int = 300, seed: int = 0,
                    device: str = "cpu") -> tuple[nn.Module, float]:
    """``train_backbone`` on ``permuted_stream(n_tasks)``, trained once per configuration and process."""
    state, base_acc = _cached_backbone(n_tasks, tuple(hidden), steps, seed, device)
    stream = permuted_stream(n_tasks)
    model = models.MLP(stream.input_dim, tuple(hidden), stream.n_out).to(device)
    model.load_state_dict(state)
    return model, base_acc


# ---------------------------------------------------------------- learns less, forgets less

def full_finetune_path(backbone: nn.Module, stream: Stream, steps: int, lr: float = 1e-3, seed: int = 0,
                       eval_every: int = 5, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Full fine-tuning of a copy of ``backbone`` on the stream's task 1, evaluated every ``eval_every``
    steps: one row per evaluation with the step, the new task's accuracy and the base task's."""
    one = after_base(stream, 1)
    run = train.fit(copy.deepcopy(backbone), one, steps=steps, lr=lr, seed=seed, eval_every=eval_every,
                    eval_samples=max(len(t.y_test) for t in one.eval_tasks), device=device, progress=False)
    path = run.curves.pivot(index="step", columns="task", values="accuracy")
    return pd.DataFrame({"step": path.index, "new task": path[1].to_numpy(), "base task": path[0].to_numpy()})


def lora_point(backbone: nn.Module, stream: Stream, rank: int, alpha: float, steps: int, lr: float = 1e-3,
               seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """One adapter of rank ``rank`` trained on task 1 on top of the frozen ``backbone``; the base task is
    evaluated through the same adapted model (the adapter stays on: no routing)."""
    run = train.fit(LoRAModel(backbone, rank, alpha, seed), after_base(stream, 1), SharedLoRA(), steps=steps,
                    lr=lr, seed=seed, device=device, progress=False)
    return {"rank": rank, "alpha": alpha, "new task": float(run.R[0, 1]), "base task": float(run.R[0, 0]),
            "adapter parameters": lora_parameter_count([stream.input_dim, *_hidden_of(backbone), stream.n_out],
                                                       rank)}


def _hidden_of(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [m.out_features for m in linears[:-1]]


def base_at_matched_learning(path: pd.DataFrame, new_accuracy: float) -> float:
    """Full fine-tuning's base-task accuracy at the first evaluation where its new-task accuracy reaches
    ``new_accuracy`` (early stopping at the same amount of learning); NaN if it never does."""
    reached = path[path["new task"] >= new_accuracy]
    return float(reached["base task"].iloc[0]) if len(reached) else float("nan")


def plot_learn_forget(points: pd.DataFrame, path: pd.DataFrame, base_accuracy: float, ax=None):
    """Base-task retention against new-task accuracy: the LoRA ranks as points, full fine-tuning as its path."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 4))
    ax.plot(path["new task"], path["base task"], ".-", color="0.6", ms=3, label="full fine-tuning, every 5 steps")
    ax.plot(path["new task"].iloc[-1], path["base task"].iloc[-1], "ks", label="full fine-tuning, end")
    ax.plot(points["new task"], points["base task"], "o-", color="tab:blue", label="LoRA, end")
    for _, row in points.iterrows():
        ax.annotate(f"r={row['rank']:g}", (row["new task"], row["base task"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(base_accuracy, color="tab:green", ls=":", label="backbone before")
    ax.set(xlabel="new task (perm 1) accuracy", ylabel="base task accuracy, same model",
           title="learns less, forgets less?")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- without the task id

@torch.no_grad()
def summed_vs_routed(model: LoRAModel, adapter_of: dict[int, int], stream: Stream) -> pd.DataFrame:
    """Accuracy of each task through its own adapter (task id routing), with every adapter summed, and through
    the backbone with all adapters merged into its weights."""
    every = tuple(adapter_of.values())
    merged = model.merged(*every)
    rows = []
    for task in stream.eval_tasks:
        x, y = task.x_test.to(next(model.parameters()).device), task.y_test.to(next(model.parameters()).device)
        own = (adapter_of[task.id],) if task.id in adapter_of else ()
        with model.using(*own):
            routed = (model(x).argmax(1) == y).float().mean().item()
        with model.using(*every):
            summed = (model(x).argmax(1) == y).float().mean().item()
        rows.append({"task": task.name, "routed by task id": routed, "all adapters summed": summed,
                     "merged into backbone": (merged(x).argmax(1) == y).float().mean().item()})
    return pd.DataFrame(rows).set_index("task")


def overlap_table(model: LoRAModel, adapters: Sequence[int]) -> pd.DataFrame:
    """Row-space overlap (mean squared cosine of principal angles) of every pair of adapters in every layer."""
    rows = []
    for layer_index, layer in enumerate(model.lora_layers()):
        for a, b in ((a, b) for i, a in enumerate(adapters) for b in adapters[i + 1:]):
            rows.append({"layer": layer_index, "pair": f"{a}–{b}", "overlap": subspace_overlap(layer.A[a], layer.A[b])})
    return pd.DataFrame(rows)


@torch.no_grad()
def cross_talk(model: LoRAModel, adapter_of: dict[int, int], stream: Stream) -> pd.DataFrame:
    """First layer (its input is the image, whatever adapters are active): for task j's test images x, how large
    another task k's adapter output ‖ΔW_k x‖ is against task j's own ‖ΔW_j x‖ (mean over images)."""
    layer = model.lora_layers()[0]
    rows = []
    for task in stream.eval_tasks:
        if task.id not in adapter_of:
            continue
        x = task.x_test.to(layer.base.weight.device)  # [N, 784]
        own = layer.adapter_output(x, adapter_of[task.id]).norm(dim=1)  # [N]
        for other_id, other in adapter_of.items():
            if other_id != task.id:
                rows.append({"inputs of task": task.id, "adapter of task": other_id,
                             "‖ΔW_k x‖ / ‖ΔW_j x‖": (layer.adapter_output(x, other).norm(dim=1) / own).mean().item()})
    return pd.DataFrame(rows)


@torch.no_grad()
def own_rowspace_share(model: LoRAModel, adapter_of: dict[int, int], stream: Stream) -> pd.Series:
    """First layer: the share of task j's input energy ‖P_j x‖² / ‖x‖² inside the row space of its own A_j
    (the only part of x that orthogonality makes invisible to the other adapters), mean over test images."""
    layer = model.lora_layers()[0]
    shares = {}
    for task in stream.eval_tasks:
        if task.id in adapter_of:
            q = torch.linalg.qr(layer.A[adapter_of[task.id]].cpu().double().T).Q  # [784, r] basis of A_j's rows
            x = task.x_test.double()  # [N, 784], on the CPU
            shares[task.id] = ((x @ q).pow(2).sum(1) / x.pow(2).sum(1)).mean().item()
    return pd.Series(shares, name="share of ‖x‖² in A_j's row space")


class OutputLog(Method):
    """At every task end, the predictor's logits on a fixed input of each task trained so far (put it after the
    method in the list, so it sees the method's final state): ``outputs[task_id]`` is a list of [N, n_out]."""

    name = "output log"

    def __init__(self, predictor: Method, inputs: dict[int, torch.Tensor]) -> None:
        self.predictor, self.inputs = predictor, inputs
        self.outputs: dict[int, list[torch.Tensor]] = {task_id: [] for task_id in inputs}

    @torch.no_grad()
    def on_task_end(self, ctx: Context) -> None:
        was_training = ctx.model.training
        ctx.model.eval()
        for task_id, x in self.inputs.items():
            if task_id <= ctx.task.id:
                t = torch.full((len(x),), task_id, dtype=torch.long, device=ctx.device)
                self.outputs[task_id].append(self.predictor.logits(ctx.model, ctx.stream, x.to(ctx.device), t).cpu())
        ctx.model.train(was_training)

    def unchanged(self) -> bool:
        """True when every task's logits are bit-identical at every recorded task end."""
        return all(torch.equal(outs[0], later) for outs in self.outputs.values() for later in outs[1:])


def adapter_norms(model: LoRAModel, adapters: Sequence[int]) -> pd.DataFrame:
    """Frobenius norms of A and of ΔW = (α/r)BA in the first layer, per adapter."""
    layer = model.lora_layers()[0]
    return pd.DataFrame([{"adapter": i, "‖A‖_F": layer.A[i].norm().item(),
                          "‖ΔW‖_F": layer.delta_weight(i).norm().item()} for i in adapters]).set_index("adapter")


# ---------------------------------------------------------------- cost

def cost_table(in_dim: int = 784, hidden: Sequence[int] = (100, 100), n_out: int = 10, n_tasks: int = 4,
               ranks: Sequence[int] = (1, 4, 16, 64)) -> pd.DataFrame:
    """Numbers kept per new task: a LoRA adapter set per rank, a progressive column (with its laterals to the
    earlier columns when it is the n_tasks-th), and per-task EWC's Fisher + anchor (two network copies)."""
    _validate.positive_int("n_tasks", n_tasks)
    dims = [in_dim, *hidden, n_out]
    network = sum(a * b + b for a, b in pairwise(dims))
    rows = [{"per new task": f"LoRA adapter set, r = {r}", "numbers": lora_parameter_count(dims, r)} for r in ranks]
    column_with_laterals = (prognn_parameter_count(in_dim, hidden, n_out, n_tasks)
                            - prognn_parameter_count(in_dim, hidden, n_out, n_tasks - 1))
    rows += [{"per new task": f"ProgNN column (task {n_tasks}, with laterals)", "numbers": column_with_laterals},
             {"per new task": "per-task EWC: Fisher + anchor", "numbers": 2 * network}]
    table = pd.DataFrame(rows).set_index("per new task")
    table["/ network"] = table["numbers"] / network
    return table


# ---------------------------------------------------------------- playground

@lru_cache(maxsize=64)
def rank_alpha_point(rank: int, alpha: float, steps: int = 150, base_steps: int = 300, lr: float = 1e-3,
                     hidden: tuple[int, ...] = (100, 100), seed: int = 0, device: str = "cpu") -> dict:
    """The playground: one rank-``rank`` adapter with scale α/r on permuted task 1, on the cached backbone;
    new-task accuracy and base-task retention, with full fine-tuning's end point for reference."""
    _validate.positive_int("rank", rank)
    _validate.positive("alpha", alpha)
    stream = permuted_stream(4)
    backbone, base_acc = cached_backbone(4, hidden, base_steps, seed, device)
    point = lora_point(backbone, stream, rank, float(alpha), steps, lr, seed, device)
    full = _full_end(hidden, base_steps, steps, lr, seed, device)
    return {**point, "backbone base": base_acc, "full new": full[0], "full base": full[1]}


@lru_cache(maxsize=8)
def _full_end(hidden: tuple[int, ...], base_steps: int, steps: int, lr: float, seed: int,
              device: str) -> tuple[float, float]:
    backbone, _ = cached_backbone(4, hidden, base_steps, seed, device)
    run = train.fit(backbone, after_base(permuted_stream(4), 1), steps=steps, lr=lr, seed=seed, device=device,
                    progress=False)
    return float(run.R[0, 1]), float(run.R[0, 0])


def plot_rank_alpha(result: dict):
    fig, ax = plt.subplots(figsize=(5, 3.4))
    labels = ["new task", "base task"]
    lora = [result["new task"], result["base task"]]
    full = [result["full new"], result["full base"]]
    positions = np.arange(2)
    ax.bar(positions - 0.2, lora, 0.4, label=f"LoRA r={result['rank']}, α={result['alpha']:g}")
    ax.bar(positions + 0.2, full, 0.4, color="0.5", label="full fine-tuning")
    ax.axhline(result["backbone base"], color="tab:green", ls=":", label="backbone on base task")
    for x, value in zip([*(positions - 0.2), *(positions + 0.2)], [*lora, *full]):
        ax.text(x, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    ax.set_xticks(positions, labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy after one new task")
    ax.set_title(f"{result['adapter parameters']:,} adapter parameters", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
