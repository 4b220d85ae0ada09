"""Chapter 03 helpers: importance during vs after training (SI, EWC's Fisher, MAS), SI under noisy
gradients, the two-task c sweep, LwF's input dependence, SI and online EWC without task boundaries, and their
plots. Results are memoised in-process by their full configuration.

They run on the CPU on purpose, whatever ``DEVICE`` the notebook picks: small two-task runs of a 100 × 100 MLP
(seconds each), step and consolidation costs timed where seconds follow arithmetic, importances read with scipy and
NumPy. The chapter's five-task tables take the notebook's device."""

from __future__ import annotations

import copy
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from cl_lab import _validate, data, fisher, models, plots, timing, train
from cl_lab.chapters.ch02 import backward_calls, mnist, two_task_stream
from cl_lab.data.streams import Stream, Task
from cl_lab.methods.base import Context
from cl_lab.methods.distillation import LwF
from cl_lab.methods.regularization import EWC, MAS, SI, output_sensitivity
from cl_lab.methods.taskfree import ConsolidateEvery


def first_task_only(stream: Stream) -> Stream:
    return Stream(stream.name, stream.scenario, stream.tasks[:1], stream.n_out, stream.input_shape,
                  eval_tasks=stream.tasks)


def second_task_only(stream: Stream) -> Stream:
    return Stream(stream.name, stream.scenario, stream.tasks[1:], stream.n_out, stream.input_shape,
                  eval_tasks=stream.tasks)


def _full_loss(model, task: Task) -> float:
    """The task's training loss on all its training samples: the loss SI's path integral follows."""
    with torch.no_grad():
        return F.cross_entropy(model(task.x_train), task.y_train).item()


