"""Chapter 13 helpers (continual pretraining and continual learning in production).

On the tiny LM (``cl_lab.lm``): continual pretraining on a starship domain with new words (schedules, replay
share, vocabulary initialisation, checkpoint choice), drift detection on prompt embeddings, the shadow
evaluation / canary / fallback of a release, per-tenant adapters with versions. On rotated MNIST: an EMA of the
weights against EWC and replay at equal steps. And the cost model of a year of monthly updates, in counted
floating-point operations and in this machine's measured seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cl_lab import _validate, data, drift, lm, models, timing, train
from cl_lab.chapters.ch02 import mnist
from cl_lab.lm import cpt, nulls, serving
from cl_lab.lm.evaluate import hits
from cl_lab.lm.lab import LMClassifier
from cl_lab.lm.tokenizer import encode
from cl_lab.lm.world import BASE_RELATIONS
from cl_lab.methods.ema import EMA
from cl_lab.methods.regularization import EWC
from cl_lab.methods.replay import ER

DOMAIN_SHIPS = 8  # starships in the new domain: 16 facts, 32 trained renderings, 16 held out
STEPS = 150  # continual-pretraining steps of 80 tokens
SHARES = (0.0, 0.01, 0.05, 0.25)
SCHEDULE_NAMES = {"rewarm": "re-warm to 1e-3, re-decay", "constant": "constant 3e-4",
                  "rewarm-flat": "re-warm to 1e-3, no decay"}
COLORS = {"rewarm": "tab:red", "constant": "tab:blue", "rewarm-flat": "tab:orange"}
LIVE_ADAPTERS = (0, 1, 2, 4)  # live adapters a request is priced with (the cost model's overhead is the slope)


# ================================================================ continual pretraining

@lru_cache(maxsize=4)
def lab_of(seed: int = 0, smoke: bool = False) -> lm.Lab:
    """The tiny LM of ``seed`` (pretrained once, then loaded from the disk cache; kept in memory here); with
    ``smoke``, the 1-layer lab of ``lm.SMOKE_CONFIG`` (seconds to pretrain), for SMOKE runs."""
    return lm.tiny_lm(seed, progress=not smoke, **(lm.SMOKE_CONFIG if smoke else {}))


def domain_of(lab: lm.Lab) -> lm.Domain:
    return lab.world.new_domain(DOMAIN_SHIPS)


def cpt_point(seed: int = 0, schedule: str = "rewarm", replay_share: float = 0.05, *, steps: int = STEPS,
              init: str = "random", order: int = 0, eval_every: int = 30, smoke: bool = False) -> cpt.CPTRun:
    """One continual-pretraining run of the chapter (``cpt.continual_pretrain`` on lab ``seed``'s starship
    domain, 80 tokens a step); ``order`` > 0 draws another data order (the null control)."""
    lab = lab_of(seed, smoke)
    return cpt.continual_pretrain(lab, domain_of(lab), steps=steps, replay_share=replay_share, schedule=schedule,
                                  init=init, eval_every=min(eval_every, steps), seed=seed + 100 * order)


def null_point(seed: int = 0, schedule: str = "rewarm", replay_share: float = 0.05, *, steps: int = STEPS,
               eval_every: int = 30, n_facts: int = 16, smoke: bool = False) -> cpt.CPTRun:
    """The optimizer null of ``cpt_point``: the same run (schedule, replay, steps, new words, data order) on the
    sentences of ``n_facts`` pretraining facts the model already recalls (16 facts: 64 sentences, as many as the
    domain's texts), drawn outside the old facts the run scores. What it loses of the old facts is the optimizer's
    own cost. (A SMOKE lab recalls no fact: there the draw is among all facts.)"""
    lab = lab_of(seed, smoke)
    task = nulls.known_fact_task(lab, n_facts, seed, exclude=cpt.old_sample(lab.world), require_known=not smoke)
    return cpt.continual_pretrain(lab, domain_of(lab), steps=steps, replay_share=replay_share, schedule=schedule,
                                  eval_every=min(eval_every, steps), new_texts=[f.sentence for f in task.train_facts],
                                  seed=seed)


def summary(runs: dict) -> pd.DataFrame:
    """One row per run: the last checkpoint's measurements, their mean (old + new) / 2, the replayed share of
    tokens and of sentences, and how far the old embedding rows moved."""
    rows = {}
    for name, run in runs.items():
        f = run.final
        rows[name] = {"old": f.old, "new": f.new, "new_paraphrase": f.new_paraphrase, "general_ppl": f.test_ppl,
                      "mean(old, new)": (f.old + f.new) / 2, "replayed tokens": run.token_share,
                      "replayed sentences": run.sentence_share, "old rows moved": run.old_embeddings["relative"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_schedules(runs: dict, steps: int = STEPS):
    """The learning rate, old facts, new facts and general perplexity against the step, one line per schedule."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for schedule, run in runs.items():
        h, color = run.history, COLORS.get(schedule)
        axes[0].plot(range(steps), [cpt.lr_at(s, steps, schedule) for s in range(steps)], color=color,
                     label=SCHEDULE_NAMES.get(schedule, schedule))
        for ax, col in zip(axes[1:], ("old", "new", "test_ppl")):
            ax.plot(h.step, h[col], "o-", color=color, ms=3)
    titles = ("learning rate", "old facts recalled", "new facts recalled", "general perplexity (test half)")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="step")
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_replay(table: pd.DataFrame):
    """Old recall, new recall and general perplexity against the replay share, one line per schedule."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for schedule, part in table.groupby("schedule", sort=False):
        part = part.sort_values("share")
        x = np.arange(len(part))
        for ax, col in zip(axes, ("old", "new", "general_ppl")):
            ax.plot(x, part[col], "o-", color=COLORS.get(schedule), label=SCHEDULE_NAMES.get(schedule, schedule))
            ax.set_xticks(x, [f"{s:.0%}" for s in part.share])
    for ax, title in zip(axes, ("old facts recalled", "new facts recalled", "general perplexity")):
        ax.set(title=title, xlabel="replayed share of tokens")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def early_stop(history: pd.DataFrame, max_rise: float = 0.1) -> pd.Series:
    """Early stopping on the general probe: the last checkpoint before the first one whose probe perplexity is
    more than (1 + ``max_rise``) × the base model's (step 0); the last checkpoint if none is."""
    _validate.non_negative("max_rise", max_rise)
    over = np.flatnonzero(history.probe_ppl.to_numpy() > (1 + max_rise) * history.probe_ppl.iloc[0])
    return history.iloc[over[0] - 1] if len(over) else history.iloc[-1]


