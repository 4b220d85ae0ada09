"""Chapter 04 (replay): the experiments behind the notebook's tables, plots and playground, as pure functions."""

from __future__ import annotations

import functools
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, data, models, timing, train
from cl_lab.device import pick_device
from cl_lab.methods.base import Context, Method
from cl_lab.methods.generative import GenerativeReplay
from cl_lab.methods.replay import DER, ER, POLICIES, ReplayBuffer, replay_split


@functools.lru_cache(maxsize=2)
def class_il_stream(n_train: int | None = None):
    """Split MNIST, 5 tasks of 2 digits, Class-IL (one 10-way head, no task id at test time); loaded once."""
    return data.split_mnist(5, "class", n_train=n_train)


def final_accuracy(method: Method | None, *, steps: int, hidden: tuple[int, ...], seed: int,
                   batch_size: int = 64, stream=None, device: str | torch.device = "auto") -> train.Run:
    """One run of ``method`` (None: naive) from a fresh MLP seeded with ``seed``, on Class-IL split MNIST unless
    another ``stream`` is given: Adam, lr 1e-3, ``steps`` steps of ``batch_size`` per task, on ``device``."""
    stream = stream or class_il_stream()
    torch.manual_seed(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    return train.fit(model, stream, method, steps=steps, batch_size=batch_size, seed=seed, device=device,
                     progress=False)


def buffer_sweep(sizes: list[int], policies: tuple[str, ...] = POLICIES, seeds: tuple[int, ...] = (0, 1), *,
                 steps: int = 100, hidden: tuple[int, ...] = (100,), replay_ratio: float = 0.5,
                 device: str | torch.device = "auto") -> pd.DataFrame:
    """Class-IL final average accuracy for every (policy, buffer size, seed); one row each."""
    rows = []
    for policy in policies:
        for size in sizes:
            for seed in seeds:
                run = final_accuracy(ER(size, policy, replay_ratio, seed=seed), steps=steps, hidden=hidden, seed=seed,
                                     device=device)
                rows.append({"policy": policy, "buffer": size, "seed": seed, "accuracy": run.aa,
                             "seconds": run.seconds})
    return pd.DataFrame(rows)


def order_sensitivity(orders: list[tuple[int, ...]], *, buffer_size: int = 200, steps: int = 100,
                      hidden: tuple[int, ...] = (100,), seed: int = 0,
                      device: str | torch.device = "auto") -> pd.DataFrame:
    """Class-IL final average accuracy of naive training and ER (reservoir) for each task order; one row per
    (order, method). Same seed, same buffer, same steps: only the order in which the digit pairs arrive moves."""
    rows = []
    for order in orders:
        stream = class_il_stream().reordered(order)
        for name, method in (("naive", None), ("ER", ER(buffer_size, "reservoir", 0.5, seed=seed))):
            run = final_accuracy(method, steps=steps, hidden=hidden, seed=seed, stream=stream, device=device)
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


def step_seconds(method_factory, *, steps: int, hidden: tuple[int, ...], repeats: int = 2,
                 device: str | torch.device = "auto") -> float:
    """Best-of-``repeats`` wall-clock seconds per training step on Class-IL split MNIST."""
    best = float("inf")
    for r in range(repeats):
        run = final_accuracy(method_factory(), steps=steps, hidden=hidden, seed=r, device=device)
        best = min(best, run.seconds / (steps * 5))
    return best


def playground(policy: str = "herding", buffer_size: int = 100, seed: int = 0, steps: int = 60,
               hidden: tuple[int, ...] = (100,), device: str | torch.device = "auto") -> dict:
    """One Class-IL run of ER with ``policy`` and ``buffer_size``: the accuracy matrix and the buffer."""
    method = ER(buffer_size, policy, seed=seed)
    start = time.perf_counter()
    run = final_accuracy(method, steps=steps, hidden=hidden, seed=seed, device=device)
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


def compare_methods(setups: dict, seeds: tuple[int, ...], *, steps: int, hidden: tuple[int, ...],
                    device: str | torch.device = "auto") -> pd.DataFrame:
    """Final Class-IL accuracy of each named (method factory, batch size) over seeds, with the training samples
    each step sends through the network (counted by a forward hook over the whole run, so a method's real
    budget is measured, not assumed). Rows: method, seed, accuracy, samples per step, seconds."""
    rows = []
    for name, (factory, batch_size) in setups.items():
        for seed in seeds:
            counted: list[int] = []
            run = _counting_rows(counted, lambda: final_accuracy(factory(seed), steps=steps, hidden=hidden, seed=seed,
                                                                 batch_size=batch_size, device=device))
            rows.append({"method": name, "seed": seed, "accuracy": run.aa,
                         "samples per step": sum(counted) / (steps * len(run.R)), "seconds": run.seconds})
    return pd.DataFrame(rows)


def _counting_rows(counted: list[int], train_fn):
    """Run ``train_fn`` while every forward pass of an ``models.MLP`` with gradients on (training, not
    evaluation) appends its number of rows to ``counted``."""
    def hook(module, args):
        if torch.is_grad_enabled() and isinstance(module, models.MLP):
            counted.append(len(args[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        return train_fn()
    finally:
        handle.remove()


def der_setups(buffer_size: int, new: int = 64) -> dict:
    """ER, DER and DER++ at equal samples per step (``new`` incoming + ``new`` from the buffer), then DER++ as
    published (two full buffer draws) beside ER given the same 2·``new`` buffer samples.
    Values: (method factory of the seed, batch size handed to the loop)."""
    return {
        f"ER ({new} + {new} replayed)": (lambda s: ER(buffer_size, replay_ratio=0.5, seed=s), 2 * new),
        f"DER ({new} + {new} logits)": (lambda s: DER(buffer_size, alpha=0.5, seed=s), new),
        f"DER++ ({new} + {new // 2} logits + {new // 2} labels)":
            (lambda s: DER(buffer_size, alpha=0.5, beta=0.5, replay_batch=new // 2, seed=s), new),
        f"DER++ as published ({new} + {new} + {new})": (lambda s: DER(buffer_size, alpha=0.5, beta=0.5, seed=s), new),
        f"ER ({new} + {2 * new} replayed)": (lambda s: ER(buffer_size, replay_ratio=2 / 3, seed=s), 3 * new),
    }


def replay_step_cost(ratios: tuple[float, ...], *, buffer_size: int = 200, batch_size: int = 64,
                     hidden: tuple[int, ...] = (100,), repeats: int = 20,
                     device: str | torch.device = "auto") -> pd.DataFrame:
    """Cost of one ER training step (batch composition, forward, backward, Adam step) at each replay ratio, on
    Class-IL split MNIST with a full buffer. Rows: replay_ratio, new samples and samples through the network per
    step (counted by a forward hook: the quantity load cannot change), and the best seconds over ``repeats``
    interleaved rounds (``timing.best_times``: load only ever adds time). On a GPU each timed step ends with the
    loss's ``.item()``, so its kernels have finished when the clock stops."""
    stream, device = class_il_stream(), pick_device(device, verbose=False)
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, hidden, stream.n_out).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    task = stream.tasks[1]
    batch = tuple(v.to(device) for v in task.sample(batch_size, seed=1))  # x [B, D], y [B], t [B]
    steps, rows = {}, []
    for r in ratios:
        method = ER(buffer_size, replay_ratio=r)
        method.buffer.add(*(v.to(device) for v in stream.tasks[0].sample(buffer_size, seed=0)))
        ctx = Context(model, stream, task, 1, 0, 0, opt, device, batch_size, torch.Generator().manual_seed(0))
        steps[r] = lambda ctx=ctx, method=method: train._train_step(ctx, [method], *batch)
        counted: list[int] = []
        _counting_rows(counted, steps[r])
        rows.append({"replay_ratio": r, "new samples per step": replay_split(batch_size, r, buffer_size)[0],
                     "samples through the network": sum(counted)})
    best = timing.best_times({str(r): fn for r, fn in steps.items()}, repeats=repeats)
    table = pd.DataFrame(rows).set_index("replay_ratio")
    table["best ms per step"] = [1e3 * best[str(r)] for r in ratios]
    return table


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
