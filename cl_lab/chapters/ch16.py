"""Chapter 16 helpers (task order, and one model from three experts).

On the tiny language model (``cl_lab.lm``), with chapter 09's three tasks (new people, a new relation, a question
format):

- **Task order.** The three tasks in all six orders, for full fine-tuning and for one shared LoRA adapter, against
  the same order retrained with other seeds. Orders that share a prefix share its training (the optimizer is
  fresh at every task, so a prefix trained once is the prefix of every order that starts with it): six orders
  cost fifteen task trainings, not eighteen.
- **Experts into one model.** Chapter 10's fine-tunes (one expert per task, from the pretrained LM) combined
  three ways: task arithmetic, multi-task training on the union of the tasks' data, and multi-teacher
  distillation, a student trained on the experts' next-token distributions over the tasks' prompts alone (no
  labels), each prompt answered by its own task's expert or by the average of all three.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate, lm, train
from cl_lab.chapters import ch09, ch10
from cl_lab.data.streams import Stream, Task
from cl_lab.lm import merge as lm_merge
from cl_lab.methods import merging
from cl_lab.methods.base import Context, Method

ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(3)))
SETUPS = ("full fine-tuning", "shared LoRA")

# ================================================================ task order


def reordered(stream: Stream, order: Sequence[int]) -> Stream:
    """``stream`` with its trained tasks in ``order`` (a permutation of their positions); the evaluation tasks keep
    their order, so column j of R is always the same task."""
    if sorted(order) != list(range(len(stream))):
        raise ValueError(f"order must be a permutation of 0…{len(stream) - 1}, got {tuple(order)!r}")
    return Stream(stream.name, stream.scenario, [stream.tasks[i] for i in order], stream.n_out, stream.input_shape,
                  eval_tasks=list(stream.eval_tasks))


def _one(stream: Stream, k: int) -> Stream:
    """Task ``k`` of ``stream`` alone, still evaluated on every evaluation task."""
    return Stream(stream.name, stream.scenario, [stream.tasks[k]], stream.n_out, stream.input_shape,
                  eval_tasks=list(stream.eval_tasks))


@dataclass(frozen=True)
class OrderRun:
    """One order trained through: its R [T, E] (row i after the i-th task of ``order``; columns are the stream's
    evaluation tasks, the pretraining facts first) and the seed it was trained with."""

    setup: str
    order: tuple[int, ...]
    seed: int
    R: np.ndarray


def run_orders(lab: lm.Lab, stream: Stream, setup: str, orders: Sequence[Sequence[int]] = ORDERS, *, seed: int = 0,
               steps: int = 50, lr: float = 1e-3, batch_size: int = 16) -> list[OrderRun]:
    """Train ``setup`` (full fine-tuning or a shared LoRA, as chapter 09 builds them) through ``stream`` in every
    order of ``orders``: Adam, fresh at each task, ``steps`` steps of ``batch_size`` prompts per task, every task
    trained with ``seed``. Shared prefixes are trained once and copied."""
    _validate.one_of("setup", setup, SETUPS)
    _validate.positive_int("steps", steps)
    start_model, start_method = ch09.learner(lab, setup, seed=seed)
    done: dict[tuple[int, ...], tuple[nn.Module, Method, list[np.ndarray]]] = {(): (start_model, start_method, [])}

    def reach(prefix: tuple[int, ...]):
        if prefix not in done:
            model, method, rows = reach(prefix[:-1])
            model, method = copy.deepcopy(model), copy.deepcopy(method)
            run = train.fit(model, _one(stream, prefix[-1]), method, steps=steps, lr=lr, batch_size=batch_size,
                            seed=seed, device="cpu", progress=False, baseline=False)
            done[prefix] = (model, method, [*rows, run.R[0]])
        return done[prefix]

    return [OrderRun(setup, tuple(o), seed, np.array(reach(tuple(o))[2])) for o in orders]


def order_table(runs: Sequence[OrderRun], names: Sequence[str]) -> pd.DataFrame:
    """One row per run: the order (task initials), the seed, the last task, each task's recall at the end, their
    mean ("final mean"), forgetting (mean over the tasks before the last of recall just after learning it minus
    recall at the end) and the pretraining facts' recall at the end (column 0 of R)."""
    rows = []
    for r in runs:
        just = [r.R[pos, 1 + k] for pos, k in enumerate(r.order)]
        final = r.R[-1, 1:]  # [T] in the stream's task order
        rows.append({"setup": r.setup, "order": " → ".join(names[k] for k in r.order), "seed": r.seed,
                     "last task": names[r.order[-1]], **{f"{n} at end": v for n, v in zip(names, final)},
                     "final mean": final.mean(),
                     "forgetting": float(np.mean([just[p] - final[k] for p, k in enumerate(r.order[:-1])])),
                     "pretraining facts": r.R[-1, 0]})
    return pd.DataFrame(rows)