@lru_cache(maxsize=16)
def si_first_task(scenario: str = "domain", hidden: tuple[int, ...] = (100, 100), steps: int = 150, seed: int = 0,
                  batch_size: int = 128, lr: float = 1e-3, optimizer: str = "adam"):
    """Train task 1 with SI attached: (stream, model, si, seconds, loss before, loss after)."""
    stream = two_task_stream(scenario)
    torch.manual_seed(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    before = _full_loss(model, stream.tasks[0])
    si = SI(c=0.0)
    run = train.fit(model, first_task_only(stream), si, steps=steps, batch_size=batch_size, lr=lr,
                    optimizer=optimizer, seed=seed, device="cpu", progress=False)
    return stream, model, si, run.seconds, before, _full_loss(model, stream.tasks[0])


@lru_cache(maxsize=8)
def importances(scenario: str = "domain", hidden: tuple[int, ...] = (100, 100), steps: int = 150, seed: int = 0,
                n_samples: int = 500) -> dict:
    """SI's Ω (accumulated while training task 1), the exact Fisher and MAS (computed after it, on a seeded random
    draw of ``n_samples`` task-1 training samples)."""
    stream, model, si, _, _, _ = si_first_task(scenario, hidden, steps, seed)
    x, y, _ = stream.tasks[0].sample(n_samples, seed)
    return {"SI": fisher.flatten(si.importance), "Fisher": fisher.flatten(fisher.fisher_diagonal(model, x, y)),
            "MAS": fisher.flatten(output_sensitivity(model, x))}


def plot_importance_scatter(imp: dict, n_points: int = 4000, seed: int = 0):
    """Log-log scatter of the three importances per parameter (a random subsample of parameters)."""
    gen = np.random.default_rng(seed)
    idx = gen.choice(len(imp["SI"]), size=min(n_points, len(imp["SI"])), replace=False)
    pairs = (("Fisher", "SI"), ("Fisher", "MAS"), ("MAS", "SI"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (a, b) in zip(axes, pairs, strict=True):
        xa, xb = imp[a].numpy()[idx], imp[b].numpy()[idx]
        keep = (xa > 0) & (xb > 0)
        ax.loglog(xa[keep], xb[keep], ".", ms=2, alpha=0.4)
        ax.set(xlabel=a, ylabel=b)
    fig.tight_layout()
    return fig


@lru_cache(maxsize=16)
def si_path_test(batch_size: int, lr: float, steps: int = 150, seed: int = 0, hidden: tuple[int, ...] = (100, 100),
                 optimizer: str = "sgd") -> dict:
    """Σω against the actual decrease of the task-1 training loss, for one batch size and learning rate."""
    _, _, si, _, before, after = si_first_task("domain", hidden, steps, seed, batch_size, lr, optimizer)
    imp = importances("domain", hidden, 150, seed)
    omega_sum = sum(v.sum().item() for v in si.last_omega.values())
    return {"batch_size": batch_size, "lr": lr, "sum_omega": omega_sum, "loss_decrease": before - after,
            "ratio": omega_sum / max(before - after, 1e-12),
            "spearman_vs_fisher": spearmanr(fisher.flatten(si.importance).numpy(), imp["Fisher"].numpy()).statistic}


class _FrozenSI(SI):
    """An SI whose importance is given (the sweep reuses it); it does not consolidate again."""

    def on_task_end(self, ctx) -> None:
        pass


@lru_cache(maxsize=512)
def c_point(c: float, scenario: str = "domain", hidden: tuple[int, ...] = (100, 100), steps: int = 150,
            seed: int = 0) -> dict:
    """Train task 1 with SI, then task 2 with penalty strength c: old- and new-task accuracy."""
    _validate.non_negative("c", c)
    stream, model, si, _, _, _ = si_first_task(scenario, tuple(hidden), steps, seed)
    frozen = _FrozenSI(c=c, xi=si.xi)
    frozen.importance, frozen.anchor = si.importance, si.anchor
    run = train.fit(copy.deepcopy(model), second_task_only(stream), frozen, steps=steps, seed=seed, device="cpu",
                    progress=False)
    return {"c": c, "scenario": scenario, "old": float(run.R[0, 0]), "new": float(run.R[0, 1])}


def c_sweep_point(c: float, scenario: str = "domain", curve_cs: tuple = (), **kwargs) -> dict:
    """The widget's callback: one new c point and the (cached) reference curve."""
    return {"point": c_point(float(c), scenario, **kwargs),
            "curve": [c_point(float(v), scenario, **kwargs) for v in curve_cs]}


def plot_c_sweep(result: dict):
    point = result["point"]
    return plots.strength_sweep(result["curve"], point, "c", "c", f"SI, {point['scenario']}-IL")


def permute_pixels(task: Task, seed: int = 0) -> Task:
    """The same task with one fixed pixel permutation applied: inputs unlike any digit."""
    perm = torch.randperm(task.x_train.shape[1], generator=torch.Generator().manual_seed(seed))
    return Task(task.id, f"{task.name} (permuted)", task.x_train[:, perm], task.y_train, task.x_test[:, perm],
                task.y_test, task.classes)


@lru_cache(maxsize=32)
def lwf_input_test(permuted_second: bool, alpha: float, hidden: tuple[int, ...] = (100, 100), steps: int = 150,
                   seed: int = 0, temperature: float = 2.0) -> dict:
    """Old-task accuracy after task 2 with LwF(alpha) when task 2's inputs are digits or permuted pixels."""
    stream, model, _, _, _, _ = si_first_task("domain", tuple(hidden), steps, seed)
    second = permute_pixels(stream.tasks[1], seed) if permuted_second else stream.tasks[1]
    two = Stream(stream.name, "domain", [stream.tasks[0], second], stream.n_out, stream.input_shape)
    lwf = LwF(alpha=alpha, temperature=temperature)
    lwf.on_task_end(Context(model, two, two.tasks[0], 0, 0, 0, None, torch.device("cpu"), 128, None))
    teacher, student = lwf.old_model, copy.deepcopy(model)  # fit's task end will replace lwf.old_model
    run = train.fit(student, second_task_only(two), lwf, steps=steps, seed=seed, device="cpu", progress=False)
    return {"permuted": permuted_second, "alpha": alpha, "old": float(run.R[0, 0]), "new": float(run.R[0, 1]),
            "drift on task-2 inputs": output_drift(teacher, student, second.x_test),
            "drift on task-1 inputs": output_drift(teacher, student, stream.tasks[0].x_test),
            "teacher confidence on task-2 inputs": mean_top_probability(teacher, second.x_test),
            "teacher confidence on task-1 inputs": mean_top_probability(teacher, stream.tasks[0].x_test)}


@torch.no_grad()
def mean_top_probability(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over inputs x [N, D] of the model's largest class probability (1/C = uniform, 1 = certain)."""
    return F.softmax(model(x), dim=1).max(dim=1).values.mean().item()


@torch.no_grad()
def output_drift(old: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean KL(p_old ‖ p_new) over inputs x [N, D]: how far the function moved where x lives."""
    log_old, log_new = F.log_softmax(old(x), dim=1), F.log_softmax(new(x), dim=1)
    return F.kl_div(log_new, log_old, log_target=True, reduction="batchmean").item()


def step_costs(steps: int = 60, hidden: tuple[int, ...] = (100, 100), seed: int = 0, repeats: int = 3) -> dict:
    """Seconds per training step on task 2 for naive and each method with its penalty active: the best of
    ``repeats`` interleaved runs (``cl_lab.timing.best_times``), so load from other processes hits every method
    alike and mostly drops out."""
    stream, model, si, _, _, _ = si_first_task("domain", tuple(hidden), 150, seed)
    task1 = stream.tasks[0]
    x, y, _ = task1.sample(500, seed)
    ewc, mas, lwf = EWC(lam=1e3), MAS(lam=1.0), LwF()
    ewc.consolidate(model, x, y)
    mas.consolidate(model, x)
    lwf.on_task_end(Context(model, stream, task1, 0, 0, 0, None, torch.device("cpu"), 128, None))
    frozen_si = _FrozenSI(c=1.0)
    frozen_si.importance, frozen_si.anchor = si.importance, si.anchor
    methods = {"naive": None, "EWC": ewc, "SI": frozen_si, "MAS": mas, "LwF": lwf}
    for m in (ewc, mas, lwf):
        m.on_task_end = lambda ctx: None  # time the steps only, not a new consolidation
    second = second_task_only(stream)

    def train_with(method):
        return lambda: train.fit(copy.deepcopy(model), second, method, steps=steps, seed=seed, device="cpu",
                                 progress=False)

    best = timing.best_times({name: train_with(m) for name, m in methods.items()}, repeats=repeats, warmup=0)
    return {name: seconds / steps for name, seconds in best.items()}


def consolidation_costs(hidden: tuple[int, ...] = (100, 100), seed: int = 0, n_samples: int = 500,
                        repeats: int = 5) -> pd.DataFrame:
    """What each method pays once per task, after task 1: backward passes (counted) and seconds (best of
    ``repeats`` interleaved rounds). SI folds ω into Ω and copies the weights; EWC computes the exact Fisher and
    MAS its output sensitivity on a seeded random draw of ``n_samples`` task-1 samples."""
    stream, model, _, _, _, _ = si_first_task("domain", tuple(hidden), 150, seed)
    x, y, _ = stream.tasks[0].sample(n_samples, seed)
    si = SI(c=1.0)

    def si_consolidation():
        si.begin_task(model)
        si.consolidate(model)

    work = {"SI": si_consolidation, "EWC (exact Fisher)": lambda: EWC(lam=1.0).consolidate(model, x, y),
            "MAS": lambda: MAS(lam=1.0).consolidate(model, x)}
    seconds = timing.best_times(work, repeats=repeats)
    return pd.DataFrame({"backward passes": {name: backward_calls(fn) for name, fn in work.items()},
                         "ms (best of interleaved runs)": {name: 1e3 * s for name, s in seconds.items()}})


TASK_FREE_METHODS = ("naive", "SI", "EWC online")


@lru_cache(maxsize=64)
def task_free_run(method: str, every: int | None, strength: float = 1.0, scenario: str = "domain",
                  hidden: tuple[int, ...] = (100, 100), steps: int = 100, seed: int = 0) -> dict:
    """Five-task split MNIST with ``method`` consolidating at the true task ends (``every=None``) or, told no
    boundaries, every ``every`` steps (``ConsolidateEvery``). ``strength`` is SI's c or EWC's λ."""
    _validate.one_of("method", method, TASK_FREE_METHODS)
    _validate.non_negative("strength", strength)
    if every is not None:
        _validate.positive_int("every", every)
    stream = data.split(mnist(), 5, scenario)
    inner = {"naive": None, "SI": SI(c=strength), "EWC online": EWC(lam=strength, mode="online", seed=seed)}[method]
    wrapped = inner if inner is None or every is None else ConsolidateEvery(inner, every)
    torch.manual_seed(seed)
    run = train.fit(models.MLP(stream.input_dim, hidden, stream.n_out), stream, wrapped, steps=steps, seed=seed,
                    device="cpu", progress=False)
    row = {"method": method, "consolidate": "at task ends" if every is None else f"every {every}",
           "every": every, "strength": strength, "AA": run.aa, "task 1 at the end": float(run.R[-1, 0]),
           "each task just learnt": float(run.R.diagonal().mean())}
    if isinstance(wrapped, ConsolidateEvery):
        row["ms per consolidation"] = 1e3 * wrapped.consolidation_seconds / max(wrapped.consolidations, 1)
    if method == "SI":
        row["Σ importance"] = sum(v.sum().item() for v in inner.importance.values())  # ΣΩ
    if method == "EWC online":
        row["Σ importance"] = sum(v.sum().item() for v in inner.fishers[0].values())  # ΣF̃, the running Fisher
    return row


def plot_task_free(table: pd.DataFrame, steps: int):
    """SI's AA against its consolidation interval, beside SI at the true task ends and naive."""
    si = table[(table.method == "SI") & table.every.notna() & (table.strength == 1.0)].sort_values("every")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(si.every, si.AA, "o-", label="SI (c = 1), told no boundaries")
    at_ends = table[table.every.isna()].set_index("method").AA
    ax.axhline(at_ends["SI"], ls="--", color="C0", label="SI at the true task ends")
    ax.axhline(at_ends["naive"], ls=":", color="k", label="naive")
    ax.axvline(steps, color="0.7", lw=1)
    ax.set(xscale="log", xlabel="consolidate every … steps (grey: the true task length)", ylabel="AA after 5 tasks",
           title="SI without task boundaries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
