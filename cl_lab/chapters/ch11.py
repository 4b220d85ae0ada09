"""Chapter 11 helpers (editing one fact): a synthetic fact task, a small network whose middle layer is a
key–value memory, ROME's value optimisation, the three axes of edit quality, the one-edit comparison with
fine-tuning (plain, one layer, EWC), sequential and batch edits, and the playground's cached callback.

The network reads a subject embedding x [d] as its "residual stream" z = x, computes a key
k = relu(A z + a) [d_k], writes the value W k [d] back into the stream, h = z + W k, and reads the object
off h with a linear layer: logits = U h + b [n_objects]. W (``model.memory.weight``) is the matrix ROME edits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, wraps

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.device import seed_everything
from cl_lab.methods.editing import batch_update, finetune_on_fact, key_covariance, rome_update
from cl_lab.methods.regularization import EWC


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run with one intra-op thread: the chapter's matrices are tiny (≤ 2,400 × 256), where a second thread saves
    nothing and, on a busy 2-core machine, makes every op wait for a core (measured: 7 ms vs 45 ms per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded(fn: Callable) -> Callable:
    @wraps(fn)
    def run(*args, **kwargs):
        with _one_cpu_thread():
            return fn(*args, **kwargs)
    return run


@dataclass
class FactTask:
    """S facts "subject s → object y_s". Each subject is a random embedding; its training copies and its
    held-out paraphrases are the embedding plus Gaussian noise (the first training copy is the clean one)."""

    subjects: torch.Tensor  # [S, d] the clean subject embeddings
    objects: torch.Tensor  # [S] the stored object of each subject
    x_train: torch.Tensor  # [S, P, d] training copies
    x_para: torch.Tensor  # [S, Q, d] held-out paraphrases, never trained on
    n_objects: int

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def dim(self) -> int:
        return self.subjects.shape[1]

    def to(self, device: torch.device | str) -> FactTask:
        return FactTask(self.subjects.to(device), self.objects.to(device), self.x_train.to(device),
                        self.x_para.to(device), self.n_objects)


def make_facts(n_subjects: int = 400, n_objects: int = 10, dim: int = 64, n_train: int = 6, n_para: int = 4,
               noise: float = 0.3, seed: int = 0) -> FactTask:
    """A random fact table: subjects ~ N(0, I_dim), objects uniform over ``n_objects``, noisy copies."""
    for name, value in (("n_subjects", n_subjects), ("dim", dim), ("n_train", n_train), ("n_para", n_para)):
        _validate.positive_int(name, value)
    if isinstance(n_objects, bool) or not isinstance(n_objects, int) or n_objects < 2:
        raise ValueError(f"n_objects must be an int ≥ 2, got {n_objects!r}")
    _validate.non_negative("noise", noise)
    gen = torch.Generator().manual_seed(seed)
    subjects = torch.randn(n_subjects, dim, generator=gen)
    objects = torch.randint(n_objects, (n_subjects,), generator=gen)
    x_train = subjects[:, None] + noise * torch.randn(n_subjects, n_train, dim, generator=gen)
    x_train[:, 0] = subjects
    x_para = subjects[:, None] + noise * torch.randn(n_subjects, n_para, dim, generator=gen)
    return FactTask(subjects, objects, x_train, x_para, n_objects)


class FactNet(nn.Module):
    """z = x, k = relu(A z + a), h = z + W k, logits = U h + b: one MLP block on a residual stream."""

    def __init__(self, dim: int, key_dim: int, n_objects: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("key_dim", key_dim), ("n_objects", n_objects)):
            _validate.positive_int(name, value)
        self.mlp_in = nn.Linear(dim, key_dim)  # A, a
        self.memory = nn.Linear(key_dim, dim, bias=False)  # W [dim, key_dim]: the key–value memory
        self.readout = nn.Linear(dim, n_objects)  # U, b

    def keys(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., key_dim]
        return torch.relu(self.mlp_in(x))

    def logits_from_value(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Logits when the memory writes ``value`` [..., dim] instead of W k (ROME's v* is optimised so)."""
        return self.readout(x + value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., n_objects]
        return self.logits_from_value(x, self.memory(self.keys(x)))


@_single_threaded
def train_facts(task: FactTask, key_dim: int = 256, steps: int = 150, lr: float = 1e-2, seed: int = 0,
                device: torch.device | str = "cpu") -> FactNet:
    """Store every fact: full-batch Adam on all training copies."""
    _validate.positive_int("steps", steps)
    seed_everything(seed)
    model = FactNet(task.dim, key_dim, task.n_objects).to(device)
    x = task.x_train.to(device).reshape(-1, task.dim)  # [S·P, d]
    y = task.objects.to(device).repeat_interleave(task.x_train.shape[1])  # [S·P]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@lru_cache(maxsize=8)
def trained_setup(seed: int = 0, n_subjects: int = 400, key_dim: int = 256, steps: int = 150,
                  device: str = "cpu") -> tuple[FactTask, dict[str, torch.Tensor]]:
    """The fact task and the trained network's weights for one configuration, computed once per process."""
    task = make_facts(n_subjects, seed=seed)
    model = train_facts(task, key_dim=key_dim, steps=steps, seed=seed, device=device)
    return task.to(device), {n: p.detach().clone() for n, p in model.state_dict().items()}


def load_model(task: FactTask, state: dict[str, torch.Tensor]) -> FactNet:
    key_dim = state["mlp_in.weight"].shape[0]
    model = FactNet(task.dim, key_dim, task.n_objects).to(state["mlp_in.weight"].device)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- keys, values, and the three axes

def _same_length(ids: torch.Tensor, new_objects: torch.Tensor, ids_name: str = "subject_ids") -> None:
    if ids.ndim != 1 or new_objects.ndim != 1 or len(ids) != len(new_objects):
        raise ValueError(f"{ids_name} [N] and new_objects [N] must be 1-D with the same N, got shapes "
                         f"{tuple(ids.shape)} and {tuple(new_objects.shape)}")


@torch.no_grad()
def all_keys(model: FactNet, task: FactTask) -> torch.Tensor:
    """Keys of every training copy of every subject: [S·P, d_k] (what C is estimated from)."""
    return model.keys(task.x_train.reshape(-1, task.dim))


@torch.no_grad()
def subject_keys(model: FactNet, task: FactTask, subject_ids: torch.Tensor) -> torch.Tensor:
    """k* of each subject: its key averaged over its training copies (ROME averages over prefixes, eq. 3):
    [N, d_k]."""
    return model.keys(task.x_train[subject_ids]).mean(1)


@_single_threaded
def value_targets(model: FactNet, task: FactTask, subject_ids: torch.Tensor, new_objects: torch.Tensor,
                  steps: int = 100, lr: float = 0.1, decay: float = 1e-3) -> torch.Tensor:
    """v* for each edit (ROME eq. 4 without the KL term): the value that, written by the memory for every
    training copy of the subject, makes the readout say the new object. One batched Adam run from W k*,
    minimising mean cross-entropy + ``decay`` · ‖v − W k*‖². Returns [N, d]."""
    _validate.positive_int("steps", steps)
    _same_length(subject_ids, new_objects)
    x = task.x_train[subject_ids]  # [N, P, d]
    with torch.no_grad():
        start = model.memory(subject_keys(model, task, subject_ids))  # W k* [N, d]
    value = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([value], lr=lr)
    target = new_objects[:, None].expand(-1, x.shape[1])  # [N, P]
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model.logits_from_value(x, value[:, None, :])  # [N, P, C]
        loss = F.cross_entropy(logits.reshape(-1, task.n_objects), target.reshape(-1), reduction="sum") / x.shape[1]
        (loss + decay * (value - start).pow(2).sum()).backward()
        optimizer.step()
    return value.detach()


