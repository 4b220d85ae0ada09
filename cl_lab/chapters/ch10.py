"""Chapter 10 helpers (model merging): a pretrained MLP and one fine-tune per permuted-MNIST task on a shared
10-way head, evaluation of any state dict on every task, the λ / WiSE-FT / linear-path curves, the error
barrier, merging as a continual learner, and the playground's cached callback.

Everything is a plain function of its arguments; the expensive part (training) is memoised by its full
configuration, so the notebook, the widget and the tests share one set of trained models per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cl_lab import _validate, data, metrics, models, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.data.streams import Stream, Task
from cl_lab.device import pick_device, seed_everything
from cl_lab.methods import merging

State = dict[str, torch.Tensor]


# ---------------------------------------------------------------- data: original MNIST + permuted tasks


@lru_cache(maxsize=4)
def merge_stream(n_tasks: int = 3, n_val: int = 500) -> tuple[Stream, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
    """Task 0 is original MNIST (the "pretraining" task), tasks 1..n_tasks permuted MNIST, all in Domain-IL
    (one shared 10-way head). The last ``n_val`` training images of each task (in a fixed shuffled order) are
    held out as a validation set for choosing λ, density or p: returns (stream, ((x_val, y_val), …))."""
    _validate.positive_int("n_tasks", n_tasks)
    _validate.positive_int("n_val", n_val)
    full = data.permuted(mnist(), n_tasks + 1, "domain")
    tasks, val = [], []
    for task in full.tasks:
        order = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(task.id))
        if n_val >= len(order):
            raise ValueError(f"n_val must be below the {len(order)} training images of a task, got {n_val}")
        keep, held = order[:-n_val], order[-n_val:]
        tasks.append(Task(task.id, task.name, task.x_train[keep], task.y_train[keep], task.x_test, task.y_test,
                          task.classes))
        val.append((task.x_train[held], task.y_train[held]))
    return Stream(full.name, "domain", tasks, full.n_out, full.input_shape), tuple(val)


def one_task(stream: Stream, task_id: int) -> Stream:
    """A one-task stream (training and evaluation) holding only ``stream``'s task ``task_id``."""
    stream.check_task_id(task_id)
    t = stream.tasks[task_id]
    return Stream(f"{stream.name}[{t.name}]", stream.scenario,
                  [Task(0, t.name, t.x_train, t.y_train, t.x_test, t.y_test, t.classes)],
                  stream.n_out, stream.input_shape)


def tasks_only(stream: Stream, task_ids: Sequence[int]) -> Stream:
    """The tasks ``task_ids`` of ``stream``, renumbered 0.., as a stream (for sequential and joint training)."""
    for k in task_ids:
        stream.check_task_id(k)
    tasks = [Task(i, stream.tasks[k].name, stream.tasks[k].x_train, stream.tasks[k].y_train,
                  stream.tasks[k].x_test, stream.tasks[k].y_test, stream.tasks[k].classes)
             for i, k in enumerate(task_ids)]
    return Stream(stream.name, stream.scenario, tasks, stream.n_out, stream.input_shape)


# ---------------------------------------------------------------- models as state dicts


def state_of(model: torch.nn.Module) -> State:
    """A detached copy of ``model``'s state dict (on the model's device)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_from(state: State, hidden: Sequence[int], in_dim: int = 784, n_out: int = 10) -> models.MLP:
    """An MLP holding ``state``, on the state's device."""
    model = models.MLP(in_dim, tuple(hidden), n_out)
    model.load_state_dict(state)
    return model.to(next(iter(state.values())).device)


@torch.no_grad()
def evaluate(state: State, sets: Sequence[tuple[torch.Tensor, torch.Tensor]], hidden: Sequence[int]) -> pd.DataFrame:
    """Accuracy and mean cross-entropy of the MLP ``state`` on each (x [N, D], y [N]) set: one row per set."""
    model = model_from(state, hidden).eval()
    device = next(iter(state.values())).device
    rows = []
    for x, y in sets:
        logits = model(x.to(device))  # [N, 10]
        y = y.to(device)
        rows.append({"accuracy": (logits.argmax(1) == y).float().mean().item(),
                     "loss": F.cross_entropy(logits, y).item()})
    return pd.DataFrame(rows)