def last_task_share(values: pd.Series, last: pd.Series) -> float:
    """The share of the variance of ``values`` (one per order) that the last task explains: the between-group sum of
    squares over the total, grouping the orders by ``last`` (1 when orders with the same last task agree exactly)."""
    total = ((values - values.mean()) ** 2).sum()
    groups = values.groupby(last.to_numpy())
    between = (groups.size() * (groups.mean() - values.mean()) ** 2).sum()
    return float(between / total) if total > 0 else float("nan")


def spreads(table: pd.DataFrame, reference_order: str) -> pd.DataFrame:
    """Per setup and measure (final mean, forgetting): the range and standard deviation over the orders at the
    chapter's seed, and over the seeds of ``reference_order``; the ratio of the ranges; the share of the orders'
    variance that the last task explains."""
    out = {}
    for setup, rows in table.groupby("setup", sort=False):
        seed0 = rows["seed"].iloc[0]
        by_order = rows[rows["seed"] == seed0]
        by_seed = rows[rows["order"] == reference_order]
        for measure in ("final mean", "forgetting"):
            o, s = by_order[measure], by_seed[measure]
            out[(setup, measure)] = {"orders": len(o), "order range": np.ptp(o), "order sd": o.std(ddof=1),
                                     "seeds": len(s), "seed range": np.ptp(s), "seed sd": s.std(ddof=1),
                                     "last task's share": last_task_share(o, by_order["last task"])}
    frame = pd.DataFrame(out).T
    frame.insert(6, "range ratio", frame["order range"] / frame["seed range"])
    return frame


def plot_orders(table: pd.DataFrame, reference_order: str, ax=None):
    """Final mean recall per run: the six orders (coloured by the last task) beside the reference order's seeds."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 3.4))
    lasts = sorted(table["last task"].unique())
    colours = dict(zip(lasts, plt.cm.tab10.colors))
    for i, (_, rows) in enumerate(table.groupby("setup", sort=False)):
        seed0 = rows["seed"].iloc[0]
        orders = rows[rows["seed"] == seed0]
        seeds = rows[rows["order"] == reference_order]
        ax.scatter(np.full(len(orders), 2 * i) + np.linspace(-0.15, 0.15, len(orders)), orders["final mean"],
                   c=[colours[t] for t in orders["last task"]], s=40, zorder=3)
        ax.scatter(np.full(len(seeds), 2 * i + 0.8), seeds["final mean"], c="grey", marker="x", s=40, zorder=3)
    ax.set_xticks([x for i in range(table["setup"].nunique()) for x in (2 * i, 2 * i + 0.8)])
    ax.set_xticklabels([lab for s in table["setup"].unique() for lab in (f"{s}\n6 orders", "one order\nseeds")],
                       fontsize=8)
    for t, c in colours.items():
        ax.scatter([], [], c=[c], label=f"last: {t}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_ylabel("final mean recall over the 3 tasks")
    ax.set_title("What the order moves, against what the seed moves")
    return ax


def order_point(order: tuple[int, ...] = (0, 1, 2), setup: str = "full fine-tuning", steps: int = 40, seed: int = 0,
                smoke: bool = False) -> dict:
    """The playground's callback: one order of chapter 09's tasks (the SMOKE lab's with ``smoke``) trained through
    with ``setup``, as ``point_of`` reads it."""
    lab = ch09.lab_of(seed, smoke)
    stream = playground_stream(lab, seed, smoke)
    return point_of(run_orders(lab, stream, setup, [order], seed=seed, steps=steps)[0], stream)


def playground_stream(lab: lm.Lab, seed: int = 0, smoke: bool = False) -> Stream:
    """The chapter's stream: chapter 09's tasks (the SMOKE tasks with ``smoke``) and 150 (50) scored pretraining
    renderings."""
    return ch09.lm_stream(lab, ch09.SMOKE_TASKS if smoke else ch09.LM_TASKS, n_pretrained=50 if smoke else 150,
                          seed=seed)


def point_of(run: OrderRun, stream: Stream) -> dict:
    """A trained order as the playground shows it: {"R": [T, E], "trained": task names in order, "evaluated": the
    evaluation tasks' names, "setup"}. The notebook hands its own first run to the playground's cache this way."""
    names = [t.name for t in stream.tasks]
    return {"R": run.R, "trained": [names[k] for k in run.order], "evaluated": [t.name for t in stream.eval_tasks],
            "setup": run.setup}


def plot_order_point(result: dict):
    """R as a heatmap: a row after each trained task, a column per evaluated task, recall in each cell."""
    R = result["R"]
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=9)
    ax.set_xticks(range(R.shape[1]), result["evaluated"], fontsize=8)
    ax.set_yticks(range(R.shape[0]), [f"after {n}" for n in result["trained"]], fontsize=8)
    ax.set_title(f"{result['setup']}: final mean over the new tasks {R[-1, 1:].mean():.2f}", fontsize=10)
    fig.tight_layout()
    return fig


# ================================================================ experts into one model


def prompts_only(stream: Stream, seed: int = 0) -> Stream:
    """The union of ``stream``'s training prompts, every task tiled to the largest one's size and shuffled (seeded),
    as one task whose ``t_train`` names each prompt's task and whose "label" is the prompt's row number (for
    ``Distil``'s table of teacher distributions), never its answer. Evaluated on every task of ``stream``."""
    size = max(len(t.y_train) for t in stream.tasks)
    xs, ts = [], []
    for k, t in enumerate(stream.tasks):
        reps = torch.arange(size) % len(t.y_train)  # [size]
        xs.append(t.x_train[reps])
        ts.append(torch.full((size,), k, dtype=torch.long))
    order = torch.randperm(size * len(stream.tasks), generator=torch.Generator().manual_seed(seed))
    x, t = torch.cat(xs)[order], torch.cat(ts)[order]  # [N, L], [N]
    union = Task(0, "prompts only", x, torch.arange(len(x)), stream.tasks[0].x_test, stream.tasks[0].y_test,
                 tuple(range(stream.n_out)), t_train=t)
    return Stream(f"prompts({stream.name})", stream.scenario, [union], stream.n_out, stream.input_shape,
                  eval_tasks=list(stream.tasks))


@torch.no_grad()
def teacher_targets(teachers: Sequence[nn.Module], x: torch.Tensor, t: torch.Tensor, *, temperature: float = 1.0,
                    routing: str = "task") -> torch.Tensor:
    """The distillation targets [N, V] of prompts x [N, L] from tasks t [N]: expert t's softmax(z / T)
    (``routing="task"``) or the mean of every expert's (``routing="mean"``, no task needed)."""
    _validate.positive("temperature", temperature)
    _validate.one_of("routing", routing, ("task", "mean"))
    if len(teachers) == 0:
        raise ValueError("teachers must hold at least one model, got none")
    probs = torch.stack([F.softmax(teacher(x) / temperature, -1) for teacher in teachers])  # [K, N, V]
    if routing == "mean":
        return probs.mean(0)
    if int(t.max()) >= len(teachers) or int(t.min()) < 0:
        raise ValueError(f"t must name a teacher 0…{len(teachers) - 1}, got values {int(t.min())}…{int(t.max())}")
    return probs[t, torch.arange(len(t))]  # [N, V]


class Distil(Method):
    """Multi-teacher distillation (Hinton et al. 2015, arXiv 1503.02531, eq. 2: matching softened outputs), each
    prompt i pulled to its row of the teachers' targets (``teacher_targets``):

        L = T² · KL( q_i ‖ softmax(z_student / T) ),   q_i = softmax(z_teacher(i) / T).

    The batch's ``y`` are row numbers into ``targets`` (``prompts_only``): no answer is ever read."""

    name = "multi-teacher distillation"

    def __init__(self, targets: torch.Tensor, temperature: float = 1.0) -> None:
        if targets.dim() != 2:
            raise ValueError(f"targets must be probabilities [N, V], got shape {tuple(targets.shape)}")
        self.targets = targets
        self.temperature = _validate.positive("temperature", temperature)

    def task_loss(self, ctx: Context, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = self.temperature
        q = self.targets.to(logits.device)[y]  # [B, V]
        return F.kl_div(F.log_softmax(logits / tau, -1), q, reduction="batchmean") * tau ** 2

    def describe(self) -> dict:
        return {"method": self.name, "temperature": self.temperature, "prompts": len(self.targets)}


def _train_from(setup: ch10.LMSetup, stream: Stream, methods: list[Method], steps: int, seed: int) -> ch10.State:
    """Full fine-tuning of a copy of θ_0 through ``stream`` with ``methods`` and the chapter's replay, at chapter
    10's learning rate and batch size."""
    cfg = setup.config
    model = lm_merge.model_with(setup.lab, setup.base)
    replay = setup.replay(seed)
    train.fit(lm.LMClassifier(model, setup.lab.tokenizer.pad_token_id), stream,
              [*methods, *([replay] if replay else [])], steps=steps, lr=cfg.lr, batch_size=cfg.batch_size,
              seed=seed, device="cpu", progress=False)
    return lm_merge.params_of(model)


def experts(setup: ch10.LMSetup) -> list[nn.Module]:
    """Chapter 10's fine-tunes of ``setup`` as classifiers (prompts x [B, L] → next-token logits [B, V]), eval mode."""
    pad = setup.lab.tokenizer.pad_token_id
    return [lm.LMClassifier(lm_merge.model_with(setup.lab, s), pad) for s in setup.finetuned]


def distil(setup: ch10.LMSetup, *, routing: str = "task", steps: int | None = None, temperature: float = 1.0,
           seed: int = 0) -> ch10.State:
    """A student from θ_0 trained on the union of the tasks' prompts (``prompts_only``) against the experts
    (``setup.finetuned``), ``steps`` steps (default: as many as the experts together), with the chapter's replay."""
    teachers = experts(setup)
    prompts = prompts_only(setup.stream, seed)
    task = prompts.tasks[0]
    targets = teacher_targets(teachers, task.x_train, task.t_train, temperature=temperature, routing=routing)
    steps = steps or setup.config.steps * len(setup.finetuned)
    return _train_from(setup, prompts, [Distil(targets, temperature)], steps, seed)


def multitask(setup: ch10.LMSetup, *, steps: int | None = None, seed: int = 0) -> ch10.State:
    """θ_0 trained on the tasks' labelled union (every task tiled alike), as many steps as the experts together."""
    steps = steps or setup.config.steps * len(setup.finetuned)
    return setup.fine_tune(lm_merge.balanced_union(setup.stream, seed), steps=steps, seed=seed)


@lru_cache(maxsize=2)
def combined(config: ch10.LMConfig, steps: int | None = None, lams: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)) -> dict:
    """Every way of getting one model from chapter 10's experts of ``config``, as states: task arithmetic (λ from
    ``lams`` by validation recall), multi-task training and distillation (each prompt routed to its task's expert),
    each trained ``steps`` steps (default: as many as the experts together)."""
    setup = ch10.lm_setup(config)
    lam, merged = ch10.best_lambda(setup, lambda v: merging.task_arithmetic(setup.base, setup.task_vectors, v), lams)
    seed = config.seed
    states = {"task arithmetic": merged, "multi-task": multitask(setup, steps=steps, seed=seed),
              "distilled": distil(setup, routing="task", steps=steps, seed=seed)}
    return {"λ": lam, "λ candidates": len(lams), "states": states}


def target_accuracy(setup: ch10.LMSetup, temperature: float = 1.0) -> pd.DataFrame:
    """How often a distillation target's most likely word is the prompt's answer, over each task's training prompts,
    with each prompt routed to its task's expert or with the three experts averaged (the labels are read here only
    to score the targets, never to train); a last row averages the tasks."""
    teachers = experts(setup)
    rows = {}
    for k, task in enumerate(setup.stream.tasks):
        t = torch.full((len(task.y_train),), k, dtype=torch.long)
        rows[task.name] = {name: (teacher_targets(teachers, task.x_train, t, temperature=temperature, routing=routing)
                                  .argmax(1) == task.y_train).double().mean().item()
                           for name, routing in (("routed", "task"), ("averaged", "mean"))}
    frame = pd.DataFrame(rows).T
    frame.loc["mean over the tasks"] = frame.mean()
    return frame


def plot_combined(scores: pd.DataFrame, ax=None):
    """Mean recall over the tasks and pretraining-fact recall for every state of ``scores`` (``ch10.score_table``)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.2))
    x = np.arange(len(scores))
    ax.bar(x - 0.2, scores["mean"].astype(float), 0.4, label="the three tasks (mean recall)", color="#dd8452")
    ax.bar(x + 0.2, scores["pretrained"].astype(float), 0.4, label="pretraining facts (recall)", color="#4c72b0")
    ax.set_xticks(x, [name.replace(": ", ":\n").replace(" (", "\n(") for name in scores.index], fontsize=7.5)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall (test half)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("One model from three experts")
    return ax


def counted_costs(setup: ch10.LMSetup, combined_states: dict, steps: int | None = None) -> pd.DataFrame:
    """What each route needs and does, counted: labelled prompts and unlabelled prompts trained on, training steps,
    prompts passed through the experts, and candidate λ scored on held-out facts."""
    steps = steps or setup.config.steps * len(setup.finetuned)
    seen = steps * setup.config.batch_size
    n_prompts = len(prompts_only(setup.stream).tasks[0].y_train)
    k = len(setup.finetuned)
    return pd.DataFrame({
        "task arithmetic": {"needs": "weights", "training steps": 0, "prompts trained on": 0,
                            "labels used": "no", "expert forward passes (prompts)": 0,
                            "λ scored on held-out facts": combined_states["λ candidates"]},
        "multi-task": {"needs": "labelled data", "training steps": steps, "prompts trained on": seen,
                       "labels used": "yes", "expert forward passes (prompts)": 0, "λ scored on held-out facts": 0},
        "distilled": {"needs": "experts + prompts", "training steps": steps, "prompts trained on": seen,
                      "labels used": "no", "expert forward passes (prompts)": k * n_prompts,
                      "λ scored on held-out facts": 0}}).T
