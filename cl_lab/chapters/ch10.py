"""Chapter 10 helpers (model merging).

On the tiny language model (``cl_lab.lm``): one fine-tune of the pretrained LM per task (new people, a new
relation, a question format), their task vectors, the optimizer null of each (the same fine-tuning on facts the
LM already recalls), and every measurement the chapter makes of a merge: the λ curve, negation against a
random-direction null, TIES and DARE with λ chosen on held-out facts, DARE's drop rate against the size of the
delta, the merge against multi-task and sequential fine-tuning, LoRA adapters summed against routed, WiSE-FT's
curve, and the playground's cached callback.

On an MLP (permuted MNIST), what the LM cannot show cheaply: networks from different random initialisations
have no shared basin (the loss barrier along the straight line between them).

Everything is a plain function of its arguments; training is memoised by its full configuration, so the
notebook, the widget and the tests share one set of trained models per setting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cl_lab import _validate, data, lm, models, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.chapters.ch09 import renderings_per_fact
from cl_lab.data.streams import Stream, Task
from cl_lab.device import pick_device, seed_everything
from cl_lab.lm import merge as lm_merge
from cl_lab.lm import nulls
from cl_lab.lm.evaluate import object_logits
from cl_lab.methods import merging

State = dict[str, torch.Tensor]

# ================================================================ the language model

LM_TASKS = (("subjects", 10), ("relation", 20), ("format", 60))  # (fact_stream kind, n_subjects): as chapter 09


@dataclass(frozen=True)
class LMConfig:
    """Everything that decides the chapter's LM fine-tunes (and so the cache key)."""

    seed: int = 0
    tasks: tuple[tuple[str, int], ...] = LM_TASKS
    steps: int = 100  # Adam steps per fine-tune
    lr: float = 3e-4
    batch_size: int = 16
    replay: float = 0.5  # share of supervised tokens replayed from the pretraining corpus, every run alike
    n_pretrained: int = 240  # pretraining renderings in the probe
    n_general: int = 100  # held-out general sentences in the probe
    lab: tuple[tuple[str, object], ...] = ()  # overrides of the tiny LM's own configuration (tests use a tinier LM)

    def __post_init__(self) -> None:
        _validate.non_negative_int("seed", self.seed)
        _validate.positive_int("steps", self.steps)
        _validate.positive("lr", self.lr)
        _validate.positive_int("batch_size", self.batch_size)
        _validate.in_range("replay", self.replay, 0.0, 1.0, high_open=True)


def smoke_config(seed: int = 0) -> LMConfig:
    """A configuration that runs in seconds: a one-layer LM pretrained for 200 steps (long enough to recall the
    dozen facts the optimizer null needs), tiny tasks, 3 steps."""
    lab = (("n_layer", 1), ("n_head", 2), ("n_embd", 64), ("n_subjects", 20), ("n_general", 100),
           ("n_general_test", 20), ("steps", 200), ("batch_size", 16), ("lr", 1e-2), ("warmup", 10))
    return LMConfig(seed=seed, tasks=(("subjects", 1), ("relation", 4), ("format", 6)), steps=3, lr=1e-3,
                    batch_size=8, n_pretrained=12, n_general=10, lab=lab)


@dataclass
class LMSetup:
    """The pretrained LM θ_0, one full fine-tune θ_k per task, τ_k = θ_k − θ_0, and the probe that scores them.

    ``score(state)`` loads ``state`` into one scratch copy of the LM and returns the probe's row.
    """

    config: LMConfig
    lab: lm.Lab
    stream: Stream
    probe: lm_merge.Probe
    base: State
    finetuned: tuple[State, ...]
    task_vectors: tuple[State, ...]
    _scratch: torch.nn.Module = field(repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.probe.names)

    def score(self, state: State, split: str = "test", general: bool = True) -> dict[str, float]:
        lm_merge.load_params(self._scratch, state)
        return self.probe.score(self._scratch, split, general)

    def recall(self, state: State, split: str = "test") -> np.ndarray:
        """Each task's recall [K] (no pretraining facts, no perplexity: the fast score)."""
        lm_merge.load_params(self._scratch, state)
        return np.array(self.probe.recall(self._scratch, split))

    def replay(self, seed: int):
        """The replay every run of the chapter trains with (None at share 0)."""
        return lm.TextReplay(self.lab, self.config.replay, seed=seed) if self.config.replay > 0 else None

    def fine_tune(self, stream: Stream, *, steps: int | None = None, lr: float | None = None, seed: int = 0,
                  start: State | None = None) -> State:
        """Full fine-tuning from θ_0 (or ``start``) through ``stream`` at the chapter's settings."""
        cfg = self.config
        return lm_merge.fine_tune(self.lab, self.base if start is None else start, stream, steps=steps or cfg.steps,
                               lr=lr or cfg.lr, batch_size=cfg.batch_size, seed=seed, method=self.replay(seed))


def _cached_by_config(fn):
    """Memoise ``fn(config, *args)`` by its arguments, after checking that ``config`` is an ``LMConfig``."""
    cached = lru_cache(maxsize=4)(fn)

    @functools.wraps(fn)
    def wrapper(config: LMConfig = LMConfig(), *args):
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be a ch10.LMConfig, got {type(config).__name__}")
        return cached(config, *args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_cached_by_config
def lm_setup(config: LMConfig = LMConfig()) -> LMSetup:
    """Load the tiny LM of ``config.seed`` and fine-tune a copy on each task alone (cached by ``config``)."""
    lab = lm.tiny_lm(config.seed, progress=not config.lab, **dict(config.lab))
    kinds, sizes = zip(*config.tasks)
    stream = lm_merge.merge_stream(lab, kinds, sizes)
    probe = lm_merge.make_probe(lab, stream, config.n_pretrained, config.n_general, seed=config.seed)
    base = lm_merge.params_of(lab.model)
    setup = LMSetup(config, lab, stream, probe, base, (), (), lm_merge.model_with(lab, base))
    finetuned = tuple(setup.fine_tune(lm_merge.one_task(stream, k), seed=config.seed + k) for k in range(len(stream)))
    setup.finetuned = finetuned
    setup.task_vectors = tuple(merging.task_vector(ft, base) for ft in finetuned)
    return setup


def score_table(setup: LMSetup, states: dict[str, State], split: str = "test") -> pd.DataFrame:
    """One row per named state: each task's recall, their mean, pretraining-fact recall and perplexity."""
    return pd.DataFrame({label: setup.score(s, split) for label, s in states.items()}).T


def own_recall(setup: LMSetup, split: str = "test") -> np.ndarray:
    """Each fine-tune's recall on its own task [K]."""
    return np.array([setup.recall(ft, split)[k] for k, ft in enumerate(setup.finetuned)])


def cosine_matrix(task_vectors: Sequence[State]) -> np.ndarray:
    """cos(τ_i, τ_j) for every pair: [K, K] with ones on the diagonal."""
    k = len(task_vectors)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = merging.cosine_similarity(task_vectors[i], task_vectors[j])
    return out


# ---------------------------------------------------------------- the optimizer null


def null_stream(setup: LMSetup) -> Stream:
    """One task of pretraining facts the LM already recalls per task of the chapter, with about as many prompts
    (``lm.nulls.known_fact_stream``), disjoint from one another and from the probe's scored pretraining facts."""
    per_fact = renderings_per_fact(setup.lab.world)
    sizes = [max(1, round(len(t.y_train) / per_fact)) for t in setup.stream.tasks]
    return nulls.known_fact_stream(setup.lab, sizes, setup.config.seed, exclude=setup.probe.pretrained_facts)


@_cached_by_config
def null_finetunes(config: LMConfig = LMConfig()) -> tuple[State, ...]:
    """The optimizer null of each fine-tune: θ_0 fine-tuned exactly as task k's fine-tune is (steps, lr, batch,
    replay, seed) on the k-th task of ``null_stream``, which teaches nothing new. What the probe's pretraining
    facts lose there is the optimizer's own cost; merging these states is the null of a merge."""
    setup = lm_setup(config)
    null = null_stream(setup)
    return tuple(setup.fine_tune(lm_merge.one_task(null, k), seed=config.seed + k) for k in range(len(null)))


@_cached_by_config
def null_sequential(config: LMConfig = LMConfig()) -> State:
    """The optimizer null of sequential fine-tuning: θ_0 through ``null_stream``'s tasks in order at the
    chapter's settings, as ``multitask_and_sequential`` goes through the real ones."""
    setup = lm_setup(config)
    return setup.fine_tune(null_stream(setup), seed=config.seed)


# ---------------------------------------------------------------- task arithmetic and negation


def lm_lambda_curve(setup: LMSetup, lams: Sequence[float], split: str = "test") -> pd.DataFrame:
    """θ_0 + λ·Σ τ_k for each λ: every task's recall, the mean, pretraining-fact recall and perplexity."""
    rows = [{"lam": float(lam), **setup.score(merging.task_arithmetic(setup.base, setup.task_vectors, lam), split)}
            for lam in lams]
    return pd.DataFrame(rows)


def plot_lm_lambda_curve(curve: pd.DataFrame, names: Sequence[str], own: float | None = None,
                         multitask: float | None = None):
    """Task recall (each task and the mean) and pretraining-fact recall against λ; perplexity on a twin axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in names:
        ax.plot(curve.lam, curve[name], ".-", lw=1, label=name)
    ax.plot(curve.lam, curve["mean"], "k-", lw=2.5, label="mean over the tasks")
    ax.plot(curve.lam, curve["pretrained"], "-", color="tab:brown", lw=2, label="pretraining facts")
    if own is not None:
        ax.axhline(own, color="k", ls=":", lw=1, label="fine-tunes, each on its own task")
    if multitask is not None:
        ax.axhline(multitask, color="tab:green", ls="--", lw=1, label="multi-task training")
    soup = 1 / len(names)
    ax.axvline(soup, color="grey", lw=0.8)
    ax.text(soup, 0.02, " soup (λ = 1/K)", fontsize=7, color="grey")
    ax.set(xlabel="λ", ylabel="recall (test half)", ylim=(0, 1.05), title="task arithmetic θ0 + λ Σ τ_k on the LM")
    twin = ax.twinx()
    twin.plot(curve.lam, curve["perplexity"], "--", color="tab:red", lw=1)
    twin.set_ylabel("general perplexity (dashed)", color="tab:red")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()
    return fig


def matched_noise(tau: State, seed: int) -> State:
    """A random direction with τ's norm in every tensor (seeded): the null control for subtracting τ."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tau.items():
        noise = torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)  # drawn on the CPU, as seeded
        out[k] = noise * (v.norm() / noise.norm().clamp(min=1e-12))
    return out