def test_sets(stream: Stream) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t.x_test, t.y_test) for t in stream.tasks]


def fine_tune(state: State, stream: Stream, task_id: int, hidden: Sequence[int], steps: int, seed: int,
              device: torch.device) -> State:
    """θ after ``steps`` Adam steps on task ``task_id`` only, starting from ``state`` (data order from ``seed``)."""
    model = model_from({k: v.to(device) for k, v in state.items()}, hidden)
    train.fit(model, one_task(stream, task_id), steps=steps, seed=seed, device=device, progress=False)
    return state_of(model)


def random_init(hidden: Sequence[int], seed: int, device: torch.device) -> State:
    seed_everything(seed)
    return {k: v.to(device) for k, v in state_of(models.MLP(784, tuple(hidden), 10)).items()}


# ---------------------------------------------------------------- the chapter's trained models


@dataclass(frozen=True)
class Setup:
    """θ_init, the pretrained θ_0 (on original MNIST), one fine-tune θ_k per permuted task and τ_k = θ_k − θ_0."""

    stream: Stream
    val: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    hidden: tuple[int, ...]
    init: State
    base: State
    finetuned: tuple[State, ...]
    task_vectors: tuple[State, ...]
    steps: int
    seed: int

    def test(self, state: State) -> np.ndarray:
        """Test accuracy of ``state`` on every task (original first): [T + 1]."""
        return evaluate(state, test_sets(self.stream), self.hidden).accuracy.to_numpy()

    def valid(self, state: State) -> np.ndarray:
        """Validation accuracy on every task (held-out training images): [T + 1]."""
        return evaluate(state, self.val, self.hidden).accuracy.to_numpy()


@lru_cache(maxsize=8)
def build_setup(hidden: tuple[int, ...] = (100, 100), pretrain_steps: int = 500, steps: int = 200,
                n_tasks: int = 3, seed: int = 0, device: str = "cpu") -> Setup:
    """Pretrain θ_0 on original MNIST from a seeded random init, then fine-tune a copy on each permuted task."""
    _validate.positive_int("pretrain_steps", pretrain_steps)
    _validate.positive_int("steps", steps)
    dev = pick_device(device, verbose=False)
    stream, val = merge_stream(n_tasks)
    init = random_init(hidden, seed, dev)
    base = fine_tune(init, stream, 0, hidden, pretrain_steps, seed, dev)
    finetuned = tuple(fine_tune(base, stream, k, hidden, steps, seed + k, dev) for k in range(1, n_tasks + 1))
    taus = tuple(merging.task_vector(ft, base) for ft in finetuned)
    return Setup(stream, val, tuple(hidden), init, base, finetuned, taus, steps, seed)


def accuracy_table(setup: Setup, states: dict[str, State]) -> pd.DataFrame:
    """Test accuracy of each named state on every task, plus the mean over the new (permuted) tasks."""
    names = [t.name for t in setup.stream.tasks]
    table = pd.DataFrame({label: setup.test(s) for label, s in states.items()}, index=names).T
    table["mean new tasks"] = table[names[1:]].mean(1)
    return table


def cosine_matrix(task_vectors: Sequence[State]) -> np.ndarray:
    """cos(τ_i, τ_j) for every pair: [K, K] with ones on the diagonal."""
    k = len(task_vectors)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = merging.cosine_similarity(task_vectors[i], task_vectors[j])
    return out


def interference(setup: Setup, lam: float = 1.0) -> pd.DataFrame:
    """Per task k: accuracy of θ_0 + λ·τ_k alone, of θ_0 + λ·Σ_j τ_j, and the points lost to the other vectors."""
    merged = setup.test(merging.task_arithmetic(setup.base, setup.task_vectors, lam))
    rows = []
    for k, tau in enumerate(setup.task_vectors, start=1):
        alone = setup.test(merging.task_arithmetic(setup.base, [tau], lam))[k]
        rows.append({"task": setup.stream.tasks[k].name, "θ0 + λτ_k": alone, "θ0 + λΣτ": merged[k],
                     "lost to the others": alone - merged[k]})
    return pd.DataFrame(rows).set_index("task")


# ---------------------------------------------------------------- curves