def new_objects_for(task: FactTask, subject_ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A new object for each subject, always different from its stored one."""
    gen = torch.Generator().manual_seed(seed + 12345)
    shift = torch.randint(1, task.n_objects, (len(subject_ids),), generator=gen).to(task.objects.device)
    return (task.objects[subject_ids] + shift) % task.n_objects


@torch.no_grad()
def predictions(model: FactNet, task: FactTask) -> dict[str, torch.Tensor]:
    """The predicted object for every clean subject [S] and every held-out paraphrase [S, Q]."""
    return {"subject": model(task.subjects).argmax(-1), "paraphrase": model(task.x_para).argmax(-1)}


def three_axes(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], edited: torch.Tensor,
               new_objects: torch.Tensor) -> dict[str, float]:
    """Reliability: edited subjects now give the new object. Generalisation: so do their held-out
    paraphrases. Locality: every other subject and paraphrase gives the same answer as before the edits."""
    _same_length(edited, new_objects, "edited")
    others = torch.ones(len(before["subject"]), dtype=torch.bool, device=edited.device)
    others[edited] = False

    def same(key: str) -> torch.Tensor:
        return (after[key][others] == before[key][others]).float()

    return {"reliability": (after["subject"][edited] == new_objects).float().mean().item(),
            "generalisation": (after["paraphrase"][edited] == new_objects[:, None]).float().mean().item(),
            "locality": torch.cat([same("subject").reshape(-1), same("paraphrase").reshape(-1)]).mean().item()}


def recall(model: FactNet, task: FactTask) -> dict[str, float]:
    """How well the network stores the fact table: accuracy on clean subjects and on held-out paraphrases."""
    pred = predictions(model, task)
    return {"subjects": (pred["subject"] == task.objects).float().mean().item(),
            "paraphrases": (pred["paraphrase"] == task.objects[:, None]).float().mean().item()}


# ---------------------------------------------------------------- one edit: ROME against fine-tuning

def _edited_copy(task: FactTask, state: dict, delta: torch.Tensor | None = None) -> FactNet:
    model = load_model(task, state)
    if delta is not None:
        with torch.no_grad():
            model.memory.weight += delta
    return model


@_single_threaded
def consolidated_ewc(model: FactNet, task: FactTask, lam: float) -> EWC:
    """EWC with its exact Fisher and anchor computed on every training copy of every stored fact."""
    ewc = EWC(lam=lam)
    ewc.consolidate(model, task.x_train.reshape(-1, task.dim), task.objects.repeat_interleave(task.x_train.shape[1]))
    return ewc


@_single_threaded
def one_edit_comparison(task: FactTask, state: dict, subject_ids: torch.Tensor, *, ridge: float = 1e-3,
                        ft_steps: int = 100, ft_lr: float = 1e-3, ewc: EWC | None = None) -> pd.DataFrame:
    """Each subject in ``subject_ids`` edited on its own, from the same trained network, by ROME (C from all
    training keys), by a rank-one update with C = I, and by fine-tuning on its training copies: every weight,
    the memory W only, every weight with the penalty of ``ewc`` (default: ``consolidated_ewc`` at λ = 10⁵).
    Means over the edits of the three axes, and of the share of W's entries and of all weights the edit changed."""
    base = load_model(task, state)
    before = predictions(base, task)
    C = key_covariance(all_keys(base, task), ridge)
    identity = torch.eye(len(C), dtype=C.dtype, device=C.device)
    new = new_objects_for(task, subject_ids)
    k_star = subject_keys(base, task, subject_ids)
    v_star = value_targets(base, task, subject_ids, new)
    ewc = consolidated_ewc(base, task, 1e5) if ewc is None else ewc
    W = base.memory.weight.detach()
    rows = []
    for i, s in enumerate(subject_ids.tolist()):
        one = subject_ids[i:i + 1]
        x, y = task.x_train[s], new[i].expand(task.x_train.shape[1])
        # each entry builds this edit's model when called (right below), so the loop variables are current
        edits = {"ROME (C from keys)": lambda: _edited_copy(task, state, rome_update(W, C, k_star[i], v_star[i])),
                 "rank-one, C = I": lambda: _edited_copy(task, state, rome_update(W, identity, k_star[i], v_star[i])),
                 "fine-tune all weights": lambda: finetune_on_fact(_edited_copy(task, state), x, y, steps=ft_steps,
                                                                   lr=ft_lr),
                 "fine-tune W only": lambda: _finetune_memory(task, state, x, y, ft_steps, ft_lr),
                 f"fine-tune + EWC λ={ewc.lam:g}": lambda: finetune_on_fact(
                     _edited_copy(task, state), x, y, steps=ft_steps, lr=ft_lr, penalty=ewc.penalty)}
        for name, make in edits.items():
            model = make()
            changed = [(p.detach() != state[n]) for n, p in model.named_parameters()]
            rows.append({"method": name, **three_axes(predictions(model, task), before, one, new[i:i + 1]),
                         "W entries changed": (model.memory.weight.detach() != W).float().mean().item(),
                         "all weights changed": float(sum(c.sum() for c in changed) / sum(c.numel() for c in changed))})
    return pd.DataFrame(rows).groupby("method", sort=False).mean()


def _finetune_memory(task: FactTask, state: dict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> FactNet:
    model = _edited_copy(task, state)
    return finetune_on_fact(model, x, y, params=[model.memory.weight], steps=steps, lr=lr)


# ---------------------------------------------------------------- many edits: sequential and batch

SEQUENTIAL_METHODS = ("sequential ROME", "sequential ROME, C += edited keys", "batch (exact)", "batch (MEMIT)")


@_single_threaded
def edit_sequence(task: FactTask, state: dict, n_edits: int, checkpoints: tuple[int, ...] | None = None, *,
                  ridge: float = 1e-3, edit_key_weight: float = 0.1, memit_weight: float = 1.0,
                  value_decay: float = 1e-3, seed: int = 0) -> pd.DataFrame:
    """``n_edits`` subjects (a random choice) each get a new object. Four ways to write them:

    - sequential ROME: one rank-one edit after another, C fixed (estimated once on the training keys);
    - sequential ROME, C += edited keys: after each edit its key joins C with weight ``edit_key_weight``
      (a share of all the training keys' weight), so later edits try to keep it;
    - batch (exact): all edits in one solve with every constraint exact (N ≤ d_k);
    - batch (MEMIT): MEMIT's soft least squares at this layer, the preserved keys weighted ``memit_weight``.

    The values v* come from ``value_targets`` with ``decay=value_decay``. At each checkpoint n the three axes
    are measured on the first n edits. One row per (method, n)."""
    _validate.positive_int("n_edits", n_edits)
    _validate.non_negative("edit_key_weight", edit_key_weight)
    _validate.positive("memit_weight", memit_weight)
    _validate.non_negative("value_decay", value_decay)
    if n_edits > task.n_subjects // 2:
        raise ValueError(f"n_edits must leave at least half the subjects unedited (≤ {task.n_subjects // 2}), "
                         f"got {n_edits}")
    checkpoints = tuple(sorted({c for c in (checkpoints or (n_edits,)) if 1 <= c <= n_edits} | {n_edits}))
    base, before, edited, new, keys, values, C0 = _edit_problem(task, state, n_edits, ridge, seed, value_decay)
    W0 = base.memory.weight.detach().clone()
    rows = []

    def measure(method: str, n: int, W: torch.Tensor) -> None:
        with torch.no_grad():
            base.memory.weight.copy_(W)
        rows.append({"method": method, "edits": n, **three_axes(predictions(base, task), before, edited[:n], new[:n]),
                     "‖ΔW‖ / ‖W‖": ((W - W0).norm() / W0.norm()).item()})

    for method in SEQUENTIAL_METHODS[:2]:
        W, C = W0.clone(), C0.clone()
        for i in range(n_edits):
            W = W + rome_update(W, C, keys[i], values[i])
            if method != SEQUENTIAL_METHODS[0]:
                C = C + edit_key_weight * torch.outer(keys[i], keys[i]).to(C.dtype)
            if i + 1 in checkpoints:
                measure(method, i + 1, W)
    for n in checkpoints:
        if n <= len(C0):
            measure("batch (exact)", n, W0 + batch_update(W0, C0, keys[:n], values[:n], mode="exact"))
        measure("batch (MEMIT)", n, W0 + batch_update(W0, memit_weight * C0, keys[:n], values[:n], mode="memit"))
    with torch.no_grad():
        base.memory.weight.copy_(W0)
    return pd.DataFrame(rows)


def _edit_problem(task: FactTask, state: dict, n_edits: int, ridge: float, seed: int,
                  value_decay: float = 1e-3) -> tuple:
    """The trained network, its predictions, ``n_edits`` random subjects with new objects, their keys k* and
    values v* (all computed on the unedited network), and the key covariance C."""
    base = load_model(task, state)
    gen = torch.Generator().manual_seed(seed + 777)
    edited = torch.randperm(task.n_subjects, generator=gen)[:n_edits].to(task.objects.device)
    new = new_objects_for(task, edited, seed)
    keys, values = subject_keys(base, task, edited), value_targets(base, task, edited, new, decay=value_decay)
    return base, predictions(base, task), edited, new, keys, values, key_covariance(all_keys(base, task), ridge)


@_single_threaded
def memit_tradeoff(task: FactTask, state: dict, n_edits: int, weights: tuple[float, ...] = (1, 3, 10, 30, 100),
                   ridge: float = 1e-3, seed: int = 0) -> pd.DataFrame:
    """MEMIT's batch edit of the same ``n_edits`` facts as ``edit_sequence`` with the preserved keys weighted
    λ ∈ ``weights`` (C → λ C): the three axes for each λ."""
    _validate.positive_int("n_edits", n_edits)
    base, before, edited, new, keys, values, C0 = _edit_problem(task, state, n_edits, ridge, seed)
    W0 = base.memory.weight.detach().clone()
    rows = []
    for weight in weights:
        _validate.positive("weights", weight)
        with torch.no_grad():
            base.memory.weight.copy_(W0 + batch_update(W0, weight * C0, keys, values, mode="memit"))
        rows.append({"λ": weight, **three_axes(predictions(base, task), before, edited, new)})
    return pd.DataFrame(rows).set_index("λ")


def plot_edit_sequence(table: pd.DataFrame, title: str = "many edits, one after another or all at once"):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for ax, axis in zip(axes, ("reliability", "generalisation", "locality")):
        for method, group in table.groupby("method", sort=False):
            ax.plot(group.edits, group[axis], "o-", ms=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_title(axis)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- playground

@lru_cache(maxsize=128)
def edits_point(n_edits: int, memit_weight: float = 1.0, ridge: float = 1e-3, seed: int = 0, n_subjects: int = 400,
                key_dim: int = 256, train_steps: int = 150, device: str = "cpu") -> dict:
    """The playground's callback: ``n_edits`` edits written by the four methods of ``edit_sequence`` (MEMIT
    with weight ``memit_weight`` on the preserved keys, C with regulariser ``ridge``); the three axes."""
    task, state = trained_setup(seed, n_subjects, key_dim, train_steps, device)
    table = edit_sequence(task, state, n_edits, ridge=ridge, memit_weight=memit_weight, seed=seed)
    return {"n_edits": n_edits, "memit_weight": memit_weight, "ridge": ridge, "table": table.set_index("method")}


def plot_edits_point(result: dict):
    table = result["table"][["reliability", "generalisation", "locality"]]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(table.columns))
    width = 0.8 / len(table)
    for i, (method, row) in enumerate(table.iterrows()):
        ax.bar(x + i * width - 0.4 + width / 2, row.values, width, label=method)
    ax.set_xticks(x, table.columns)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.set_title(f"{result['n_edits']} edits, MEMIT λ = {result['memit_weight']:g}, ridge {result['ridge']:g}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig
