"""Chapter 04 (replay): the experiments behind the notebook's tables, plots and playground, as pure functions."""

from __future__ import annotations

import functools
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, data, models, train
from cl_lab.methods.base import Method
from cl_lab.methods.generative import GenerativeReplay
from cl_lab.methods.replay import DER, ER, POLICIES, ReplayBuffer


@functools.lru_cache(maxsize=2)
def class_il_stream(n_train: int | None = None):
    """Split MNIST, 5 tasks of 2 digits, Class-IL (one 10-way head, no task id at test time); loaded once."""
    return data.split_mnist(5, "class", n_train=n_train)


def final_accuracy(method: Method | None, *, steps: int, hidden: tuple[int, ...], seed: int,
                   batch_size: int = 64, stream=None) -> train.Run:
    stream = stream or class_il_stream()
    torch.manual_seed(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    return train.fit(model, stream, method, steps=steps, batch_size=batch_size, seed=seed, progress=False)


def buffer_sweep(sizes: list[int], policies: tuple[str, ...] = POLICIES, seeds: tuple[int, ...] = (0, 1), *,
                 steps: int = 100, hidden: tuple[int, ...] = (100,), replay_ratio: float = 0.5) -> pd.DataFrame:
    """Class-IL final average accuracy for every (policy, buffer size, seed); one row each."""
    rows = []
    for policy in policies:
        for size in sizes:
            for seed in seeds:
                run = final_accuracy(ER(size, policy, replay_ratio, seed=seed), steps=steps, hidden=hidden, seed=seed)
                rows.append({"policy": policy, "buffer": size, "seed": seed, "accuracy": run.aa,
                             "seconds": run.seconds})
    return pd.DataFrame(rows)


def order_sensitivity(orders: list[tuple[int, ...]], *, buffer_size: int = 200, steps: int = 100,
                      hidden: tuple[int, ...] = (100,), seed: int = 0) -> pd.DataFrame:
    """Class-IL final average accuracy of naive training and ER (reservoir) for each task order; one row per
    (order, method). Same seed, same buffer, same steps: only the order in which the digit pairs arrive moves."""
    rows = []
    for order in orders:
        stream = class_il_stream().reordered(order)
        for name, method in (("naive", None), ("ER", ER(buffer_size, "reservoir", 0.5, seed=seed))):
            run = final_accuracy(method, steps=steps, hidden=hidden, seed=seed, stream=stream)
            rows.append({"order": "→".join(str(i) for i in order), "method": name, "accuracy": run.aa})
    return pd.DataFrame(rows)


def plot_buffer_sweep(table: pd.DataFrame, naive: float | None = None, joint: float | None = None):
    """Mean accuracy (± over seeds) against buffer size, one line per policy, log x axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for policy, part in table.groupby("policy"):
        stats = part.groupby("buffer").accuracy.agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], marker="o", label=policy)
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
    if naive is not None:
        ax.axhline(naive, color="grey", ls=":", label="naive (no buffer)")
    if joint is not None:
        ax.axhline(joint, color="black", ls="--", label="joint training")
    ax.set(xscale="log", xlabel="buffer size M (samples, all classes)", ylabel="Class-IL final accuracy",
           ylim=(0, 1), title="Split MNIST, Class-IL: accuracy against memory")
    ax.legend(fontsize=8)
    return fig


def coin_flip_replay_share(n_new: int, replay_ratio: float, seed: int) -> float:
    """Share of old items in a stream built as in the production note: after each new item, one old item
    is appended when a coin with P(heads) = replay_ratio comes up heads. Returns old / (old + new)."""
    _validate.positive_int("n_new", n_new)
    _validate.in_range("replay_ratio", replay_ratio, 0.0, 1.0)
    gen = torch.Generator().manual_seed(seed)
    n_old = int((torch.rand(n_new, generator=gen) < replay_ratio).sum())
    return n_old / (n_old + n_new)


def reservoir_inclusion(n_items: int, size: int, trials: int, checkpoints: list[int]) -> pd.DataFrame:
    """For each checkpoint t, how often each of the first t stream items is in a reservoir buffer of
    ``size`` after t items, over ``trials`` independent streams. Rows: t, item, frequency."""
    counts = {t: np.zeros(t) for t in checkpoints}
    for trial in range(trials):
        buf = ReplayBuffer(size, "reservoir", seed=trial)
        seen = 0
        for t in sorted(checkpoints):
            ids = torch.arange(seen, t, dtype=torch.float32)[:, None]  # item id as the feature
            buf.add(ids, torch.zeros(len(ids), dtype=torch.long), torch.zeros(len(ids), dtype=torch.long))
            seen = t
            counts[t][buf.x[:, 0].long().numpy()] += 1
    return pd.DataFrame([{"t": t, "item": i, "frequency": c / trials}
                         for t, row in counts.items() for i, c in enumerate(row)])


def step_seconds(method_factory, *, steps: int, hidden: tuple[int, ...], repeats: int = 2) -> float:
    """Best-of-``repeats`` wall-clock seconds per training step on Class-IL split MNIST."""
    best = float("inf")
    for r in range(repeats):
        run = final_accuracy(method_factory(), steps=steps, hidden=hidden, seed=r)
        best = min(best, run.seconds / (steps * 5))
    return best


def playground(policy: str = "herding", buffer_size: int = 100, seed: int = 0, steps: int = 60,
               hidden: tuple[int, ...] = (100,)) -> dict:
    """One Class-IL run of ER with ``policy`` and ``buffer_size``: the accuracy matrix and the buffer."""
    method = ER(buffer_size, policy, seed=seed)
    start = time.perf_counter()
    run = final_accuracy(method, steps=steps, hidden=hidden, seed=seed)
    return {"policy": policy, "buffer_size": buffer_size, "R": run.R, "accuracy": run.aa,
            "class_counts": method.buffer.class_counts(), "seconds": time.perf_counter() - start}


def plot_playground(result: dict):
    from cl_lab import plots

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    plots.accuracy_matrix(result["R"], ax=ax1)
    ax1.set_title(f"{result['policy']}, M = {result['buffer_size']}: accuracy {result['accuracy']:.2f}")
    counts = result["class_counts"]
    ax2.bar(list(counts), list(counts.values()))
    ax2.set(xlabel="class", ylabel="items in buffer", title="what the buffer holds at the end", xticks=range(10))
    fig.tight_layout()
    return fig


def compare_methods(factories: dict, seeds: tuple[int, ...], *, steps: int, hidden: tuple[int, ...]) -> pd.DataFrame:
    """Final Class-IL accuracy of each named method factory over seeds."""
    rows = []
    for name, factory in factories.items():
        for seed in seeds:
            run = final_accuracy(factory(seed), steps=steps, hidden=hidden, seed=seed)
            rows.append({"method": name, "seed": seed, "accuracy": run.aa, "seconds": run.seconds})
    return pd.DataFrame(rows)


def der_factories(buffer_size: int) -> dict:
    return {"ER": lambda s: ER(buffer_size, seed=s),
            "DER": lambda s: DER(buffer_size, alpha=0.5, seed=s),
            "DER++": lambda s: DER(buffer_size, alpha=0.5, beta=0.5, seed=s)}


def generative_factories(buffer_size: int) -> dict:
    return {"GR, tiny VAE (latent 2, hidden 32)": lambda s: GenerativeReplay(hidden=32, latent=2, seed=s),
            "GR, VAE (latent 16, hidden 200)": lambda s: GenerativeReplay(hidden=200, latent=16, seed=s),
            f"ER, M = {buffer_size}": lambda s: ER(buffer_size, seed=s)}


def show_samples(method: GenerativeReplay, n: int = 16):
    """A grid of the generator's samples with the labels the old classifier gives them."""
    x = method.old_vae.sample(n, torch.Generator().manual_seed(0))
    y = method.old_model(x).argmax(1)
    fig, axes = plt.subplots(2, n // 2, figsize=(n * 0.6, 1.6))
    for ax, img, label in zip(axes.flat, x, y, strict=True):
        ax.imshow(img.reshape(28, 28).cpu(), cmap="gray")
        ax.set_title(int(label), fontsize=8)
        ax.axis("off")
    return fig