def lambda_curve(setup: Setup, lams: Sequence[float], split: str = "test") -> pd.DataFrame:
    """Task arithmetic θ_0 + λ·Σ τ_k for each λ: accuracy on every task and the mean over the new ones."""
    _validate.one_of("split", split, ("test", "val"))
    score = setup.test if split == "test" else setup.valid
    names = [t.name for t in setup.stream.tasks]
    rows = []
    for lam in lams:
        acc = score(merging.task_arithmetic(setup.base, setup.task_vectors, lam))
        rows.append({"lam": float(lam), **dict(zip(names, acc)), "mean new tasks": acc[1:].mean()})
    return pd.DataFrame(rows)


def plot_lambda_curve(curve: pd.DataFrame, individual: float | None = None, joint: float | None = None):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for col in curve.columns.drop(["lam", "mean new tasks"]):
        ax.plot(curve.lam, curve[col], ".-", lw=1, label=col)
    ax.plot(curve.lam, curve["mean new tasks"], "k-", lw=2.5, label="mean new tasks")
    if individual is not None:
        ax.axhline(individual, color="k", ls=":", lw=1, label="fine-tunes, each on its own task")
    if joint is not None:
        ax.axhline(joint, color="tab:green", ls="--", lw=1, label="joint multi-task training")
    ax.axvline(1 / (len(curve.columns) - 3), color="grey", lw=0.8)
    ax.text(1 / (len(curve.columns) - 3), 0.02, " soup (λ = 1/K)", fontsize=7, color="grey")
    ax.set(xlabel="λ", ylabel="test accuracy", ylim=(0, 1), title="task arithmetic θ0 + λ Σ τ_k")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def wise_curve(setup: Setup, task: int = 1, alphas: Sequence[float] = tuple(np.linspace(0, 1, 11))) -> pd.DataFrame:
    """WiSE-FT between θ_0 and the fine-tune of ``task``: original-task and new-task accuracy for each α."""
    if not 1 <= task <= len(setup.finetuned):
        raise ValueError(f"task must be in 1..{len(setup.finetuned)}, got {task}")
    rows = []
    for alpha in alphas:
        acc = setup.test(merging.wise_ft(setup.base, setup.finetuned[task - 1], float(alpha)))
        rows.append({"alpha": float(alpha), "original task": acc[0], "new task": acc[task]})
    return pd.DataFrame(rows)


def linear_path(state_a: State, state_b: State, sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
                hidden: Sequence[int], n_points: int = 11) -> pd.DataFrame:
    """Accuracy and loss (averaged over ``sets``) at evenly spaced points (1 − α)·θ_a + α·θ_b."""
    _validate.positive_int("n_points", n_points)
    if n_points < 2:
        raise ValueError(f"n_points must be ≥ 2 to include both ends, got {n_points}")
    rows = []
    for alpha in np.linspace(0, 1, n_points):
        scores = evaluate(merging.interpolate(state_a, state_b, float(alpha)), sets, hidden).mean()
        rows.append({"alpha": float(alpha), "accuracy": scores.accuracy, "loss": scores.loss})
    return pd.DataFrame(rows)


def barrier(values: Sequence[float], higher_is_worse: bool = True) -> float:
    """Largest gap along a path between a curve and the straight line joining its ends (Frankle et al. 2020,
    arXiv 1912.05671, §2: the error barrier is max_α err(α) − [(1 − α) err(0) + α err(1)]). For accuracy pass
    ``higher_is_worse=False``: the barrier is then in accuracy points lost."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"values must be a 1-D sequence of at least 2 points along a path, got shape {v.shape}")
    alphas = np.linspace(0, 1, len(v))
    gap = v - ((1 - alphas) * v[0] + alphas * v[-1])
    return float(gap.max() if higher_is_worse else (-gap).max())


@lru_cache(maxsize=8)
def mode_connectivity(hidden: tuple[int, ...] = (100, 100), pretrain_steps: int = 500, steps: int = 200,
                      n_tasks: int = 3, seed: int = 0, device: str = "cpu") -> dict[str, pd.DataFrame]:
    """Linear paths on the first permuted task between (a) two fine-tunes of θ_0 that differ only in data order,
    (b) two networks trained from scratch from the same random init (different data order), (c) two networks
    trained from scratch from different random inits, (d) the fine-tunes of two different tasks (path evaluated
    on both tasks)."""
    setup = build_setup(hidden, pretrain_steps, steps, n_tasks, seed, device)
    dev = pick_device(device, verbose=False)
    task1 = [test_sets(setup.stream)[1]]
    twin = fine_tune(setup.base, setup.stream, 1, hidden, steps, seed + 100, dev)
    other_init = random_init(hidden, seed + 1000, dev)
    scratch_a = fine_tune(setup.init, setup.stream, 1, hidden, pretrain_steps, seed + 200, dev)
    scratch_b = fine_tune(setup.init, setup.stream, 1, hidden, pretrain_steps, seed + 300, dev)
    scratch_c = fine_tune(other_init, setup.stream, 1, hidden, pretrain_steps, seed + 300, dev)
    return {"fine-tunes of θ0 (same task)": linear_path(setup.finetuned[0], twin, task1, hidden),
            "from scratch, same init": linear_path(scratch_a, scratch_b, task1, hidden),
            "from scratch, different inits": linear_path(scratch_a, scratch_c, task1, hidden),
            "fine-tunes of θ0 (tasks 1 and 2)": linear_path(setup.finetuned[0], setup.finetuned[1],
                                                           test_sets(setup.stream)[1:3], hidden)}


def plot_paths(paths: dict[str, pd.DataFrame]):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, path in paths.items():
        ax_loss.plot(path.alpha, path.loss, "o-", ms=3, label=label)
        ax_acc.plot(path.alpha, path.accuracy, "o-", ms=3, label=label)
    ax_loss.set(xlabel="α along (1 − α)·θa + α·θb", ylabel="test loss", title="loss along the straight line")
    ax_acc.set(xlabel="α", ylabel="test accuracy", ylim=(0, 1), title="accuracy along the straight line")
    ax_acc.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- TIES / DARE validation


def best_on_validation(setup: Setup, merges: dict[str, State]) -> tuple[str, float, float]:
    """The merge with the best mean validation accuracy over the new tasks: (its name, that validation mean,
    its test mean over the new tasks)."""
    scored = {name: setup.valid(state)[1:].mean() for name, state in merges.items()}
    best = max(scored, key=scored.get)
    return best, float(scored[best]), float(setup.test(merges[best])[1:].mean())


def merge_grid(setup: Setup, lams: Sequence[float], densities: Sequence[float], drop_rates: Sequence[float],
               seed: int = 0) -> pd.DataFrame:
    """Task arithmetic, TIES (per density) and DARE (per drop rate), each with λ chosen on the validation sets:
    one row per method setting with its chosen λ and validation / test mean over the new tasks."""
    families: dict[str, dict[str, State]] = {"task arithmetic": {
        f"{lam:g}": merging.task_arithmetic(setup.base, setup.task_vectors, lam) for lam in lams}}
    for density in densities:
        families[f"TIES density {density:g}"] = {
            f"{lam:g}": merging.ties_merge(setup.base, setup.task_vectors, density, lam) for lam in lams}
    for p in drop_rates:
        families[f"DARE p = {p:g}"] = {
            f"{lam:g}": merging.dare_merge(setup.base, setup.task_vectors, p, lam, seed) for lam in lams}
    rows = []
    for family, merges in families.items():
        lam, val, test = best_on_validation(setup, merges)
        rows.append({"merge": family, "λ (validation)": float(lam), "validation": val, "test": test})
    return pd.DataFrame(rows).set_index("merge")


def dare_single_task(setup: Setup, drop_rates: Sequence[float], seed: int = 0) -> pd.DataFrame:
    """θ_0 + DARE_p(τ_k) for each task alone: the fine-tune's own-task accuracy kept after dropping a share p."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in drop_rates:
        accs = [setup.test(merging.task_arithmetic(setup.base, [merging.dare(tau, p, gen)], 1.0))[k]
                for k, tau in enumerate(setup.task_vectors, start=1)]
        rows.append({"p": p, "own-task accuracy": float(np.mean(accs))})
    return pd.DataFrame(rows).set_index("p")


# ---------------------------------------------------------------- merging as a continual learner


def merged_accuracy_matrix(setup: Setup, lam: float | None = 1.0,
                           lams: Sequence[float] = tuple(np.round(np.arange(0.3, 1.21, 0.1), 2))) -> np.ndarray:
    """R for "fine-tune each new task from θ_0, then merge": row i is θ_0 + λ·Σ_{k≤i} τ_k on the new tasks
    [T, T]. ``lam=None`` picks λ after each task on the validation sets of the tasks seen so far."""
    T = len(setup.task_vectors)
    R = np.zeros((T, T))
    for i in range(T):
        taus = setup.task_vectors[:i + 1]
        if lam is None:
            chosen = max(lams, key=lambda x: setup.valid(merging.task_arithmetic(setup.base, taus, x))[1:i + 2].mean())
        else:
            chosen = lam
        R[i] = setup.test(merging.task_arithmetic(setup.base, taus, chosen))[1:]
    return R


@lru_cache(maxsize=8)
def sequential_and_joint(hidden: tuple[int, ...] = (100, 100), pretrain_steps: int = 500, steps: int = 200,
                         n_tasks: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    """From θ_0: naive sequential fine-tuning on the new tasks (its R over the new tasks and its final state) and
    joint multi-task training on their union for as many steps in total (its state)."""
    setup = build_setup(hidden, pretrain_steps, steps, n_tasks, seed, device)
    dev = pick_device(device, verbose=False)
    new = tasks_only(setup.stream, range(1, n_tasks + 1))
    seq_model = model_from(setup.base, hidden)
    run = train.fit(seq_model, new, steps=steps, seed=seed, device=dev, progress=False)
    joint_model = model_from(setup.base, hidden)
    train.fit(joint_model, data.joint(new), steps=steps * n_tasks, seed=seed, device=dev, progress=False)
    return {"R": run.R, "sequential": state_of(seq_model), "joint": state_of(joint_model)}


def cl_summary(matrices: dict[str, np.ndarray]) -> pd.DataFrame:
    """AA and BWT (cl_lab.metrics) of each accuracy matrix over the new tasks."""
    return pd.DataFrame([{"method": name, "AA": metrics.average_accuracy(R), "BWT": metrics.backward_transfer(R)}
                         for name, R in matrices.items()]).set_index("method")


# ---------------------------------------------------------------- playground


def merge_point(lam: float = 1.0, density: float = 0.2, hidden: tuple[int, ...] = (100, 100),
                pretrain_steps: int = 500, steps: int = 200, n_tasks: int = 3, seed: int = 0,
                device: str = "cpu") -> dict:
    """Per-task test accuracy of task arithmetic at ``lam`` and of TIES at (``density``, ``lam``), next to each
    task's own fine-tune. Training is cached by its configuration; a new point only merges and evaluates."""
    lam = _validate.finite("lam", lam)
    _validate.in_range("density", density, 0.0, 1.0)
    if density == 0.0:
        raise ValueError("density must be in (0, 1], got 0.0")
    setup = build_setup(tuple(hidden), pretrain_steps, steps, n_tasks, seed, device)
    own = [setup.test(ft)[k] for k, ft in enumerate(setup.finetuned, start=1)]
    return {"lam": lam, "density": density, "tasks": [t.name for t in setup.stream.tasks],
            "task arithmetic": setup.test(merging.task_arithmetic(setup.base, setup.task_vectors, lam)),
            "TIES": setup.test(merging.ties_merge(setup.base, setup.task_vectors, density, lam)),
            "own fine-tune": np.array([setup.test(setup.base)[0], *own])}


def plot_merge_point(result: dict):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(result["tasks"]))
    ax.bar(x - 0.27, result["own fine-tune"], 0.27, color="lightgrey", label="own model (θ0 for original)")
    ax.bar(x, result["task arithmetic"], 0.27, label=f"task arithmetic, λ = {result['lam']:.2f}")
    ax.bar(x + 0.27, result["TIES"], 0.27, label=f"TIES, density {result['density']:.2f}, same λ")
    ax.set_xticks(x, result["tasks"])
    ax.set(ylabel="test accuracy", ylim=(0, 1.05),
           title=f"mean new tasks: TA {result['task arithmetic'][1:].mean():.3f}, TIES {result['TIES'][1:].mean():.3f}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig
