"""Chapter 05 (GEM and A-GEM): geometry, audit, cost and the permuted-MNIST comparison, as pure functions."""

from __future__ import annotations

import functools
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, data, models, train
from cl_lab.methods.base import Context, Method, Naive
from cl_lab.methods.projection import AGEM, GEM, agem_project, gem_project
from cl_lab.methods.replay import ER


@functools.lru_cache(maxsize=8)
def permuted_stream(n_tasks: int = 5, n_train: int = 1000, seed: int = 0):
    """GEM's permuted-MNIST protocol scaled down: ``n_tasks`` tasks of ``n_train`` samples, Domain-IL
    (built once per setting; methods only read it)."""
    return data.permuted_mnist(n_tasks, n_train=n_train, seed=seed)


def fit_protocol(method: Method | None, stream, *, seed: int, hidden=(100, 100), batch_size: int = 10,
                 lr: float = 0.1, device: str | torch.device = "auto") -> train.Run:
    """One pass over each task (steps = n_train / batch_size), plain SGD, as in GEM's experiments, on ``device``."""
    torch.manual_seed(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    steps = len(stream.tasks[0].y_train) // batch_size
    return train.fit(model, stream, method, steps=steps, batch_size=batch_size, lr=lr, optimizer="sgd",
                     seed=seed, device=device, progress=False)


def compare(factories: dict, seeds: tuple[int, ...], *, n_tasks: int = 5, n_train: int = 1000,
            hidden=(100, 100), device: str | torch.device = "auto") -> pd.DataFrame:
    """ACC / BWT / FWT and seconds of each named method factory on the scaled GEM protocol."""
    rows = []
    for seed in seeds:
        stream = permuted_stream(n_tasks, n_train, seed)
        for name, factory in factories.items():
            run = fit_protocol(factory(seed), stream, seed=seed, hidden=hidden, device=device)
            rows.append({"method": name, "seed": seed, "ACC": run.aa, "BWT": run.bwt, "FWT": run.fwt,
                         "seconds": run.seconds})
    return pd.DataFrame(rows)


def audit(method_cls, *, seed: int = 0, memory_per_task: int = 256, n_tasks: int = 5, n_train: int = 1000,
          tolerance: float = 1e-3, device: str | torch.device = "auto") -> dict:
    """Train with ``audit=True``; summarise how often projection fired and how many (step, old task) pairs
    ended with ⟨g̃, g_k⟩ < −tolerance·max|⟨g, g_k⟩| (sign violations after projection). The default
    tolerance matches GEM's ridge eps = 1e-3, which lets ⟨g̃, g_k⟩ reach about −eps·v_k."""
    method = method_cls(memory_per_task=memory_per_task, audit=True, seed=seed)
    run = fit_protocol(method, permuted_stream(n_tasks, n_train, seed), seed=seed, device=device)
    table = method.audit_table()
    steps = table.groupby("step").fired.first()
    scale = table.dot_before.abs().max()
    violations = table.dot_after < -tolerance * scale
    return {"method": method.name, "steps audited": len(steps), "projection fired": float(steps.mean()),
            "(step, old task) pairs": len(table), "violations": int(violations.sum()),
            "violated before projection": int((table.dot_before < 0).sum()),
            "worst ⟨g̃, g_k⟩ / max|⟨g, g_k⟩|": float(table.dot_after.min() / scale), "ACC": run.aa, "table": table}


def plot_geometry(g: torch.Tensor, G: torch.Tensor, margin: float = 0.0):
    """2-D picture: g, each g_k, the feasible cone {v : ⟨v, g_k⟩ ≥ 0 ∀k}, and both projections."""
    gem = gem_project(g, G, margin=margin, eps=0.0)
    agem = agem_project(g, G.mean(0))
    fig, ax = plt.subplots(figsize=(5, 5))
    grid = torch.linspace(-3, 3, 241)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1).double()  # [N, 2]
    feasible = (pts @ G.T >= 0).all(1).reshape(xx.shape)
    ax.contourf(xx, yy, feasible.double(), levels=[0.5, 1.5], colors=["#cfe8cf"])
    arrows = [(g, "g (new batch)", "C3"), (gem, "GEM g̃", "C2"), (agem, "A-GEM g̃", "C1"),
              (G.mean(0), "g_ref (mean)", "C7")] + [(gk, f"g_{k + 1} (old task)", "C0") for k, gk in enumerate(G)]
    for vec, label, color in arrows:
        ax.annotate("", vec.tolist(), (0, 0), arrowprops={"arrowstyle": "->", "color": color, "lw": 2})
        ax.text(*(vec * 1.08).tolist(), label, color=color, fontsize=9)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title="green: every ⟨v, g_k⟩ ≥ 0")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    return fig, gem, agem


def _context(model, stream, task_index: int) -> Context:
    """A loop context on the CPU, where ``step_cost`` times its steps on purpose (see its docstring)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Context(model, stream, stream.tasks[task_index], task_index, 0, 0, opt, torch.device("cpu"), 10,
                   torch.Generator().manual_seed(0))


def step_cost(ks: list[int], *, memory_per_task: int = 256, batch_size: int = 10, hidden=(100, 100),
              repeats: int = 30, remeasure_above: dict[str, float] | None = None,
              max_rounds: int = 3) -> pd.DataFrame:
    """Best-of-``repeats`` seconds of one training step (forward, backward, projection, SGD step) with K old tasks in
    memory, for naive, ER (half of each batch from a reservoir of K·``memory_per_task``), A-GEM (g_ref on a
    batch-size draw), GEM on whole memories (the paper) and GEM on a batch-size draw per task. Rows: K, method,
    seconds, ratio to naive, and the samples the step sends through the network (counted by a forward hook,
    every forward pass summed: the robust quantity that load cannot change). It times the CPU on purpose, whatever
    device the chapter trains on: there a step's seconds follow its arithmetic, which is what the ratios compare.

    Load elsewhere on the machine only adds time, and a burst of it can outlast one round. With
    ``remeasure_above`` ({method name: ratio to naive at the largest K}), a round whose ratios exceed a bound is
    followed by another (at most ``max_rounds`` in all), each step keeping its fastest time over every round;
    a method that is really slower fails its bound on every round."""
    _validate.positive_int("repeats", repeats)
    _validate.positive_int("max_rounds", max_rounds)
    setups = _cost_setups(ks, memory_per_task, batch_size, hidden)
    samples = [_samples_per_step(*setup[1:]) for setup in setups]
    best = [float("inf")] * len(setups)
    for round_ in range(1, max_rounds + 1):
        best = [min(b, t) for b, t in zip(best, _time_round(setups, repeats), strict=True)]
        table = _cost_table(setups, best, samples)
        over = _over_bounds(table, remeasure_above or {})
        if not over:
            break
        if round_ < max_rounds:
            print(f"machine busy? {', '.join(over)} above bound after round {round_}: measuring again")
    return table


def _cost_setups(ks: list[int], memory_per_task: int, batch_size: int, hidden) -> list[tuple]:
    """One (K, method, ctx, batch) per K and method, memories filled with K old tasks and warmed up."""
    stream = permuted_stream(max(ks) + 1, n_train=max(memory_per_task, batch_size))
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    setups = []
    for k in ks:
        task = stream.tasks[k]
        batch = task.sample(batch_size, seed=k)  # a seeded random draw: x [B, D], y [B], t [B]
        sampled_gem = GEM(memory_per_task, memory_batch=batch_size)
        sampled_gem.name = f"GEM ({batch_size} memories per task per step)"
        replay = ER(memory_per_task * k)
        for old in stream.tasks[:k]:
            replay.buffer.add(*old.sample(memory_per_task, seed=old.id))
        for method in (Naive(), replay, AGEM(memory_per_task), GEM(memory_per_task), sampled_gem):
            ctx = _context(model, stream, k)
            for old in stream.tasks[:k]:
                ctx.task = old
                if not isinstance(method, ER):  # ER's reservoir is filled above
                    method.on_task_end(ctx)
            ctx.task = task
            train._train_step(ctx, [method], *batch)  # warm-up
            setups.append((k, method, ctx, batch))
    return setups


def _samples_per_step(method: Method, ctx: Context, batch: tuple) -> int:
    """Rows that one training step sends through the network, summed over its forward passes."""
    rows = []
    hook = ctx.model.register_forward_pre_hook(lambda _module, args: rows.append(len(args[0])))
    try:
        train._train_step(ctx, [method], *batch)
    finally:
        hook.remove()
    return sum(rows)


def _time_round(setups: list[tuple], repeats: int) -> list[float]:
    """Fastest of ``repeats`` timed steps per setup, round-robin so a burst of load hits every method alike."""
    times = [[] for _ in setups]
    for _ in range(repeats):
        for i, (_, method, ctx, batch) in enumerate(setups):
            start = time.perf_counter()
            train._train_step(ctx, [method], *batch)
            times[i].append(time.perf_counter() - start)
    return [float(np.min(ts)) for ts in times]


def _cost_table(setups: list[tuple], seconds: list[float], samples: list[int]) -> pd.DataFrame:
    table = pd.DataFrame([{"K": k, "method": method.name, "seconds": s, "samples per step": n}
                          for (k, method, _, _), s, n in zip(setups, seconds, samples, strict=True)])
    naive = table[table.method == "naive"].set_index("K").seconds
    table["ratio to naive"] = table.seconds / table.K.map(naive)
    return table


def _over_bounds(table: pd.DataFrame, bounds: dict[str, float]) -> list[str]:
    last = table[table.K == table.K.max()].set_index("method")["ratio to naive"]
    unknown = set(bounds) - set(last.index)
    if unknown:
        raise ValueError(f"remeasure_above names unknown methods {sorted(unknown)}; allowed: {list(last.index)}")
    return [name for name, bound in bounds.items() if last[name] > bound]


def plot_step_cost(table: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, part in table.groupby("method"):
        ax.plot(part.K, part["ratio to naive"], marker="o", label=name)
    ax.set(xlabel="old tasks in memory K", ylabel="step time / naive step", title="cost of one step")
    ax.legend()
    return fig


def playground(memory_per_task: int = 64, seed: int = 0, n_tasks: int = 3, n_train: int = 300,
               device: str | torch.device = "auto") -> dict:
    """GEM and A-GEM with ``memory_per_task`` memories on a small permuted-MNIST stream: ACC and BWT."""
    stream = permuted_stream(n_tasks, n_train, seed)
    rows = []
    for method in (GEM(memory_per_task, seed=seed), AGEM(memory_per_task, seed=seed)):
        run = fit_protocol(method, stream, seed=seed, device=device)
        rows.append({"method": method.name, "ACC": run.aa, "BWT": run.bwt, "seconds": run.seconds})
    return {"memory_per_task": memory_per_task, "table": pd.DataFrame(rows)}


def plot_playground(result: dict):
    table = result["table"]
    fig, ax = plt.subplots(figsize=(5, 3))
    pos = np.arange(len(table))
    ax.bar(pos - 0.2, table.ACC, 0.4, label="ACC")
    ax.bar(pos + 0.2, table.BWT, 0.4, label="BWT")
    ax.set_xticks(pos, table.method)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(ylim=(-0.5, 1), title=f"{result['memory_per_task']} memories per task")
    ax.legend()
    return fig
