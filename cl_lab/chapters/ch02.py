"""Chapter 02 helpers: the two-parameter toy, two-task λ sweeps, and their plots.

Every function here is pure given its arguments (results are memoised in-process by their full
configuration), so the notebook's widgets can call them and tests can check them headlessly.

They run on the CPU on purpose, whatever ``DEVICE`` the notebook picks: small two-task runs of a 100 × 100 MLP
(seconds each), whose models and Fishers the notebook then reads with CPU tensors, scipy and NumPy, and whose
numbers the chapter's claims were measured on. The chapter's five-task runs take the notebook's device.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from cl_lab import _validate, data, fisher, models, plots, train
from cl_lab.data.streams import Stream
from cl_lab.fisher import ESTIMATES
from cl_lab.methods.regularization import EWC

SCENARIOS = ("task", "domain", "class")


# ---------------------------------------------------------------- the two-parameter toy
def toy_task(rho: float = 0.9, n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic-regression data with two correlated features (correlation ``rho``): x [n, 2], y [n]."""
    _validate.in_range("rho", rho, -0.99, 0.99)
    gen = torch.Generator().manual_seed(seed)
    cov = torch.tensor([[1.0, rho], [rho, 1.0]])
    x = torch.randn(n, 2, generator=gen) @ torch.linalg.cholesky(cov).T
    w_true = torch.tensor([1.5, 0.5])
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w_true)).long()
    return x, y


def toy_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean logistic loss for weights w [..., 2] (broadcast over a grid) -> [...]."""
    z = w @ x.T  # [..., n]
    return F.binary_cross_entropy_with_logits(z, y.float().expand_as(z), reduction="none").mean(-1)


def toy_fit(x: torch.Tensor, y: torch.Tensor, steps: int = 500) -> torch.Tensor:
    """θ* of the toy task by Newton's method (the loss is convex): [2]."""
    w = torch.zeros(2)
    for _ in range(steps if steps < 50 else 50):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y.float()) / len(y)
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y)
        w = w - torch.linalg.solve(hess, grad)
    return w


