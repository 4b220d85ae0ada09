"""Chapter 06 helpers (parameter isolation): an output recorder for the bit-exactness proof, parameter
counts against the number of tasks, a few-shot stream for forward transfer, the prune-ratio widget, routing
without the task id, and the three method families on one stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, data, models, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.data.streams import Stream, Task
from cl_lab.device import seed_everything
from cl_lab.methods.base import Context, Method
from cl_lab.methods.isolation import FREE, PackNet, ProgNN, ProgressiveNet
from cl_lab.methods.lora import LoRAModel
from cl_lab.methods.projection import AGEM
from cl_lab.methods.regularization import EWC, SI
from cl_lab.methods.replay import ER


class OutputRecorder(Method):
    """Records ``predictor``'s logits on a fixed input of task ``task_id`` at the end of every task from
    ``task_id`` on (put it after the method in the list, so it sees the method's final state)."""

    name = "output recorder"

    def __init__(self, predictor: Method, task_id: int, x: torch.Tensor) -> None:
        self.predictor, self.task_id, self.x = predictor, task_id, x
        self.outputs: list[torch.Tensor] = []  # one [N, n_out] tensor per recorded task end

    @torch.no_grad()
    def on_task_end(self, ctx: Context) -> None:
        if ctx.task_index < self.task_id:
            return
        x = self.x.to(ctx.device)
        t = torch.full((len(x),), self.task_id, dtype=torch.long, device=ctx.device)
        was_training = ctx.model.training
        ctx.model.eval()
        self.outputs.append(self.predictor.logits(ctx.model, ctx.stream, x, t).cpu())
        ctx.model.train(was_training)


def parameter_growth(n_tasks: int = 10, in_dim: int = 784, hidden: Sequence[int] = (100, 100), n_out: int = 10,
                     prune_ratio: float = 0.5, rank: int = 4) -> pd.DataFrame:
    """Parameters held after each number of tasks, counted on built models (``p.numel()`` summed): a
    ProgressiveNet with and without laterals grown one column per task, PackNet's fixed MLP (with the share
    of free weights p^k it leaves, the one column not counted), and a frozen MLP plus one rank-``rank``
    LoRA adapter set per task."""
    _validate.positive_int("n_tasks", n_tasks)
    _validate.in_range("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True)
    lateral = ProgressiveNet(in_dim, hidden, n_out, lateral=True)
    independent = ProgressiveNet(in_dim, hidden, n_out, lateral=False)
    mlp = models.MLP(in_dim, hidden, n_out)
    adapters = LoRAModel(mlp, rank=rank)  # a copy of the MLP, frozen, with one adapter set
    rows = []
    for k in range(1, n_tasks + 1):
        if k > 1:
            lateral.add_column()
            independent.add_column()
            adapters.add_adapter()
        rows.append({"tasks": k, "ProgNN": _numel(lateral), "independent columns": _numel(independent),
                     "PackNet": _numel(mlp), "PackNet free share": prune_ratio ** k,
                     f"MLP + LoRA r={rank}": _numel(adapters)})
    return pd.DataFrame(rows)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plot_parameter_growth(table: pd.DataFrame):
    fig, (ax, ax_free) = plt.subplots(1, 2, figsize=(9, 3.4))
    for column in table.columns.drop(["tasks", "PackNet free share"]):
        ax.plot(table.tasks, table[column] / 1e6, "o-", ms=3, label=column)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("parameters (millions)")
    ax.set_title("what isolation costs in parameters")
    ax.legend(fontsize=7)
    ax_free.plot(table.tasks, table["PackNet free share"], "o-", color="tab:red")
    ax_free.set_yscale("log")
    ax_free.set_xlabel("tasks learned")
    ax_free.set_ylabel("share of weights still free")
    ax_free.set_title("PackNet runs out of free weights")
    fig.tight_layout()
    return fig


def few_shot_later_tasks(stream: Stream, n_train: int, seed: int = 0) -> Stream:
    """The same stream with every task after the first cut to ``n_train`` training samples."""
    _validate.positive_int("n_train", n_train)
    gen = torch.Generator().manual_seed(seed)
    tasks = [stream.tasks[0]]
    for task in stream.tasks[1:]:
        idx = torch.randperm(len(task.y_train), generator=gen)[:n_train]
        tasks.append(Task(task.id, task.name, task.x_train[idx], task.y_train[idx], task.x_test, task.y_test,
                          task.classes))
    return Stream(f"{stream.name} (later tasks: {n_train} samples)", stream.scenario, tasks, stream.n_out,
                  stream.input_shape)


class ProgNNRandomFirstColumn(ProgNN):
    """Null control for lateral transfer: ProgNN whose first column is re-initialised (random, untrained
    features) when the second task starts, so later columns' laterals read features that learned nothing."""

    name = "prognn (random first column)"

    def on_task_start(self, ctx: Context) -> None:
        if ctx.task_index == 1 and isinstance(ctx.model, ProgressiveNet):
            first = ctx.model.columns[0]
            for layer in [*first.layers, first.head]:
                layer.reset_parameters()  # from the global RNG: seeded by the caller
        super().on_task_start(ctx)


LATERAL_ARMS = ("no laterals", "laterals from a random column", "laterals from the trained column")


def lateral_transfer(stream: Stream, seeds: Sequence[int], *, n_few: int = 30, hidden: Sequence[int] = (100, 100),
                     steps: int = 50, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Mean accuracy on the later (few-shot) tasks right after learning each, per seed, for three progressive
    nets: independent columns, laterals from a re-initialised first column (the null control: laterals add
    parameters and random features even when nothing transfers), and laterals from the trained first column."""
    rows = []
    for seed in seeds:
        few = few_shot_later_tasks(stream, n_train=n_few, seed=seed)
        row = {"seed": seed}
        for arm, lateral, method in zip(LATERAL_ARMS, (False, True, True),
                                        (ProgNN, ProgNNRandomFirstColumn, ProgNN), strict=True):
            seed_everything(seed)
            net = ProgressiveNet(few.input_dim, hidden, few.n_out, lateral=lateral)
            run = train.fit(net, few, method(), steps=steps, batch_size=32, seed=seed, device=device,
                            progress=False)
            row[arm] = float(run.R.diagonal()[1:].mean())
        rows.append(row)
    return pd.DataFrame(rows).set_index("seed")


@lru_cache(maxsize=4)
def _split_mnist_task_il(n_tasks: int) -> Stream:
    return data.split_mnist(n_tasks, scenario="task")


def prune_ratio_point(prune_ratio: float, n_tasks: int = 5, steps: int = 40, retrain_steps: int = 20,
                      hidden: Sequence[int] = (100, 100), seed: int = 0, device: str | torch.device = "auto") -> dict:
    """One PackNet run on split MNIST (Task-IL): accuracy of each task when learned and at the end, and the
    share of weights each task got to train (free when it started)."""
    _validate.in_range("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True)
    stream = _split_mnist_task_il(n_tasks)
    method = PackNet(prune_ratio, retrain_steps=retrain_steps)
    seed_everything(seed)  # the model's initial weights depend on the seed only
    run = train.fit(models.MLP(stream.input_dim, hidden, stream.n_out), stream, method, steps=steps, seed=seed,
                    device=device, progress=False)
    return {"prune_ratio": prune_ratio, "just_learned": run.R.diagonal().copy(), "final": run.R[-1].copy(),
            "trainable_share": trainable_shares(method, n_tasks), "free_left": method.free_fraction()}


def trainable_shares(method: PackNet, n_tasks: int) -> np.ndarray:
    """Share of the shared-out weights each task could train, read from the final owner map: the weights no
    earlier task holds (owned by task k or later, or still free). [n_tasks]"""
    total = sum(o.numel() for o in method.owner.values())
    return np.array([sum(((o == FREE) | (o >= k)).sum().item() for o in method.owner.values()) / total
                     for k in range(n_tasks)])


def plot_prune_ratio(result: dict):
    fig, ax = plt.subplots(figsize=(5, 3.4))
    tasks = np.arange(1, len(result["final"]) + 1)
    ax.bar(tasks - 0.2, result["just_learned"], 0.4, label="just learned")
    ax.bar(tasks + 0.2, result["final"], 0.4, label="after the last task")
    ax.plot(tasks, result["trainable_share"], "k.--", label="share of weights it could train")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("task")
    ax.set_ylabel("Task-IL accuracy / weight share")
    ax.set_title(f"PackNet, prune ratio {result['prune_ratio']:.2f}: {result['free_left']:.1%} weights free at end",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- without the task id: routing

TaskLogits = Callable[[torch.Tensor, int], torch.Tensor]  # (x [N, D], task id) -> that task's logits [N, n_out]


def _per_task_logits(task_logits: TaskLogits, stream: Stream, x: torch.Tensor) -> torch.Tensor:
    """Every task's network on every input, restricted to that task's own classes: [T, N, classes per task],
    on the CPU (x may live on the model's device)."""
    with torch.no_grad():
        return torch.stack([task_logits(x, task.id)[:, list(task.classes)].cpu() for task in stream.tasks])


def route_by_confidence(per_task: torch.Tensor) -> torch.Tensor:
    """The task whose own head is most sure (highest max-softmax over its classes), from per-task logits
    [T, N, C]: [N]."""
    return per_task.softmax(-1).amax(-1).argmax(0)


def route_by_class_means(stream: Stream, x: torch.Tensor) -> torch.Tensor:
    """The task owning the nearest class-mean input (one mean image per class, kept at each task's end): [N]."""
    means, owners = [], []
    for task in stream.tasks:
        for c in task.classes:
            means.append(task.x_train[task.y_train == c].mean(0))  # [D]
            owners.append(task.id)
    return torch.tensor(owners)[torch.cdist(x, torch.stack(means)).argmin(1)]


def task_inference(task_logits: TaskLogits, stream: Stream, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Class-IL evaluation of a Task-IL model on every task's test set: route each input to a task, then take
    that task's best class. One row per router (the true id, confidence, class means): task-id accuracy,
    Class-IL accuracy and the share of inputs sent to the first task. ``device``: where the model lives."""
    x = torch.cat([task.x_test for task in stream.tasks])  # [N, D]
    y = torch.cat([task.y_test for task in stream.tasks])  # [N]
    true_task = torch.cat([task.t_test() for task in stream.tasks])  # [N]
    per_task = _per_task_logits(task_logits, stream, x.to(device))  # [T, N, C]
    classes = torch.tensor([list(task.classes) for task in stream.tasks])  # [T, C]
    prediction = classes.gather(1, per_task.argmax(-1))  # [T, N]: each task's guess
    routers = {"true task id (Task-IL)": true_task, "most confident head": route_by_confidence(per_task),
               "nearest class-mean image": route_by_class_means(stream, x)}
    rows = [{"router": name, "task id right": (task == true_task).float().mean().item(),
             "accuracy": (prediction[task, torch.arange(len(x))] == y).float().mean().item(),
             "sent to task 1": (task == stream.tasks[0].id).float().mean().item()}
            for name, task in routers.items()]
    return pd.DataFrame(rows).set_index("router")


# ---------------------------------------------------------------- three families on one stream

FAMILY_SETTINGS = {  # method -> (family, its label with the setting)
    "naive": ("none", "naive"), "EWC": ("regularisation", "EWC λ={:g}"), "SI": ("regularisation", "SI c={:g}"),
    "ER": ("replay", "ER {:g} samples"), "A-GEM": ("replay", "A-GEM {:g}/task"),
    "ProgNN": ("isolation", "ProgNN"), "PackNet": ("isolation", "PackNet p={:g}"),
}


def _family_method(name: str, setting: float | None, seed: int) -> Method | None:
    makers = {"naive": lambda: None, "EWC": lambda: EWC(lam=setting, seed=seed), "SI": lambda: SI(c=setting),
              "ER": lambda: ER(int(setting), seed=seed), "A-GEM": lambda: AGEM(int(setting), seed=seed),
              "ProgNN": ProgNN, "PackNet": lambda: PackNet(setting, retrain_steps=50)}
    return makers[name]()


def held_numbers(obj: object, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Numbers in every tensor ``obj`` holds, found through its attributes, dicts, lists and tuples and the
    cl_lab objects it owns (a replay buffer). A storage shared by several tensors (views) counts once; one
    shared with ``exclude`` (the model's own parameters) not at all."""
    counted = {t.untyped_storage().data_ptr() for t in exclude}
    visited, todo, total = set(), [obj], 0
    while todo:
        item = todo.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in counted:
                counted.add(storage.data_ptr())
                total += storage.nbytes() // item.element_size()
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif type(item).__module__.startswith("cl_lab") and hasattr(item, "__dict__"):
            todo.extend(vars(item).values())
    return total


def _held_besides_network(method: Method | None, model: torch.nn.Module, plain_params: int) -> int:
    """Numbers kept besides one plain network after the last task: the model's extra parameters (ProgNN's
    columns and laterals) plus every tensor the method object holds (data, Fishers, anchors, masks, caches)."""
    extra = _numel(model) - plain_params
    return extra + (0 if method is None else held_numbers(method, exclude=list(model.parameters())))


@lru_cache(maxsize=64)
def family_point(name: str, setting: float | None = None, steps: int = 100, hidden: tuple[int, ...] = (100, 100),
                 seed: int = 0, device: str = "cpu") -> dict:
    """One method on five-task permuted MNIST in Task-IL: AA, BWT, plasticity (mean accuracy on each task
    right after learning it), the numbers it holds besides the network (measured), and whether it keeps raw data."""
    _validate.one_of("name", name, FAMILY_SETTINGS)
    stream = data.permuted(mnist(), 5, "task")
    plain = models.MLP(stream.input_dim, hidden, stream.n_out)
    seed_everything(seed)
    model = (ProgressiveNet(stream.input_dim, hidden, stream.n_out) if name == "ProgNN"
             else models.MLP(stream.input_dim, hidden, stream.n_out))
    method = _family_method(name, setting, seed)
    run = train.fit(model, stream, method, steps=steps, seed=seed, device=device, progress=False)
    plain_params = _numel(plain)
    family, label = FAMILY_SETTINGS[name]
    return {"family": family, "method": label.format(setting), "AA": run.aa,
            "BWT": run.bwt, "plasticity": float(run.R.diagonal().mean()),
            "held / network": _held_besides_network(method, model, plain_params) / plain_params,
            "keeps raw data": family == "replay"}


def plot_three_families(table: pd.DataFrame):
    """Stability (BWT) against plasticity, one colour per family; settings of one method joined by a line."""
    colours = {"none": "k", "regularisation": "C0", "replay": "C1", "isolation": "C2"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _, group in table.groupby(table.method.str.split().str[0], sort=False):
        colour = colours[group.family.iloc[0]]
        ax.plot(group.plasticity, group.BWT, "o-", color=colour, ms=5)
        for _, row in group.iterrows():
            ax.annotate(row.method, (row.plasticity, row.BWT), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for family, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=family)
    ax.set(xlabel="plasticity: mean accuracy on each task just after learning it", ylabel="BWT (0 = no forgetting)",
           title="Three families, permuted MNIST (Task-IL)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig
