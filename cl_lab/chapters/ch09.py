"""Chapter 09 helpers (LoRA for continual learning).

On the tiny language model (``cl_lab.lm``): the chapter's stream (new people, a new relation, a new answer
format, with the pretraining facts as an evaluation-only task 0), the five learners (full fine-tuning, a
shared LoRA, per-task LoRAs routed by task id, LoRA on attention or MLP projections only), the learning /
forgetting path, the rank of the weight change, the optimizer null (the same optimizer, learning rate and
steps on facts the LM already recalls) and what Adam's first steps cost on their own, the measured cost of the
optimizer state, and the rank × α × replay playground. On an MLP (permuted MNIST): the rank sweep beside the
LM's, adapters without the task id (summed, merged) and O-LoRA's orthogonality.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate, data, lm, metrics, models, plots, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.data.streams import Stream
from cl_lab.device import seed_everything
from cl_lab.lm import KLToBase, TextReplay, cpt, nulls
from cl_lab.lm import lora as lm_lora
from cl_lab.lm.stream import FactTask
from cl_lab.methods.base import Context, Method
from cl_lab.methods.lora import LoRAModel, PerTaskLoRA, SharedLoRA, lora_parameter_count, subspace_overlap, target_names

# ================================================================ the language model

LM_TASKS = (("subjects", 10), ("relation", 20), ("format", 60))
SMOKE_TASKS = (("subjects", 4), ("relation", 8), ("format", 16))  # fits the SMOKE lab's 40-person world
SETUPS = ("full fine-tuning", "shared LoRA", "per-task LoRA", "attention LoRA", "MLP LoRA")
_WHERE = {"shared LoRA": "all", "per-task LoRA": "all", "attention LoRA": "attention", "MLP LoRA": "mlp"}


@lru_cache(maxsize=4)
def lab_of(seed: int = 0, smoke: bool = False) -> lm.Lab:
    """The tiny LM of ``seed`` (pretrained once, then loaded from the disk cache); with ``smoke``, the 1-layer
    lab of ``lm.SMOKE_CONFIG`` (seconds to pretrain), so a SMOKE run never pretrains the full-size LM."""
    return lm.tiny_lm(seed, progress=not smoke, **(lm.SMOKE_CONFIG if smoke else {}))


def _padded(x: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    out = torch.full((len(x), length), pad_id, dtype=torch.long)  # [N, L]
    out[:, :x.shape[1]] = x
    return out


def lm_stream(lab: lm.Lab, tasks: Sequence[tuple[str, int]] = LM_TASKS, n_pretrained: int = 300,
              seed: int = 0) -> Stream:
    """The chapter's LM stream: one ``lm.fact_stream`` task of each (kind, n_subjects) in ``tasks``, trained in
    order (ids 1, 2, …), and an evaluation-only task 0, "pretraining facts": a seeded random draw of
    ``n_pretrained`` of the world's pretraining renderings. R[:, 0] is then the pretraining facts' recall after
    each task, and continual evaluation traces it during training (the MLP's "base task")."""
    _validate.positive_int("n_pretrained", n_pretrained)
    if not tasks:
        raise ValueError("tasks must hold at least one (kind, n_subjects) pair, got none")
    parts = [lm.fact_stream(lab, 1, kind, n_subjects=n).tasks[0] for kind, n in tasks]
    world, pad_id = lab.world, lab.tokenizer.pad_token_id
    keep = torch.randperm(len(world.train_facts), generator=torch.Generator().manual_seed(seed))[:n_pretrained]
    old = [world.train_facts[i] for i in keep.tolist()]
    length = max(max(t.x_train.shape[1] for t in parts), lm.fact_batch(lab.tokenizer, old)[0].shape[1])
    x0, y0 = lm.fact_batch(lab.tokenizer, old, length=length)
    pretraining = FactTask(0, "pretraining facts", x0, y0, x0, y0, tuple(sorted(set(y0.tolist()))),
                           train_facts=old, test_facts=old)
    new = [FactTask(i + 1, t.name, _padded(t.x_train, length, pad_id), t.y_train, _padded(t.x_test, length, pad_id),
                    t.y_test, t.classes, train_facts=t.train_facts, test_facts=t.test_facts,
                    paraphrase_facts=t.paraphrase_facts) for i, t in enumerate(parts)]
    return Stream("LM facts after pretraining", "domain", new, lab.model.config.vocab_size, (length,),
                  eval_tasks=[pretraining, *new])


def first_new_task(stream: Stream) -> Stream:
    """The LM stream cut after its first new task, still evaluated on the pretraining facts."""
    return Stream(stream.name, stream.scenario, stream.tasks[:1], stream.n_out, stream.input_shape,
                  eval_tasks=stream.eval_tasks[:2])


def learner(lab: lm.Lab, setup: str, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> tuple[nn.Module, Method]:
    """The model and method of one of ``SETUPS``: full fine-tuning of a copy of the LM, or LoRA (rank, α) on
    all projections (shared through the stream, or one adapter per task routed by the task id), on the
    attention projections only, or on the MLP projections only (both shared)."""
    _validate.one_of("setup", setup, SETUPS)
    if setup == "full fine-tuning":
        return lab.copy().as_classifier(), Method()
    model = lm_lora.lora_lm(lab, rank, alpha, where=_WHERE[setup], seed=seed)
    return model, PerTaskLoRA() if setup == "per-task LoRA" else SharedLoRA()


def as_lm(model: nn.Module) -> nn.Module:
    """What ``lm.evaluate`` reads: the adapted classifier inside a ``LoRAModel``, or the model itself."""
    return model.net if isinstance(model, LoRAModel) else model


@dataclass
class LMResult:
    """One setup trained through the LM stream: the run, the trained model and method, and the end row of
    ``lm.evaluate`` (pretraining facts, paraphrases, perplexity) read through what the method predicts with."""

    setup: str
    run: train.Run
    model: nn.Module
    method: Method
    end: dict
    trainable: int


def run_setup(lab: lm.Lab, stream: Stream, setup: str, *, rank: int = 8, alpha: float = 16.0, steps: int = 50,
              lr: float = 1e-3, batch_size: int = 32, seed: int = 0, eval_every: int | None = None,
              extra: Sequence[Method] = (), max_facts: int | None = None,
              device: str | torch.device = "cpu") -> LMResult:
    """Train ``setup`` (one of ``SETUPS``) through ``stream`` with ``extra`` methods beside it (replay, KL: on a
    LoRA model they act through the adapters); per-task LoRA reads the pretraining facts and general text
    through the bare backbone (task 0 has no adapter), every other setup through its trained model.
    ``max_facts`` bounds the end evaluation (a seeded subset of the pretraining renderings)."""
    model, method = learner(lab, setup, rank, alpha, seed)
    trainable = models.count_parameters(model)
    through = isinstance(model, LoRAModel)  # the LM's loss terms then read the adapted classifier inside
    extra = [lm_lora.ThroughAdapters(m) if through and isinstance(m, (TextReplay, KLToBase)) else m for m in extra]
    run = train.fit(model, stream, [method, *extra], steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                    eval_every=eval_every, eval_samples=max(len(t.y_test) for t in stream.eval_tasks),
                    device=device, progress=False)
    with contextlib.ExitStack() as stack:
        if isinstance(method, PerTaskLoRA):
            stack.enter_context(model.using())
        end = lm.evaluate(as_lm(model), lab.tokenizer, lab.world, max_facts=max_facts, seed=seed)
    return LMResult(setup, run, model, method, end, trainable)


def new_tasks_R(run: train.Run) -> np.ndarray:
    """R over the trained tasks only: [T, T] (column 0, the pretraining facts, dropped)."""
    return run.R[:, 1:]


def summary(results: Sequence[LMResult] | dict[str, LMResult], base: dict) -> pd.DataFrame:
    """One row per result (labelled by its setup, or by the mapping's keys): trainable parameters, mean recall of
    each task just after learning it and at the end, BWT over the new tasks, and what the pretraining kept (fact
    recall, paraphrase recall, perplexity); a last row for the pretrained LM (``base``, a row of ``lm.evaluate``)."""
    labelled = results.items() if isinstance(results, dict) else [(r.setup, r) for r in results]
    rows = {}
    for label, r in labelled:
        R = new_tasks_R(r.run)
        rows[label] = {"trainable": r.trainable, "learned (mean, just after)": R.diagonal().mean(),
                       "new tasks at the end": R[-1].mean(), "BWT": metrics.backward_transfer(R),
                       "pretraining recall": r.end["recall"], "paraphrase": r.end["paraphrase"],
                       "perplexity": r.end["perplexity"]}
    if len(rows) != len(labelled):
        raise ValueError("results must have distinct labels: pass a dict {label: result} for repeated setups")
    rows["pretrained LM"] = {"trainable": 0, "pretraining recall": base["recall"], "paraphrase": base["paraphrase"],
                             "perplexity": base["perplexity"]}
    return pd.DataFrame(rows).T


def plot_lm_R(results: Sequence[LMResult], stream: Stream):
    """One accuracy matrix per setup (rows: after training task i; columns: the pretraining facts, then each task)."""
    fig, axes = plt.subplots(1, len(results), figsize=(3.1 * len(results), 3.0), squeeze=False)
    names = ["pretrain", *(t.name.replace("new people 1", "people").replace("Q&A lives_in", "Q&A")
                           for t in stream.tasks)]
    for ax, r in zip(axes[0], results, strict=True):
        plots.accuracy_matrix(r.run.R, ax, r.setup, task_names=names)
        ax.set_yticks(range(len(r.run.R)), names[1:])
        ax.set_ylabel("after training")
    fig.tight_layout()
    return fig


@torch.no_grad()
def without_task_id(result: LMResult, lab: lm.Lab, stream: Stream, max_facts: int | None = None) -> dict:
    """Per-task LoRA with every adapter switched on (no task id, the same function as merging them all):
    recall on each trained task, the pretraining facts and general perplexity."""
    model, method = result.model, result.method
    if not isinstance(method, PerTaskLoRA):
        raise TypeError(f"result must be a per-task LoRA run, got {result.setup!r}")
    with model.using(*method.adapter_of.values()):
        end = lm.evaluate(as_lm(model), lab.tokenizer, lab.world, max_facts=max_facts)
        tasks = {t.name: lm.recall(as_lm(model), lab.tokenizer, t.test_facts) for t in stream.tasks}
    return {**tasks, "pretraining recall": end["recall"], "perplexity": end["perplexity"]}


@torch.no_grad()
def never_emitted(lab: lm.Lab, stream: Stream, relation_task: int = 2) -> dict:
    """Why LoRA cannot learn the new relation: its objects never appeared in pretraining. The norm of their
    (tied) embedding rows against the pretrained objects', and the probability the base LM gives them."""
    task = stream.eval_tasks[relation_task]
    new = sorted(set(task.y_test.tolist()))
    old = sorted(set(stream.eval_tasks[0].y_test.tolist()))
    rows = lab.model.get_output_embeddings().weight  # [V, d]
    probs = lab.as_classifier()(task.x_test.to(rows.device)).softmax(-1)  # [N, V]
    return {"new objects' row norm": rows[new].norm(dim=1).mean().item(),
            "pretrained objects' row norm": rows[old].norm(dim=1).mean().item(),
            "base LM's probability on the new objects": probs[:, new].sum(1).mean().item()}


# ---------------------------------------------------------------- the optimizer null (LM)

def renderings_per_fact(world) -> int:
    """How many trained renderings (templates) each pretraining fact has in ``world``."""
    return round(len(world.train_facts) / len(nulls.fact_keys(world.train_facts)))


def null_stream(lab: lm.Lab, stream: Stream, seed: int = 0, require_known: bool = True) -> Stream:
    """The optimizer null of the chapter's ``stream``: for each of its tasks, a task of pretraining facts the LM
    already recalls with about as many prompts (``lm.nulls.known_fact_stream``), disjoint from one another and
    from the scored pretraining facts (``stream``'s task 0), padded alike. Evaluated on that task 0 alone, so
    R[:, 0] of a run on it is the same measurement as the learners' R[:, 0]. ``require_known=False``: any
    pretraining facts (the SMOKE lab recalls none)."""
    scored = stream.eval_tasks[0]
    per_fact = renderings_per_fact(lab.world)
    sizes = [max(1, round(len(t.y_train) / per_fact)) for t in stream.tasks]
    known = nulls.known_fact_stream(lab, sizes, seed, exclude=scored.train_facts, length=stream.input_shape[0],
                                    require_known=require_known)
    return Stream("known facts after pretraining (the optimizer null)", "domain", known.tasks, stream.n_out,
                  stream.input_shape, eval_tasks=[scored])


def null_run(lab: lm.Lab, null: Stream, setup: str = "full fine-tuning", *, rank: int = 8, alpha: float = 16.0,
             steps: int = 50, lr: float = 1e-3, batch_size: int = 32, seed: int = 0, max_facts: int | None = None,
             device: str | torch.device = "cpu") -> train.Run:
    """``setup`` (one of ``SETUPS``, not per-task) trained through the ``null`` stream exactly as ``run_setup``
    trains it through the chapter's: R[:, 0] is what the optimizer alone costs the scored pretraining facts.
    (``max_facts`` is accepted so that the chapter's ``fit`` settings pass through unchanged.)"""
    if setup == "per-task LoRA":
        raise ValueError("setup must be a shared learner: per-task LoRA reads task 0 through the bare backbone, "
                         "which no step changes")
    model, method = learner(lab, setup, rank, alpha, seed)
    return train.fit(model, null, method, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device,
                     progress=False)


class Schedule(Method):
    """The learning rate of chapter 13's schedules (``lm.cpt.lr_at``) at every step of a ``train.fit`` task,
    restarted at each task: ``"rewarm-flat"`` is a linear warm-up over a share ``warmup`` of the steps, then the
    peak (the ``lr`` given to ``train.fit``)."""

    name = "learning-rate schedule"

    def __init__(self, steps: int, schedule: str = "rewarm-flat", warmup: float = 0.4) -> None:
        self.steps = _validate.positive_int("steps", steps)
        cpt.lr_at(0, steps, schedule, warmup=warmup)  # validates the schedule and the warm-up share
        self.schedule, self.warmup = schedule, warmup
        self._peak = 0.0

    def on_task_start(self, ctx: Context) -> None:
        self._peak = ctx.optimizer.param_groups[0]["lr"]

    def before_step(self, ctx: Context) -> None:
        lr = cpt.lr_at(ctx.task_step, self.steps, self.schedule, peak_lr=self._peak, low_lr=self._peak / 10,
                       warmup=self.warmup)
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr


OPTIMIZER_NULLS = {"Adam, lr 1e-3": ("adam", 1e-3, None), "Adam, lr 1e-4": ("adam", 1e-4, None),
                   "Adam, lr 1e-3 after a warm-up": ("adam", 1e-3, 0.5), "SGD, lr 0.1": ("sgd", 0.1, None)}


def optimizer_nulls(lab: lm.Lab, null: Stream, steps: int = 12, batch_size: int = 32, seed: int = 0,
                    settings: dict[str, tuple[str, float, float | None]] = OPTIMIZER_NULLS, eval_samples: int = 100,
                    device: str | torch.device = "cpu") -> pd.DataFrame:
    """Full fine-tuning of the pretrained LM on the first task of ``null`` (a ``null_stream``: facts it already
    recalls) for ``steps`` steps under each of ``settings`` ({label: (optimizer, lr, warm-up share or None)}), a
    seeded draw of ``eval_samples`` of the scored pretraining facts evaluated after every step (the same draw for
    every setting). Returns one row per (setting, step k = 0..steps): their recall after k steps."""
    one = Stream(null.name, null.scenario, null.tasks[:1], null.n_out, null.input_shape, eval_tasks=null.eval_tasks)
    rows = []
    for label, (optimizer, lr, warmup) in settings.items():
        methods = Schedule(steps, warmup=warmup) if warmup else None
        run = train.fit(lab.copy().as_classifier(), one, methods, steps=steps, lr=lr, batch_size=batch_size,
                        optimizer=optimizer, eval_every=1, eval_samples=eval_samples, seed=seed, device=device,
                        progress=False)
        rows += [{"setting": label, "step": int(k), "recall": float(recall)}
                 for k, recall in run.curves.set_index("step")["accuracy"].items()]
    return pd.DataFrame(rows)


def plot_optimizer_nulls(curves: pd.DataFrame, ax=None):
    """The scored pretraining facts' recall against the number of steps on facts the LM already knew."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.8))
    for label, c in curves.groupby("setting", sort=False):
        ax.plot(c["step"], c["recall"], ".-", label=label)
    ax.set(xlabel="steps on facts the LM already knew", ylabel="other pretraining facts: recall", ylim=(0, 1.05),
           title="the optimizer null: nothing new to learn")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


@torch.no_grad()
def _delta(before: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])  # [P]


def first_step_sizes(lab: lm.Lab, task: FactTask, lr_adam: float = 1e-3, lr_sgd: float = 0.1, batch_size: int = 32,
                     seed: int = 0) -> dict:
    """One step of full fine-tuning on a seeded batch of ``task`` (facts the LM knows) with Adam and with SGD, from
    the same pretrained weights: per weight, |Δθ|. Returns Adam's |Δθ|/lr (every weight, [P]), the share of the
    weights that got a gradient, and both optimizers' median |Δθ| over those weights."""
    x, y, _ = task.sample(batch_size, seed=seed)
    sizes, touched = {}, None
    for name, (optimizer, lr) in {"adam": (torch.optim.Adam, lr_adam), "sgd": (torch.optim.SGD, lr_sgd)}.items():
        model = lab.copy().as_classifier().train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = optimizer(model.parameters(), lr=lr)
        nn.functional.cross_entropy(model(x), y).backward()
        touched = torch.cat([(p.grad != 0).reshape(-1) for p in model.parameters()])  # [P]: the same batch each time
        opt.step()
        sizes[name] = _delta(before, model).abs()  # [P]
    return {"adam |Δθ|/lr": sizes["adam"] / lr_adam, "with a gradient": touched.double().mean().item(),
            "adam median |Δθ|": sizes["adam"][touched].median().item(),
            "sgd median |Δθ|": sizes["sgd"][touched].median().item(),
            "median |θ|": torch.cat([p.detach().abs().reshape(-1) for p in lab.model.parameters()]).median().item()}


# ---------------------------------------------------------------- learns less, forgets less (LM)

def lm_path(run: train.Run, task: int = 1) -> pd.DataFrame:
    """During the first new task: step, that task's recall and the pretraining facts' recall (the run's continual
    evaluation: train it with ``eval_every``)."""
    end = run.boundaries[1] if len(run.boundaries) > 1 else run.curves.step.max()
    c = run.curves[run.curves.step <= end]
    wide = c.pivot_table(index="step", columns="task", values="accuracy")
    return pd.DataFrame({"step": wide.index, "new task": wide[task].to_numpy(), "pretraining": wide[0].to_numpy()})


def kept_at(path: pd.DataFrame, learned: float) -> float:
    """Pretraining recall at the first evaluation where the new task's recall reaches ``learned`` (NaN if never)."""
    reached = path[path["new task"] >= learned]
    return float(reached["pretraining"].iloc[0]) if len(reached) else float("nan")


def plot_lm_tradeoff(paths: dict[str, pd.DataFrame], base_recall: float, ax=None):
    """Pretraining-fact recall against new-task recall along training, one line per learner."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 4))
    for label, path in paths.items():
        ax.plot(path["new task"], path["pretraining"], ".-", label=label)
    ax.axhline(base_recall, color="tab:green", ls=":", label="pretrained LM")
    ax.set(xlabel="new people's facts: recall", ylabel="pretraining facts: recall, same model",
           title="learning against forgetting (LM)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


@torch.no_grad()
def delta_ranks(before: nn.Module, after: nn.Module, targets: Sequence[str], energy: float = 0.9) -> pd.DataFrame:
    """For every projection named by ``targets``: ``directions``, the number of singular directions that hold a
    share ``energy`` of ‖ΔW‖²_F, ΔW = W_after − W_before (weights as [out, in]; 0 for an unchanged weight), and the
    matrix's ``full rank``. On the CPU in float64 (the two models may live on different devices; MPS has no
    float64)."""
    _validate.in_range("energy", energy, 0.0, 1.0, high_open=True)
    rows = []
    for name in target_names(before, targets):
        w0 = lm.weight_out_in(before.get_submodule(name)).cpu()
        w1 = lm.weight_out_in(after.get_submodule(name)).cpu()
        s = torch.linalg.svdvals((w1 - w0).double())  # descending
        share = s.pow(2).cumsum(0) / s.pow(2).sum().clamp_min(1e-300)
        directions = int((share < energy).sum()) + 1 if s.max() > 0 else 0
        rows.append({"module": name, "directions": directions, "full rank": min(w0.shape)})
    return pd.DataFrame(rows).set_index("module")


# ---------------------------------------------------------------- cost

def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """What an optimizer has actually allocated: state tensors, their numbers and bytes (after at least one step)."""
    tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {"state tensors": len(tensors), "state numbers": sum(t.numel() for t in tensors),
            "state bytes": sum(t.numel() * t.element_size() for t in tensors)}


def measured_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3) -> dict:
    """Trainable parameters of ``model`` and the Adam state allocated by one step on (x, y)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {"trainable": sum(p.numel() for p in params), **optimizer_state(opt)}


def lm_cost_table(lab: lm.Lab, stream: Stream, ranks: Sequence[int] = (1, 4, 8, 16, 64),
                  alpha_per_rank: float = 2.0) -> pd.DataFrame:
    """Full fine-tuning against LoRA (all projections) at each rank: trainable parameters and the Adam state
    actually allocated after one step (tensors, numbers, MiB), and the state as a share of full fine-tuning's."""
    x, y, _ = stream.tasks[0].sample(32, seed=0)
    rows = {"full fine-tuning": measured_cost(lab.copy().as_classifier(), x, y)}
    for r in ranks:
        rows[f"LoRA r = {r}"] = measured_cost(lm_lora.lora_lm(lab, r, alpha_per_rank * r), x, y)
    table = pd.DataFrame(rows).T
    table["state MiB"] = table["state bytes"] / 2**20
    table["state / full"] = table["state numbers"] / table.loc["full fine-tuning", "state numbers"]
    return table.drop(columns="state bytes")


# ---------------------------------------------------------------- playground (LM)

def lm_point(rank: int, alpha: float, replay_share: float, steps: int = 30, lr: float = 1e-3, seed: int = 0,
             n_pretrained: int = 300, max_facts: int = 400, device: str | torch.device = "cpu",
             smoke: bool = False) -> dict:
    """The playground: one shared LoRA (rank, α) on the first new task (new people), with replay of
    pretraining text at ``replay_share`` of the supervised tokens; what it learned and what the LM kept
    (``smoke``: on the SMOKE lab)."""
    _validate.positive_int("rank", rank)
    _validate.positive("alpha", alpha)
    _validate.in_range("replay_share", replay_share, 0.0, 1.0, high_open=True)
    lab = lab_of(seed, smoke)
    stream = first_new_task(lm_stream(lab, SMOKE_TASKS if smoke else LM_TASKS, n_pretrained=n_pretrained, seed=seed))
    replay = TextReplay(lab, replay_share, seed=seed) if replay_share > 0 else None
    result = run_setup(lab, stream, "shared LoRA", rank=rank, alpha=alpha, steps=steps, lr=lr, seed=seed,
                       extra=[replay] if replay else [], max_facts=max_facts, device=device)
    return {"rank": rank, "alpha": alpha, "replay share": replay_share, "new people": float(result.run.R[0, 1]),
            "pretraining recall": result.end["recall"], "perplexity": result.end["perplexity"],
            "replayed share": replay.share if replay else 0.0, "adapter parameters": result.trainable,
            **{f"base {k}": v for k, v in _base_row(seed, max_facts, smoke).items()}}


@lru_cache(maxsize=8)
def _base_row(seed: int, max_facts: int | None, smoke: bool = False) -> dict:
    lab = lab_of(seed, smoke)
    row = lm.evaluate(lab.model, lab.tokenizer, lab.world, max_facts=max_facts, seed=seed)
    return {"recall": row["recall"], "perplexity": row["perplexity"]}


def plot_lm_point(result: dict):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.5, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    labels, values = ["new people", "pretraining facts"], [result["new people"], result["pretraining recall"]]
    ax.bar(labels, values, color=["tab:blue", "tab:orange"])
    ax.axhline(result["base recall"], color="tab:green", ls=":", label="pretrained LM")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="recall after the task")
    ax.legend(fontsize=7, loc="lower right")
    bx.bar(["perplexity"], [result["perplexity"]], color="tab:red")
    bx.axhline(result["base perplexity"], color="tab:green", ls=":")
    bx.text(0, result["perplexity"], f"{result['perplexity']:.2f}", ha="center", va="bottom", fontsize=8)
    bx.set(ylabel="general perplexity")
    fig.suptitle(f"LoRA r={result['rank']}, α={result['alpha']:g}, replay {result['replay share']:.0%} of tokens "
                 f"({result['adapter parameters']:,} parameters)", fontsize=9)
    fig.tight_layout()
    return fig


# ================================================================ the MLP (permuted MNIST)

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


def adapter_norms(model: LoRAModel, adapters: Sequence[int]) -> pd.DataFrame:
    """Frobenius norms of A and of ΔW = (α/r)BA in the first layer, per adapter."""
    layer = model.lora_layers()[0]
    return pd.DataFrame([{"adapter": i, "‖A‖_F": layer.A[i].norm().item(),
                          "‖ΔW‖_F": layer.delta_weight(i).norm().item()} for i in adapters]).set_index("adapter")