def toy_fisher(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Full 2×2 Fisher of the logistic model at w: E_x p(1−p) x xᵀ (equals the Hessian here)."""
    p = torch.sigmoid(x @ w)
    return (x * (p * (1 - p))[:, None]).T @ x / len(x)


def toy_landscape(rho: float = 0.9, span: float = 3.0, resolution: int = 81, seed: int = 0) -> dict:
    """True task-1 loss increase, full quadratic and diagonal quadratic on a grid around θ*."""
    x, y = toy_task(rho, seed=seed)
    w_star = toy_fit(x, y)
    fisher = toy_fisher(w_star, x)
    axis = torch.linspace(-span, span, resolution)
    d = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)  # [R, R, 2] offsets from θ*
    true = toy_loss(w_star + d, x, y) - toy_loss(w_star, x, y)
    full = 0.5 * torch.einsum("...i,ij,...j->...", d, fisher, d)
    diag = 0.5 * torch.einsum("...i,ij,...j->...", d, torch.diag(torch.diag(fisher)), d)
    return {"rho": rho, "w_star": w_star, "fisher": fisher, "offsets": axis, "true": true, "full": full,
            "diag": diag, "x": x, "y": y}


def toy_consolidated_optimum(land: dict, new_centre: torch.Tensor, lam: float, diagonal: bool) -> torch.Tensor:
    """argmin of a new task's bowl ½‖θ − c‖² plus (λ/2)(θ − θ*)ᵀ P (θ − θ*), P the full or diagonal Fisher."""
    p = torch.diag(torch.diag(land["fisher"])) if diagonal else land["fisher"]
    return torch.linalg.solve(torch.eye(2) + lam * p, new_centre + lam * p @ land["w_star"])


def plot_toy(land: dict, optima: dict | None = None):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    o = land["offsets"].numpy()
    levels = np.linspace(0, float(land["true"].max()) * 0.6, 12)
    titles = ("true loss increase of task 1", "½ ΔᵀFΔ (full Fisher)", "½ Σ F_ii Δ_i² (EWC's diagonal)")
    for ax, key, title in zip(axes, ("true", "full", "diag"), titles, strict=True):
        ax.contour(o + land["w_star"][0].item(), o + land["w_star"][1].item(), land[key].numpy(), levels=levels)
        ax.plot(*land["w_star"].numpy(), "k*", ms=10)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("θ₁")
        for name, (theta, style) in (optima or {}).items():
            ax.plot(*theta.numpy(), style, ms=8, label=name)
    axes[0].set_ylabel("θ₂")
    if optima:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- two-task λ sweeps on split MNIST
@lru_cache(maxsize=1)
def mnist() -> data.Dataset:
    """The MNIST dataset, loaded once per process (loading takes seconds; every sweep point reuses it)."""
    return data.load("mnist")


def two_task_stream(scenario: str = "domain", split: int = 2) -> Stream:
    """The first two tasks of split MNIST cut into ``split`` tasks (2: digits 0–4 then 5–9), in ``scenario``."""
    _validate.one_of("scenario", scenario, SCENARIOS)
    full = data.split(mnist(), split, scenario)
    tasks = []
    for new_id, old in enumerate(full.tasks[:2]):
        tasks.append(data.Task(new_id, old.name, old.x_train, old.y_train, old.x_test, old.y_test,
                               old.classes))
    n_out = full.n_out
    return Stream(f"split-mnist {tasks[0].name}→{tasks[1].name}", scenario, tasks, n_out, full.input_shape)


@lru_cache(maxsize=8)
def after_first_task(scenario: str, hidden: tuple[int, ...], steps: int, seed: int, split: int = 2):
    """(two-task stream, model trained on task 1 with clean labels), trained once per setting."""
    stream, _, model = _first_task_model(scenario, hidden, steps, seed, 0.0, split)
    return stream, model


def _noisy_first_task(scenario: str, label_noise: float, seed: int, split: int = 2) -> tuple[Stream, Stream]:
    """The two-task stream, and a one-task stream whose training labels are replaced by a uniformly random
    class of the task with probability ``label_noise`` (test labels stay clean)."""
    stream = two_task_stream(scenario, split)
    task = stream.tasks[0]
    gen = torch.Generator().manual_seed(seed)
    y = task.y_train.clone()  # [N]
    flip = torch.rand(len(y), generator=gen) < label_noise  # [N] bool
    choices = torch.tensor(task.classes)  # the output units task 1 uses
    y[flip] = choices[torch.randint(len(choices), (int(flip.sum()),), generator=gen)]
    noisy = data.Task(task.id, task.name, task.x_train, y, task.x_test, task.y_test, task.classes)
    return stream, Stream(stream.name, scenario, [noisy], stream.n_out, stream.input_shape, eval_tasks=stream.tasks)


def _first_task_model(scenario: str, hidden: tuple[int, ...], steps: int, seed: int, label_noise: float,
                      split: int = 2):
    """(stream, task 1 with the training labels actually used, model) after ``steps`` SGD steps on task 1
    (0: untrained)."""
    stream, first = _noisy_first_task(scenario, label_noise, seed, split)
    torch.manual_seed(seed)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    if steps:
        train.fit(model, first, steps=steps, seed=seed, device="cpu", progress=False)
    return stream, first.tasks[0], model


def empirical_vs_exact(steps: tuple[int, ...] = (0, 20, 150, 600, 1200), label_noise: float = 0.0,
                       scenario: str = "domain", hidden: tuple[int, ...] = (100, 100), seed: int = 0,
                       n_samples: int = 1000) -> pd.DataFrame:
    """The empirical Fisher (dataset labels) against the exact one (labels weighted by p(c|x)) on task 1 after
    each number of training steps, computed on a seeded random draw of ``n_samples`` training samples the model
    has fitted and on the held-out test set. One row per (steps, samples): accuracy (on the labels used), mean
    top probability, Σ empirical / Σ exact, Spearman."""
    _validate.one_of("scenario", scenario, SCENARIOS)
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    rows = []
    for n_steps in steps:
        _validate.non_negative_int("steps", n_steps)
        stream, task, model = _first_task_model(scenario, tuple(hidden), n_steps, seed, label_noise)

        def forward(xb, tb, model=model, stream=stream):
            return stream.mask_logits(model(xb), tb)
        sets = {"training": task.sample(n_samples, seed), "held-out": (task.x_test, task.y_test, task.t_test())}
        for name, (x, y, t) in sets.items():
            est = {e: fisher.flatten(fisher.fisher_diagonal(model, x, y, t, estimate=e, forward=forward))
                   for e in ("exact", "empirical")}  # [P] each
            with torch.no_grad():
                probs = torch.softmax(forward(x, t), 1)  # [N, n_out]
            rows.append({"steps": n_steps, "label noise": label_noise, "samples": name,
                         "accuracy": (probs.argmax(1) == y).float().mean().item(),
                         "mean top probability": probs.max(1).values.mean().item(),
                         "empirical / exact": (est["empirical"].sum() / est["exact"].sum()).item(),
                         "Spearman": spearmanr(est["empirical"].numpy(), est["exact"].numpy()).statistic})
    return pd.DataFrame(rows)


def label_sorted_prefix(task: data.Task, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` training samples of ``task`` once sorted by label, as the offline MNIST file stores its
    images: x [n, D], y [n], t [n]. The wrong way to take a Fisher sample, kept to measure how wrong."""
    _validate.positive_int("n", n)
    order = torch.argsort(task.y_train, stable=True)[:n]  # [n]
    return task.x_train[order], task.y_train[order], task.t_train[order]


def fisher_sample_bias(model: torch.nn.Module, stream: Stream, n: int = 500, seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
                       estimate: str = "exact") -> pd.DataFrame:
    """The Fisher of task 1 on ``n`` samples against the Fisher on all its training samples: from the label-sorted
    prefix, and from seeded random draws (the null control: what sampling alone costs). One row per sample: the
    classes it holds, ‖F_n − F_all‖₂ / ‖F_all‖₂ and ΣF_n / ΣF_all."""
    _validate.one_of("estimate", estimate, ESTIMATES)
    task = stream.tasks[0]

    def forward(xb, tb):
        return stream.mask_logits(model(xb), tb)

    def estimate_on(x, y, t):
        return fisher.flatten(fisher.fisher_diagonal(model, x, y, t, estimate=estimate, forward=forward,
                                                     generator=torch.Generator().manual_seed(0)))  # [P]

    full = estimate_on(task.x_train, task.y_train, task.t_train)  # [P]
    draws = {f"first {n}, label-sorted": label_sorted_prefix(task, n)}
    draws |= {f"random {n}, seed {s}": task.sample(n, s) for s in seeds}
    rows = []
    for name, (x, y, t) in draws.items():
        f = estimate_on(x, y, t)
        rows.append({"sample": name, "classes": int(y.unique().numel()),
                     "relative L2 error": ((f - full).norm() / full.norm()).item(),
                     "mass": (f.sum() / full.sum()).item()})
    return pd.DataFrame(rows).set_index("sample")


def backward_calls(fn) -> int:
    """How many backward passes ``fn()`` runs: calls of ``torch.autograd.grad`` and ``Tensor.backward``."""
    with mock.patch.object(torch.autograd, "grad", wraps=torch.autograd.grad) as grad, \
            mock.patch.object(torch.Tensor, "backward", autospec=True, side_effect=torch.Tensor.backward) as backward:
        fn()
    return grad.call_count + backward.call_count


def floats_held(obj: object) -> int:
    """Floats in every tensor reachable from ``obj``'s attributes through dicts, lists and tuples, each tensor
    counted once: what a method actually keeps in memory, whatever it reports about itself."""
    seen, total, todo = set(), 0, [vars(obj)]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in seen and item.is_floating_point():
                seen.add(id(item))
                total += item.numel()
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return total


def plot_empirical_vs_exact(table: pd.DataFrame):
    """Σ empirical / Σ exact against training steps, one line per sample set, log scale."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, part in table.groupby("samples"):
        ax.plot(part.steps, part["empirical / exact"], marker="o", label=f"{name} samples")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="symlog", yscale="log", xlabel="training steps on task 1",
           ylabel="Σ empirical / Σ exact", title="the empirical Fisher drifts with training")
    ax.legend()
    return fig


@lru_cache(maxsize=32)
def _consolidated(scenario, hidden, steps, seed, estimate, n_samples, split=2):
    stream, model = after_first_task(scenario, hidden, steps, seed, split)
    ewc = EWC(lam=1.0, fisher=estimate, n_samples=n_samples, seed=seed)
    x, y, t = stream.tasks[0].sample(n_samples, seed)
    ewc.consolidate(model, x, y, t, forward=lambda xb, tb: stream.mask_logits(model(xb), tb))
    return ewc


class _Frozen(EWC):
    """An EWC whose Fisher was computed once (the sweep reuses it); it does not re-consolidate."""

    def on_task_end(self, ctx) -> None:
        pass


@lru_cache(maxsize=512)
def lambda_point(lam: float, estimate: str = "exact", scenario: str = "domain", hidden: tuple[int, ...] = (100, 100),
                 steps: int = 150, seed: int = 0, n_samples: int = 500, split: int = 2) -> dict:
    """Train task 1, consolidate with ``estimate``, train task 2 with EWC(λ): old- and new-task accuracy."""
    _validate.non_negative("lam", lam)
    _validate.one_of("estimate", estimate, ESTIMATES)
    stream, model = after_first_task(scenario, tuple(hidden), steps, seed, split)
    base = _consolidated(scenario, tuple(hidden), steps, seed, estimate, n_samples, split)
    ewc = _Frozen(lam=lam, fisher=estimate)
    ewc.fishers, ewc.anchors = base.fishers, base.anchors
    second = Stream(stream.name, scenario, stream.tasks[1:], stream.n_out, stream.input_shape,
                    eval_tasks=stream.tasks)
    run = train.fit(copy.deepcopy(model), second, ewc, steps=steps, seed=seed, device="cpu", progress=False)
    return {"lam": lam, "estimate": estimate, "scenario": scenario, "old": float(run.R[0, 0]),
            "new": float(run.R[0, 1])}


def lambda_curve(estimate: str = "exact", scenario: str = "domain", lams: tuple[float, ...] = (0.0, 1.0, 1e2, 1e4),
                 **kwargs) -> list[dict]:
    return [lambda_point(float(lam), estimate, scenario, **kwargs) for lam in lams]


def summed_batch_recipe(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """The cheat-sheet's loop (source 001), restated: for each batch of ``batch_size`` inputs x [N, D], the
    gradient of the batch's *summed* cross-entropy at the argmax labels, squared and added up; the total
    over all parameters, divided by N. At batch size 1 it is the predicted-label Fisher; beyond that its
    expectation per sample is that Fisher plus (B − 1)·‖ḡ‖² (ḡ the mean gradient), so it grows with B."""
    _validate.positive_int("batch_size", batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])  # [B, C]
        loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
        total += sum(float((g ** 2).sum()) for g in torch.autograd.grad(loss, params))
    return total / len(x)


def sweep_point(lam: float, estimate: str = "exact", scenario: str = "domain", curve_lams: tuple = (),
                **kwargs) -> dict:
    """The widget's callback: one new λ point plus the (cached) reference curve of the same estimate."""
    return {"point": lambda_point(float(lam), estimate, scenario, **kwargs),
            "curve": lambda_curve(estimate, scenario, curve_lams, **kwargs) if curve_lams else []}


def plot_sweep(result: dict):
    point = result["point"]
    return plots.strength_sweep(result["curve"], point, "lam", "λ",
                                f"{point['estimate']} Fisher, {point['scenario']}-IL")


def toy_tradeoff(land: dict, new_centre: torch.Tensor, lams: np.ndarray, diagonal: bool) -> dict:
    """For each λ: the task-1 loss increase (true loss) and the new task's loss at the penalised optimum."""
    x, y, base = land["x"], land["y"], toy_loss(land["w_star"], land["x"], land["y"])
    old, new = [], []
    for lam in lams:
        theta = toy_consolidated_optimum(land, new_centre, float(lam), diagonal)
        old.append((toy_loss(theta, x, y) - base).item())
        new.append(0.5 * (theta - new_centre).pow(2).sum().item())
    return {"lams": np.asarray(lams), "old": np.array(old), "new": np.array(new)}


def kl_vs_quadratic(land: dict, direction: torch.Tensor, scales: np.ndarray) -> dict:
    """Mean KL(p_θ* ‖ p_θ*+sδ) over the toy inputs against ½ s² δᵀFδ, for each scale s."""
    x, w = land["x"], land["w_star"]
    p = torch.sigmoid(x @ w)
    kl, quad = [], []
    for s in scales:
        q = torch.sigmoid(x @ (w + float(s) * direction))
        kl.append((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean().item())
        quad.append(0.5 * float(s) ** 2 * (direction @ land["fisher"] @ direction).item())
    return {"scales": np.asarray(scales), "kl": np.array(kl), "quadratic": np.array(quad)}