def checkpoint_table(runs: dict, max_rise: float = 0.1) -> pd.DataFrame:
    """For each run: the checkpoint early stopping on the probe keeps and the last one (step, old and new recall,
    probe and test-half perplexity), and the probe's peak over the run relative to the base model's."""
    rows = []
    for name, run in runs.items():
        h = run.history
        for rule, row in ((f"early stop (probe +{max_rise:.0%})", early_stop(h, max_rise)), ("last", h.iloc[-1])):
            rows.append({"run": name, "rule": rule, "step": int(row.step), "old": row.old, "new": row.new,
                         "probe_ppl": row.probe_ppl, "test_ppl": row.test_ppl,
                         "probe / its peak": row.probe_ppl / h.probe_ppl.max()})
    return pd.DataFrame(rows)


def replay_table(runs: dict) -> pd.DataFrame:
    """``summary`` of runs keyed by (schedule, replay share), with those two as columns."""
    table = summary({f"{schedule} {share:.0%}": run for (schedule, share), run in runs.items()})
    table.insert(0, "share", [share for _, share in runs])
    table.insert(0, "schedule", [schedule for schedule, _ in runs])
    return table


def plot_checkpoints(runs: dict):
    """Probe perplexity and new-domain recall against the step, the early-stopping and last checkpoints marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, run in runs.items():
        h, color = run.history, COLORS.get(name)
        axes[0].plot(h.step, h.probe_ppl, "o-", color=color, ms=3, label=SCHEDULE_NAMES.get(name, name))
        axes[1].plot(h.step, h.new, "o-", color=color, ms=3)
        stop = early_stop(h)
        axes[0].plot(stop.step, stop.probe_ppl, "kx", ms=10)
    axes[0].axhline(1.1 * next(iter(runs.values())).history.probe_ppl.iloc[0], color="grey", ls=":", lw=1)
    axes[0].set(title="general probe perplexity (x: early stop)", xlabel="step", yscale="log")
    axes[1].set(title="new facts recalled", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def step0_perplexity(seed: int, init: str, smoke: bool = False) -> float:
    """General perplexity (test half) of the extended model before any training, new rows initialised ``init``."""
    lab = lab_of(seed, smoke)
    ext = cpt.extend_for_domain(lab, domain_of(lab), init, seed=seed)
    _, test = cpt.probe_split(lab.world.general_test, seed=lab.world.seed)
    return lm.perplexity(ext.model, ext.tokenizer, test)


def plot_point(run: cpt.CPTRun):
    """The playground's figure: old/new recall and general perplexity of one run against the step."""
    h = run.history
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(h.step, h.old, "o-", label="old facts")
    ax.plot(h.step, h.new, "o-", label="new facts")
    ax.set(ylim=(-0.02, 1.02), xlabel="step", ylabel="recall")
    twin = ax.twinx()
    twin.plot(h.step, h.test_ppl, "k--", label="general ppl")
    twin.set(ylabel="general perplexity", yscale="log")
    c = run.config
    ax.set_title(f"{SCHEDULE_NAMES.get(c['schedule'], c['schedule'])}, replay {c['replay_share']:.0%}: "
                 f"old {h.old.iloc[-1]:.2f}, new {h.new.iloc[-1]:.2f}, ppl {h.test_ppl.iloc[-1]:.1f}", fontsize=9)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    return fig


# ================================================================ drift detection

def traffic(lab: lm.Lab) -> dict[str, list[str]]:
    """Prompts a deployed model might see: ``known`` (the pretrained facts' prompts, every template),
    ``question format`` (the same people asked "Q: … A:"), ``new people`` (the same templates about 40 people
    never seen)."""
    world = lab.world
    fresh = world.fresh_subjects(40)
    trained, held = world.render_split(world.assign_objects(fresh, BASE_RELATIONS, tag="traffic"), tag="traffic")
    questions = [f.prompt for r in BASE_RELATIONS for f in world.questions(r.name, world.subjects)]
    return {"known": [f.prompt for f in world.train_facts + world.heldout_facts], "question format": questions,
            "new people": [f.prompt for f in trained + held]}


def drift_pools(lab: lm.Lab, seed: int = 0, n_reference: int = 128, n_calibration: int | None = None) -> dict:
    """Prompt embeddings of ``traffic``: the known prompts split at random into a reference, a calibration pool
    and the pool the stream draws from (by default of equal size: the calibration windows are then drawn exactly
    as the stream's are); the shifted pools whole."""
    prompts = traffic(lab)
    emb = {k: serving.prompt_embeddings(lab.model, lab.tokenizer, v) for k, v in prompts.items()}
    known = emb.pop("known")
    if n_calibration is None:
        n_calibration = (len(known) - n_reference) // 2
    if n_reference + n_calibration >= len(known):
        raise ValueError(f"n_reference + n_calibration must leave prompts for the stream (< {len(known)}), "
                         f"got {n_reference + n_calibration}")
    order = torch.randperm(len(known), generator=torch.Generator().manual_seed(seed))
    cut = n_reference + n_calibration
    return {"reference": known[order[:n_reference]], "calibration": known[order[n_reference:cut]],
            "pool": known[order[cut:]], "shifted": emb}


def drift_experiment(pools: dict, *, shares=(0.1, 0.25), runs: int = 100, windows: int = 20, shift_at: int = 10,
                     window: int = 32, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """An MMD detector calibrated at ``alpha`` per window, monitored over ``runs`` seeded streams for each shifted
    pool and share, under both alarm rules (one row each); the stationary streams are drawn once."""
    det = drift.MMDDetector.fit(pools["reference"], pools["calibration"], window=window, alpha=alpha, seed=seed)
    kwargs = dict(runs=runs, windows=windows, window=window)
    still = drift.stream_alarms(det, pools["pool"], seed=seed + 10, **kwargs)
    rows = []
    for kind, shifted in pools["shifted"].items():
        for share in shares:
            moved = drift.stream_alarms(det, pools["pool"], shifted=shifted, share=share, shift_at=shift_at,
                                        seed=seed, **kwargs)
            rows += [{"shift": kind, "share": share, **drift.summarize(still, moved, shift_at, rule)}
                     for rule in drift.RULES]
    return pd.DataFrame(rows)


def plot_drift(table: pd.DataFrame):
    """Detection rate and mean delay per shift and share, one bar group per alarm rule."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    labels = [f"{r.shift}\n{r.share:.0%}" for r in table[table.rule == drift.RULES[0]].itertuples()]
    x = np.arange(len(labels))
    for i, rule in enumerate(drift.RULES):
        part = table[table.rule == rule]
        axes[0].bar(x + 0.4 * i, part.detected, 0.4, label=rule)
        axes[1].bar(x + 0.4 * i, part["mean delay"], 0.4, label=rule)
    for ax, title in zip(axes, ("runs with an alarm after the shift", "windows from shift to alarm (mean)")):
        ax.set_xticks(x + 0.2, labels, fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ================================================================ shipping an update

def guard_outcomes(labs: dict, facts: list, tolerance: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """[N] bool outcomes on the guard queries ``facts`` for each lab, plus two synthetic candidates built from the
    first (the control): one made wrong on exactly ``tolerance``·N of its correct answers, drawn at random (its
    accuracy drop is the tolerance), one on twice as many."""
    out = {name: hits(lab.model, lab.tokenizer, facts).numpy()
           for name, lab in labs.items()}
    control = next(iter(out.values()))
    rng = np.random.default_rng(seed)
    correct = np.flatnonzero(control)
    for label, share in ((f"synthetic, −{tolerance:.0%} (at tolerance)", tolerance),
                         (f"synthetic, −{2 * tolerance:.0%}", 2 * tolerance)):
        wrong = rng.choice(correct, size=min(round(share * len(control)), len(correct)), replace=False)
        out[label] = control.copy()
        out[label][wrong] = False
    return out


# ================================================================ adapters per tenant

def _format_trainer(task, steps: int, lr: float, *, shuffle: bool = False, seed: int = 0, batch_size: int = 16):
    def fit_adapter(model) -> None:
        clf = LMClassifier(model, 0)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        y = task.y_train[torch.randperm(len(task.y_train), generator=gen)] if shuffle else task.y_train
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(y), (batch_size,), generator=gen)
            loss = F.cross_entropy(clf(task.x_train[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return fit_adapter


@torch.no_grad()
def _task_logits(model, task) -> torch.Tensor:
    clf = LMClassifier(model, 0).eval()
    return clf(task.x_test)  # [N, V]


def tenants(lab: lm.Lab, *, steps: int = 30, lr: float = 3e-3, n_subjects: int = 40, seed: int = 0) -> dict:
    """Two tenants, each wanting one relation answered in the question format ("Q: where does X live ? A:"),
    on one frozen base with a LoRA adapter per tenant (``serving.AdapterRegistry``). Tenant ``city`` then
    publishes a bad v2 (trained on shuffled answers), the guard sees its accuracy drop, and it rolls back.

    Returns the registry, the event log (accuracy of each tenant after each event, and whether the other
    tenant's logits stayed bit-identical), the CPU seconds of training one adapter, and the two tasks.
    """
    stream = lm.fact_stream(lab, n_tasks=2, kind="format", n_subjects=n_subjects)
    tasks = {"city": stream.tasks[0], "job": stream.tasks[1]}
    reg = serving.AdapterRegistry(lab)
    log = []

    def accuracy(tenant: str) -> float:
        logits = _task_logits(reg.serve(tenant), tasks[tenant])
        return (logits.argmax(1) == tasks[tenant].y_test).double().mean().item()

    start = time.process_time()
    reg.publish("city", _format_trainer(tasks["city"], steps, lr, seed=seed))
    train_seconds = time.process_time() - start
    log.append({"event": "publish city v1", "city": accuracy("city"), "job": np.nan, "other tenant unchanged": np.nan})
    reg.publish("job", _format_trainer(tasks["job"], steps, lr, seed=seed))
    city_v1 = _task_logits(reg.serve("city"), tasks["city"])
    log.append({"event": "publish job v1", "city": accuracy("city"), "job": accuracy("job"),
                "other tenant unchanged": torch.equal(city_v1, _task_logits(reg.serve("city"), tasks["city"]))})
    job_v1 = _task_logits(reg.serve("job"), tasks["job"])
    reg.publish("city", _format_trainer(tasks["city"], steps, lr, shuffle=True, seed=seed))
    log.append({"event": "publish city v2 (bad data)", "city": accuracy("city"), "job": accuracy("job"),
                "other tenant unchanged": torch.equal(job_v1, _task_logits(reg.serve("job"), tasks["job"]))})
    reg.rollback("city")
    log.append({"event": "roll city back to v1", "city": accuracy("city"), "job": accuracy("job"),
                "other tenant unchanged": torch.equal(job_v1, _task_logits(reg.serve("job"), tasks["job"]))})
    restored = torch.equal(city_v1, _task_logits(reg.serve("city"), tasks["city"]))
    return {"registry": reg, "log": pd.DataFrame(log).set_index("event"), "train_seconds": train_seconds,
            "restored": restored, "tasks": tasks,
            "base accuracy": {t: (_task_logits(lab.model, task).argmax(1) == task.y_test).double().mean().item()
                              for t, task in tasks.items()}}


def rollback_costs(result: dict, repeats: int = 20) -> pd.DataFrame:
    """What a rollback costs, three ways: move the pointer to the kept v1 adapter; load v1's serialized tensors
    into the live adapter; load a serialized full model (what a rollback of a full fine-tune needs). Best-of
    ``repeats`` seconds (``timing.best_times``) and the bytes each holds; retraining v1 for comparison."""
    reg = result["registry"]
    v1 = reg.versions["city"][0]
    adapter = serving.serialized_bytes(reg.adapter_state(v1))
    full = serving.serialized_bytes(reg.lab.model.state_dict())
    params = dict(reg.model.named_parameters())
    spare = copy.deepcopy(reg.lab.model)

    def load_adapter() -> None:
        state = torch.load(io.BytesIO(adapter))
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def load_full() -> None:
        spare.load_state_dict(torch.load(io.BytesIO(full)))

    times = timing.best_times({"pointer": lambda: reg.model.set_adapter(v1), "load adapter": load_adapter,
                               "load full model": load_full}, repeats=repeats)
    reg.model.set_adapter(v1)
    rows = {"move the pointer to v1": (times["pointer"], 0),
            "load v1's adapter tensors": (times["load adapter"], len(adapter)),
            "load a full model": (times["load full model"], len(full)),
            "retrain v1 (CPU time)": (result["train_seconds"], len(adapter))}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["seconds", "bytes"])


# ================================================================ EMA against EWC and replay

EMA_METHODS = ("naive", "naive (other order)", "EMA β=0.995", "EMA β=0.998", "EWC λ=100", "ER 300")


def _method(name: str, seed: int):
    if name.startswith("EMA"):
        return EMA(float(name.split("=")[1]))
    if name.startswith("EWC"):
        return EWC(lam=100.0, fisher="exact", seed=seed)
    if name.startswith("ER"):
        return ER(300, seed=seed)
    return None


def ema_experiment(seed: int = 0, *, steps: int = 200, methods=EMA_METHODS, angles=(0, 60, 120),
                   device: str = "auto") -> pd.DataFrame:
    """Rotated MNIST (``angles``, Domain-IL), an MLP 784-200-200-10, Adam 1e-3, batch 64, ``steps`` per task, the
    same steps and batch size for every method: naive, naive with another data order (the null control), EMA
    of the weights, EWC (exact Fisher on 500 samples per task), ER (reservoir of 300, half of each batch)."""
    stream = data.rotated(mnist(), angles, seed=seed)
    rows = []
    for name in methods:
        run_seed = seed + 1000 if "other order" in name else seed
        torch.manual_seed(run_seed)
        model = models.MLP(784, (200, 200), stream.n_out)
        start = time.process_time()
        run = train.fit(model, stream, _method(name, seed), steps=steps, lr=1e-3, batch_size=64, seed=run_seed,
                        device=device, progress=False)
        rows.append({"method": name, "AA": run.aa, "BWT": run.bwt, "last task": run.R[-1, -1],
                     "CPU seconds": time.process_time() - start})
    return pd.DataFrame(rows).set_index("method")


# ================================================================ the cost model

def _cost_operations(seed: int, smoke: bool) -> dict:
    """The operations the cost model prices, each a callable, on lab ``seed``: one pretraining step (64
    sentences), one continual-pretraining step (80 tokens, all weights), one LoRA step on the same batch (PEFT,
    rank 8 on every projection), one shadow evaluation (``serving.capability_matrix`` of one model), and one
    request (a prompt's forward pass) with 0, 1, 2 and 4 live unmerged adapters (``requests``). The models use
    eager attention, so that a FLOP counter sees every product (SDPA's fused kernel is invisible to it)."""
    from peft import LoraConfig, get_peft_model

    lab = lab_of(seed, smoke)
    dom = domain_of(lab)
    ext = cpt.extend_for_domain(lab, dom)
    batch = cpt.TokenMixer(encode(ext.tokenizer, dom.texts, add_eos=True),
                           encode(ext.tokenizer, lab.world.pretraining_texts(), add_eos=True),
                           ext.tokenizer.pad_token_id, replay_share=0.05, batch_tokens=80, seed=seed).next_batch()
    pre_ids = encode(lab.tokenizer, lab.world.pretraining_texts()[:64], add_eos=True)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                        lora_dropout=0.0)

    def copy_of(model):
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
        return model

    def trainer(model, ids):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def step() -> None:
            loss = lm.lm_loss(model, ids, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    evaluated = dataclasses.replace(ext, model=copy_of(ext.model))
    prompt = encode(lab.tokenizer, [lab.world.train_facts[0].prompt])
    served = {0: copy_of(lab.model).eval()}
    for k in LIVE_ADAPTERS[1:]:  # one model per count, its k adapters set active once (switching is not priced)
        served[k] = get_peft_model(copy_of(lab.model), config, adapter_name="a0").eval()
        for i in range(1, k):
            served[k].add_adapter(f"a{i}", config)
        served[k].base_model.set_adapter([f"a{i}" for i in range(k)])

    def request(model):
        def run() -> None:
            with torch.no_grad():
                model(input_ids=prompt)
        return run

    return {"steps": {"pretrain_step": trainer(copy_of(lab.model), pre_ids),
                      "update_step": trainer(copy_of(ext.model), batch),
                      "adapter_step": trainer(get_peft_model(copy_of(ext.model), config), batch)},
            "evaluation": lambda: serving.capability_matrix({"m": evaluated}, lab.world, dom),
            "requests": {k: request(m) for k, m in served.items()}}


def _with_overhead(costs: dict, requests: dict) -> dict:
    """``costs`` with the request's cost and the overhead per live adapter: the least-squares slope of the
    request's cost against the live adapters."""
    slope = float(np.polyfit(LIVE_ADAPTERS, [requests[k] for k in LIVE_ADAPTERS], 1)[0])
    return {**costs, "adapter_overhead": slope, "request": requests[0], "requests by live adapters": requests}


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def cost_inputs(seed: int = 0, repeats: int = 15, smoke: bool = False) -> dict:
    """The cost model's inputs two ways, on the same operations (``_cost_operations``):

    - ``"work"``: the floating-point operations of each, counted by ``torch.utils.flop_counter.FlopCounterMode``
      (every matrix product; element-wise work such as activations and the optimizer's update is not counted).
      Counted work is the same on any machine, at any thread count, under any load;
    - ``"seconds"``: this machine's seconds, each the best of ``repeats`` interleaved runs (``timing.best_times``;
      the evaluation timed once).

    Each has ``adapter_overhead``, the least-squares slope of a request's cost against its live adapters, and
    ``request``, a request's cost with none.
    """
    ops = _cost_operations(seed, smoke)
    work = {name: _flops(fn) for name, fn in ops["steps"].items()}
    work["evaluation"] = _flops(ops["evaluation"])
    work = _with_overhead(work, {k: _flops(fn) for k, fn in ops["requests"].items()})
    steps = timing.best_times(ops["steps"], repeats=repeats)
    evaluation = timing.best_times({"evaluation": ops["evaluation"]}, repeats=1, warmup=0)
    seconds = _with_overhead({**steps, **evaluation}, timing.best_times(ops["requests"], repeats=3 * repeats))
    return {"work": work, "seconds": seconds}


def corpus_growth(seed: int = 0, smoke: bool = False) -> float:
    """Tokens of one month's new data (the starship domain's texts) over the pretraining corpus's tokens."""
    lab = lab_of(seed, smoke)

    def tokens(texts) -> int:
        return sum(len(t.split()) + 1 for t in texts)
    return tokens(domain_of(lab).texts) / tokens(lab.world.pretraining_texts())


def plot_costs(totals: dict[str, pd.DataFrame], requests: float):
    """Cumulative cost of each strategy against the month, one panel per unit (e.g. counted FLOPs, seconds)."""
    fig, axes = plt.subplots(1, len(totals), figsize=(6 * len(totals), 3.4), squeeze=False)
    for ax, (unit, total) in zip(axes[0], totals.items()):
        for name in total.columns:
            ax.plot(total.index, total[name], "o-", ms=3, label=name)
        ax.set(xlabel="month", ylabel=f"cumulative {unit}", yscale="log", title=f"in {unit}")
        ax.legend(fontsize=8)
    fig.suptitle(f"a year of monthly updates ({requests:,.0f} requests a month)", fontsize=10)
    fig.tight_layout()
    return fig