def negation(setup: LMSetup, start: State, lams: Sequence[float] = (0.5, 1.0), seed: int = 0) -> pd.DataFrame:
    """Forgetting on purpose: ``start`` − λ·τ_k for every task k and λ, and the null control ``start`` − λ·ε_k
    with ε_k a random direction of τ_k's per-tensor norms. Rows: (subtracted, λ); columns: the probe's."""
    rows = {("nothing", 0.0): setup.score(start)}
    for k, (name, tau) in enumerate(zip(setup.names, setup.task_vectors)):
        noise = matched_noise(tau, seed + k)
        for lam in lams:
            rows[(f"τ of {name}", lam)] = setup.score(merging.task_arithmetic(start, [merging.negate(tau)], lam))
            rows[(f"random, ‖τ‖ of {name}", lam)] = setup.score(
                merging.task_arithmetic(start, [merging.negate(noise)], lam))
    table = pd.DataFrame(rows).T
    table.index.names = ["subtracted", "λ"]
    return table


# ---------------------------------------------------------------- TIES and DARE, chosen on held-out facts


def best_lambda(setup: LMSetup, make, lams: Sequence[float]) -> tuple[float, State]:
    """The λ (and its merge) with the best mean validation recall over the tasks."""
    best = None
    for lam in lams:
        state = make(lam)
        val = setup.recall(state, "val").mean()
        if best is None or val > best[0]:
            best = (val, float(lam), state)
    return best[1], best[2]


def merge_grid(setup: LMSetup, lams: Sequence[float], densities: Sequence[float] = (0.2, 0.5),
               drop_rates: Sequence[float] = (0.5, 0.9), seed: int = 0) -> pd.DataFrame:
    """Task arithmetic, TIES at each density, DARE and DARE-TIES at each drop rate: each with the λ from
    ``lams`` that maximises the mean validation recall, scored on the test halves (one row per merge)."""
    base, taus = setup.base, setup.task_vectors
    makers = {"task arithmetic": lambda lam: merging.task_arithmetic(base, taus, lam)}
    for d in densities:
        makers[f"TIES, density {d:g}"] = lambda lam, d=d: merging.ties_merge(base, taus, d, lam)
    for p in drop_rates:
        makers[f"DARE, p = {p:g}"] = lambda lam, p=p: merging.dare_merge(base, taus, p, lam, seed)
        makers[f"DARE-TIES, p = {p:g}"] = lambda lam, p=p: merging.dare_ties_merge(base, taus, p, lam, seed)
    rows = {}
    for name, make in makers.items():
        lam, state = best_lambda(setup, make, lams)
        rows[name] = {"λ (validation)": lam, **setup.score(state)}
    return pd.DataFrame(rows).T


@_cached_by_config
def delta_sizes(config: LMConfig = LMConfig(), task: int = 0, scales: tuple[float, ...] = (1.0, 3.0, 10.0)
                ) -> dict[float, State]:
    """τ of task ``task`` fine-tuned at each multiple of the chapter's learning rate (its steps and replay):
    deltas that grow with the step size. Keyed by the learning rate; scale 1 is the chapter's own τ."""
    setup = lm_setup(config)
    one = lm_merge.one_task(setup.stream, task)
    return {config.lr * scale: (setup.task_vectors[task] if scale == 1 else merging.task_vector(
        setup.fine_tune(one, lr=config.lr * scale, seed=config.seed + task), setup.base)) for scale in scales}


def dare_sweep(setup: LMSetup, deltas: dict[str, tuple[int, State]],
               drop_rates: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99), draws: int = 2,
               seed: int = 0) -> pd.DataFrame:
    """θ_0 + DARE_p(τ) for each named (task, τ) and drop rate p: recall of that task on all its test facts
    (validation and test halves; mean over ``draws`` masks), beside τ's mean |τ| per weight (2-D weights) and
    that relative to mean |θ_0|. Also the same drop at p = 0.9 without the 1/(1 − p) rescale: the null that
    shows what the rescale does."""
    _validate.positive_int("draws", draws)
    scratch, pad = setup._scratch, setup.lab.tokenizer.pad_token_id
    base_size = lm_merge.mean_abs(setup.base)
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for label, (task, tau) in deltas.items():
        x = torch.cat([setup.probe.val[task][0], setup.probe.test[task][0]])  # [N, L]
        y = torch.cat([setup.probe.val[task][1], setup.probe.test[task][1]])  # [N]

        def recall(state: State) -> float:
            lm_merge.load_params(scratch, state)
            return (object_logits(scratch, x, pad).argmax(1) == y).double().mean().item()

        size = lm_merge.mean_abs(tau)
        row = {"task": setup.names[task], "mean |τ|": size, "mean |τ| / mean |θ0|": size / base_size}
        for p in drop_rates:
            n = 1 if p == 0 else draws
            row[p] = float(np.mean([recall(merging.add_task_vector(setup.base, merging.dare(tau, p, gen)))
                                    for _ in range(n)]))
        unscaled = {k: v * (1 - 0.9) for k, v in merging.dare(tau, 0.9, gen).items()}
        row["p = 0.9, no rescale"] = recall(merging.add_task_vector(setup.base, unscaled))
        rows[label] = row
    return pd.DataFrame(rows).T.astype({c: float for c in ["mean |τ|", "mean |τ| / mean |θ0|", *drop_rates,
                                                         "p = 0.9, no rescale"]})


def safe_drop_rate(sweep: pd.DataFrame, tolerance: float = 0.05) -> pd.Series:
    """Per row: the largest drop rate p whose recall stays within ``tolerance`` of the undropped delta's
    (p = 0), scanning p upwards and stopping at the first that does not."""
    rates = sorted(c for c in sweep.columns if isinstance(c, float))
    out = {}
    for label, row in sweep.iterrows():
        safe = 0.0
        for p in rates:
            if row[p] < row[0.0] - tolerance:
                break
            safe = p
        out[label] = safe
    return pd.Series(out, name="largest safe p")


def plot_dare_sweep(sweep: pd.DataFrame):
    rates = [c for c in sweep.columns if isinstance(c, float)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, row in sweep.iterrows():
        ax.plot(rates, [row[p] for p in rates], "o-", ms=3, label=f"{label}: mean |τ| = {row['mean |τ|']:.1e}")
    ax.set(xlabel="drop rate p (survivors × 1/(1 − p))", ylabel="task recall of θ0 + DARE_p(τ)", ylim=(0, 1.05),
           title="DARE on one fine-tune: how much of the delta can go?")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- against multi-task and sequential training


@_cached_by_config
def multitask_and_sequential(config: LMConfig = LMConfig()) -> dict:
    """From θ_0, at the chapter's settings: multi-task training on the balanced union of the tasks for K times
    the steps of one fine-tune (as many samples as the K fine-tunes together), and sequential fine-tuning
    through the tasks in order (its final state and its accuracy matrix R over the tasks)."""
    setup = lm_setup(config)
    k = len(setup.stream)
    multitask = setup.fine_tune(lm_merge.balanced_union(setup.stream, config.seed), steps=config.steps * k,
                                seed=config.seed)
    model = lm_merge.model_with(setup.lab, setup.base)
    run = train.fit(lm.LMClassifier(model, setup.lab.tokenizer.pad_token_id), setup.stream, setup.replay(config.seed),
                    steps=config.steps, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                    device="cpu", progress=False)
    return {"multi-task": multitask, "sequential": lm_merge.params_of(model), "R": run.R}


# ---------------------------------------------------------------- LoRA adapters: summed or routed


@_cached_by_config
def lora_deltas(config: LMConfig = LMConfig(), rank: int = 8, alpha: float = 16.0, lr: float = 1e-3
                ) -> tuple[State, ...]:
    """One LoRA adapter per task from θ_0 (PEFT, rank ``rank``, scale α/r, the chapter's steps and replay), as
    dense deltas ΔW_k."""
    setup = lm_setup(config)
    return tuple(lm_merge.lora_delta(setup.lab, setup.base, lm_merge.one_task(setup.stream, k), rank=rank, alpha=alpha,
                                  steps=config.steps, lr=lr, batch_size=config.batch_size, seed=config.seed + k,
                                  method=setup.replay(config.seed + k))
                 for k in range(len(setup.stream)))


def routed_vs_summed(setup: LMSetup, deltas: Sequence[State]) -> pd.DataFrame:
    """Adapters kept apart, each task read through its own (routed by the task id), against all summed into
    the weights (θ_0 + Σ ΔW_k, one model, no task id). The routed row's pretraining recall and perplexity are
    the mean over the K adapted models."""
    per_adapter = [setup.score(merging.add_task_vector(setup.base, d)) for d in deltas]
    routed = {name: per_adapter[k][name] for k, name in enumerate(setup.names)}
    routed["mean"] = float(np.mean([routed[n] for n in setup.names]))
    for col in ("pretrained", "perplexity"):
        routed[col] = float(np.mean([row[col] for row in per_adapter]))
    summed = setup.score(merging.task_arithmetic(setup.base, deltas, 1.0))
    return pd.DataFrame({"routed (own adapter per task)": routed, "summed (one merged model)": summed}).T


# ---------------------------------------------------------------- WiSE-FT


def lm_wise_curve(setup: LMSetup, finetuned: State, task: int = 0,
                  alphas: Sequence[float] = tuple(np.round(np.linspace(0, 1, 6), 2))) -> pd.DataFrame:
    """WiSE-FT between θ_0 and ``finetuned`` (a fine-tune on ``task``): the task's recall, pretraining-fact
    recall and perplexity at each α."""
    rows = []
    for alpha in alphas:
        row = setup.score(merging.wise_ft(setup.base, finetuned, float(alpha)))
        rows.append({"alpha": float(alpha), "task": row[setup.names[task]], "pretrained": row["pretrained"],
                     "perplexity": row["perplexity"]})
    return pd.DataFrame(rows)


def plot_wise(curves: dict[str, pd.DataFrame], base_perplexity: float):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, c in curves.items():
        line, = ax.plot(c["task"], c["perplexity"], "o-", ms=3, label=label)
        bx.plot(c["task"], c["pretrained"], "o-", ms=3, color=line.get_color(), label=label)
        for _, row in c.iloc[[1, -2]].iterrows():
            ax.annotate(f"α={row.alpha:.1f}", (row["task"], row["perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(base_perplexity, color="tab:green", ls=":", label="pretrained LM")
    ax.set(xlabel="task recall", ylabel="general perplexity", title="WiSE-FT: (1 − α)·θ0 + α·θ_ft")
    bx.set(xlabel="task recall", ylabel="pretraining-fact recall", title="what the interpolation keeps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- playground


def merge_point(lam: float = 1.0, density: float = 0.5, config: LMConfig = LMConfig()) -> dict:
    """The playground: task arithmetic at ``lam`` and TIES at (``density``, ``lam``) on the LM: each task's
    recall, the pretraining facts and perplexity, beside each fine-tune on its own task. The fine-tunes are
    cached by ``config``; a point only merges and scores (about a second)."""
    lam = _validate.finite("lam", lam)
    merging.ties_trim({"w": torch.ones(1)}, density)  # the density check, with its message
    setup = lm_setup(config)
    own = own_recall(setup)
    return {"lam": lam, "density": density, "tasks": setup.names, "own fine-tune": own,
            "task arithmetic": setup.score(merging.task_arithmetic(setup.base, setup.task_vectors, lam)),
            "TIES": setup.score(merging.ties_merge(setup.base, setup.task_vectors, density, lam)),
            "base": setup.score(setup.base)}


def plot_merge_point(result: dict):
    """Bars per task (own fine-tune, task arithmetic, TIES) and the pretraining facts; perplexities in the title."""
    labels = [*result["tasks"], "pretraining facts"]
    own = [*result["own fine-tune"], result["base"]["pretrained"]]
    ta = [result["task arithmetic"][n] for n in result["tasks"]] + [result["task arithmetic"]["pretrained"]]
    ties = [result["TIES"][n] for n in result["tasks"]] + [result["TIES"]["pretrained"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(labels))
    ax.bar(x - 0.27, own, 0.27, color="lightgrey", label="own fine-tune (θ0 for the pretraining facts)")
    ax.bar(x, ta, 0.27, color="tab:blue", label=f"task arithmetic, λ = {result['lam']:.2f}")
    ax.bar(x + 0.27, ties, 0.27, color="tab:orange", label=f"TIES, density {result['density']:.2f}, same λ")
    ax.set_xticks(x, labels, fontsize=8)
    ppl = {k: result[k]["perplexity"] for k in ("base", "task arithmetic", "TIES")}
    ax.set(ylabel="recall (test half)", ylim=(0, 1.05),
           title=f"perplexity: θ0 {ppl['base']:.2f}, TA {ppl['task arithmetic']:.2f}, TIES {ppl['TIES']:.2f}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    return fig


# ================================================================ the MLP: a shared initialisation


@lru_cache(maxsize=4)
def mnist_stream(n_tasks: int = 2) -> Stream:
    """Task 0 is original MNIST (the "pretraining" task), tasks 1..n_tasks permuted MNIST, Domain-IL."""
    _validate.positive_int("n_tasks", n_tasks)
    return data.permuted(mnist(), n_tasks + 1, "domain")


def one_task(stream: Stream, task_id: int) -> Stream:
    """A one-task stream (training and evaluation) holding only ``stream``'s task ``task_id``."""
    stream.check_task_id(task_id)
    t = stream.tasks[task_id]
    return Stream(f"{stream.name}[{t.name}]", stream.scenario,
                  [Task(0, t.name, t.x_train, t.y_train, t.x_test, t.y_test, t.classes)],
                  stream.n_out, stream.input_shape)


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
                      seed: int = 0, device: str = "cpu") -> dict[str, pd.DataFrame]:
    """Linear paths on permuted task 1 between (a) two fine-tunes of a pretrained θ_0 that differ only in data
    order, (b) two networks trained from scratch from the same random init (different data order), (c) two
    networks trained from scratch from different random inits, (d) the fine-tunes of θ_0 on two different
    tasks (path evaluated on both tasks). θ_0 is the MLP trained on original MNIST."""
    _validate.positive_int("pretrain_steps", pretrain_steps)
    _validate.positive_int("steps", steps)
    dev = pick_device(device, verbose=False)
    stream = mnist_stream(2)
    init = random_init(hidden, seed, dev)
    base = fine_tune(init, stream, 0, hidden, pretrain_steps, seed, dev)
    ft1 = fine_tune(base, stream, 1, hidden, steps, seed + 1, dev)
    ft2 = fine_tune(base, stream, 2, hidden, steps, seed + 2, dev)
    twin = fine_tune(base, stream, 1, hidden, steps, seed + 100, dev)
    other_init = random_init(hidden, seed + 1000, dev)
    scratch_a = fine_tune(init, stream, 1, hidden, pretrain_steps, seed + 200, dev)
    scratch_b = fine_tune(init, stream, 1, hidden, pretrain_steps, seed + 300, dev)
    scratch_c = fine_tune(other_init, stream, 1, hidden, pretrain_steps, seed + 300, dev)
    task1 = [test_sets(stream)[1]]
    return {"fine-tunes of θ0 (same task)": linear_path(ft1, twin, task1, hidden),
            "from scratch, same init": linear_path(scratch_a, scratch_b, task1, hidden),
            "from scratch, different inits": linear_path(scratch_a, scratch_c, task1, hidden),
            "fine-tunes of θ0 (tasks 1 and 2)": linear_path(ft1, ft2, test_sets(stream)[1:3], hidden)}


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
