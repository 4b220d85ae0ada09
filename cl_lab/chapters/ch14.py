"""Chapter 14 helpers (RL after DPO, and RL's razor): the post-training chain base → SFT → DPO → RL on the tiny
language model, its capability matrix, what a KL or a verifier on the preference buys the RL stage, and a test
of Shenfeld et al.'s RL's razor (arXiv:2509.04259): SFT against GRPO on one new task, forgetting against the KL to
the starting model on the task's inputs, beside an optimizer null.

SFT and DPO come from ``cl_lab.lm.align`` (chapter 12's stages), GRPO from ``cl_lab.lm.rl``; this module runs
them the way the chapter tells it and draws the figures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate
from cl_lab.lm import BASE_RELATIONS, Lab, align, nulls, rl, tiny_lm
from cl_lab.lm.evaluate import fact_batch, object_logits
from cl_lab.lm.lab import lm_loss
from cl_lab.lm.tokenizer import EOS, PAD, encode
from cl_lab.lm.world import Fact

STAGES = ("base", "SFT", "DPO", "RL")
SHOWN = ("recall", "unseen recall", "instruction", "format", "win rate")  # the [0, 1] columns of the matrix
UNSEEN_SHARE = 0.5  # the share of the held-out people whose facts no stage and no remedy trains on
ANSWERED = tuple(r.name for r in BASE_RELATIONS if r.name != align.PRIVATE_RELATION)  # the RL task's relations


# ------------------------------------------------------------------ the chain: SFT, DPO, then RL

@dataclass
class Chain:
    """The lab, the chain's data (``align.alignment_data``), the SFT model, the DPO model (the RL stage's start and
    reference), the capability probe (``align.Probe``, with ``unseen`` facts of the ``holdout`` people, whom no
    stage trains on) and the probe's rows of the first three stages."""

    lab: Lab
    data: align.AlignmentData
    holdout: nulls.Holdout
    sft_model: nn.Module
    dpo_model: nn.Module
    probe: align.Probe
    rows: dict


def chain(seed: int = 0, *, sft_steps: int = 150, dpo_steps: int = 60, lab_config: dict | None = None) -> Chain:
    """The tiny LM of ``seed`` (``lab_config`` overrides ``LMConfig`` fields, e.g. ``lm.SMOKE_CONFIG``), its SFT
    into the question format (chapter 12's: lr 3·10⁻⁴, 32 examples a step) and plain DPO from the SFT model
    (β = 0.1, lr 5·10⁻⁴, 16 pairs a step); kept in memory per setting."""
    return _chain(seed, sft_steps, dpo_steps, tuple(sorted((lab_config or {}).items())))


@lru_cache(maxsize=2)
def _chain(seed: int, sft_steps: int, dpo_steps: int, lab_config: tuple) -> Chain:
    lab = tiny_lm(seed, progress=False, device="cpu", **dict(lab_config))
    n_sft = lab.world.n_subjects // 2
    data = align.alignment_data(lab.world, n_sft_subjects=n_sft, seed=seed)
    holdout = nulls.hold_out(lab.world, round(UNSEEN_SHARE * len(data.heldout_subjects)), seed,
                             among=data.heldout_subjects)
    held = set(holdout.subjects)
    sft_model = align.sft(lab, data, steps=sft_steps, lr=3e-4, seed=seed)
    dpo_model, _ = align.dpo(lab, sft_model, data.pairs,
                             align.DPOConfig(beta=0.1, steps=dpo_steps, lr=5e-4, seed=seed, probe_every=0),
                             texts=holdout.texts)
    probe = align.Probe(lab, data, sft_model, seen=[f for f in lab.world.train_facts if f.subject not in held],
                        unseen=holdout.facts, unseen_paraphrases=holdout.paraphrases, seed=seed)
    rows = {"base": probe(lab.model), "SFT": probe(sft_model), "DPO": probe(dpo_model)}
    return Chain(lab, data, holdout, sft_model, dpo_model, probe, rows)


def rl_facts(chain: Chain, *, verifier: bool = False) -> list[Fact]:
    """The RL stage's questions: the SFT people's questions on the relations the preference does not touch, and,
    with the ``verifier`` on the preference, their private questions too."""
    relations = ANSWERED + ((align.PRIVATE_RELATION,) if verifier else ())
    return [f for r in relations for f in chain.lab.world.questions(r, chain.data.sft_subjects)]


def rl_task(chain: Chain, *, verifier: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts [N, Lp] and allowed [N, V] for ``rl.grpo``: the right object is the one accepted answer; with the
    ``verifier``, a private question accepts the refusal ("in a city .") and nothing else: the preference DPO
    taught, checked by a rule at every RL step."""
    facts = rl_facts(chain, verifier=verifier)
    answers = [align.REFUSAL if f.relation == align.PRIVATE_RELATION else f.object for f in facts]
    return rl.question_task(chain.lab.tokenizer, facts, answers=answers)


def run_rl(chain: Chain, config: rl.GRPOConfig, *, verifier: bool = False, probe: bool = True
           ) -> tuple[nn.Module, pd.DataFrame]:
    """GRPO from the DPO model (also the KL's reference) on ``rl_task``, with the capability probe's trajectory."""
    prompts, allowed = rl_task(chain, verifier=verifier)
    return rl.grpo(chain.dpo_model, prompts, allowed, config, pad_id=PAD, eos_id=EOS,
                   probe=chain.probe if probe else None)


def capability_matrix(chain: Chain, rl_models: dict[str, nn.Module]) -> pd.DataFrame:
    """Rows base → SFT → DPO, then one per RL model; columns: the probe's measurements."""
    rows = dict(chain.rows)
    rows.update({name: chain.probe(model) for name, model in rl_models.items()})
    return pd.DataFrame(rows).T


@torch.no_grad()
def sampled_reward(chain: Chain, model: nn.Module, *, n_prompts: int = 32, group_size: int = 8, seed: int = 0
                   ) -> float:
    """The share of sampled answers the verifier accepts: ``group_size`` completions of ``n_prompts`` RL questions
    drawn at random (seeded). Zero means GRPO has nothing to work with: every advantage is 0."""
    prompts, allowed = rl_task(chain)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(prompts), generator=gen)[:n_prompts]
    ids, mask = rl.sample_completions(model, prompts[rows], PAD, EOS, group_size=group_size, max_new_tokens=3,
                                      generator=gen)
    return rl.answer_reward(ids, mask, allowed[rows].repeat_interleave(group_size, 0)).mean().item()


def plot_capability_matrix(R: pd.DataFrame) -> plt.Figure:
    """Left: the [0, 1] columns as a heat map, row by row along the chain; right: general perplexity."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(R) + 1.8), gridspec_kw={"width_ratios": [3, 1]})
    shown = R[list(SHOWN)].astype(float)
    left.imshow(shown.to_numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    left.set_xticks(range(len(SHOWN)), SHOWN, rotation=20)
    left.set_yticks(range(len(R)), R.index)
    for i in range(len(R)):
        for j in range(len(SHOWN)):
            left.text(j, i, f"{shown.iat[i, j]:.2f}", ha="center", va="center", fontsize=9)
    left.set_title("the capability matrix: rows after each stage")
    right.barh(range(len(R)), R["perplexity"].astype(float), color="tab:gray")
    right.set_yticks(range(len(R)), [])
    right.invert_yaxis()
    right.set_xlabel("general perplexity")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ RL's razor: SFT against GRPO on a new task

class RazorProbe:
    """What one fine-tune of the razor's start model did: ``task accuracy`` (the right object first, greedy, on the
    task's questions), ``unseen recall`` (every trained rendering of the holdout people's facts, which no stage
    saw), ``perplexity`` on held-out general text, and the KL between the start and the model at the answer
    position of the task's questions, both ways: ``KL(start‖model)`` (Shenfeld et al.'s forgetting predictor,
    E_x KL(π₀ ‖ π) on the new task's inputs) and ``KL(model‖start)``."""

    def __init__(self, lab: Lab, start: nn.Module, prompts: torch.Tensor, targets: torch.Tensor,
                 unseen: Sequence[Fact], n_texts: int = 40, seed: int = 0) -> None:
        self.prompts, self.targets = prompts, targets
        self.unseen_x, self.unseen_y = fact_batch(lab.tokenizer, list(unseen))  # [U, L], [U]
        gen = torch.Generator().manual_seed(seed)
        texts = lab.world.general_test
        self.texts = encode(lab.tokenizer, [texts[i] for i in torch.randperm(len(texts), generator=gen)[:n_texts]],
                            add_eos=True)  # [T, L]
        self.start_logp = object_logits(start, prompts, PAD).log_softmax(-1)  # [N, V]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict:
        logp = object_logits(model, self.prompts, PAD).log_softmax(-1)  # [N, V]
        start = self.start_logp
        nll = lm_loss(model, self.texts, PAD, reduction="sum").item()
        return {"task accuracy": (logp.argmax(1) == self.targets).float().mean().item(),
                "unseen recall": (object_logits(model, self.unseen_x, PAD).argmax(1) == self.unseen_y
                                  ).float().mean().item(),
                "perplexity": math.exp(nll / int((self.texts[:, 1:] != PAD).sum())),
                "KL(start‖model)": (start.exp() * (start - logp)).sum(1).mean().item(),
                "KL(model‖start)": (logp.exp() * (logp - start)).sum(1).mean().item()}


@dataclass
class RazorTask:
    """The razor's new task: the questions (relations the preference does not touch) about the held-out people
    outside the holdout, whom the SFT model can already answer in part; the start is the SFT model."""

    lab: Lab
    start: nn.Module
    facts: list[Fact]
    prompts: torch.Tensor
    allowed: torch.Tensor
    probe: RazorProbe
    known: list[Fact]  # facts the start recalls, outside the holdout: the optimizer null's task


def razor_task(chain: Chain, seed: int = 0, *, require_known: bool = True) -> RazorTask:
    """The razor's task, its probe and the optimizer null's facts, from ``chain``'s SFT model
    (``require_known=False`` draws the null's facts among all pretraining facts, for a SMOKE lab)."""
    held = set(chain.holdout.subjects)
    people = [s for s in chain.data.heldout_subjects if s not in held]
    facts = [f for r in ANSWERED for f in chain.lab.world.questions(r, people)]
    prompts, allowed = rl.question_task(chain.lab.tokenizer, facts)
    probe = RazorProbe(chain.lab, chain.sft_model, prompts, allowed.float().argmax(1), chain.holdout.facts,
                       seed=seed)
    known = nulls.known_fact_task(chain.lab, 40 if require_known else 8, seed, model=chain.sft_model,
                                  exclude=chain.holdout.facts, require_known=require_known).train_facts
    return RazorTask(chain.lab, chain.sft_model, facts, prompts, allowed, probe, known)


def _path(method: str, lr: float, trajectory: pd.DataFrame) -> pd.DataFrame:
    return trajectory.assign(method=method, lr=lr)


def sft_path(task: RazorTask, *, lr: float, steps: int, probe_every: int, batch_size: int = 16, seed: int = 0
             ) -> pd.DataFrame:
    """SFT of the start on the task's questions with their right answers ("Paris ."; the response tokens'
    cross-entropy, AdamW as every stage), probed at step 0 and every ``probe_every`` steps."""
    _validate.positive_int("steps", steps)
    _validate.positive_int("probe_every", probe_every)
    ids, mask = align.encode_responses(task.lab.tokenizer, [f.prompt for f in task.facts],
                                       [f"{f.object} ." for f in task.facts])
    model = copy.deepcopy(task.start).train().requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = rl._batches(len(ids), batch_size, torch.Generator().manual_seed(seed))
    rows = [{"step": 0, **task.probe(model)}]
    for step in range(1, steps + 1):
        chosen = next(batches)
        rl._step(params, opt, align.response_loss(model, ids[chosen], mask[chosen], PAD))
        if step % probe_every == 0:
            rows.append({"step": step, **task.probe(model)})
    return _path("SFT", lr, pd.DataFrame(rows))


def rl_path(task: RazorTask, *, lr: float, steps: int, probe_every: int, seed: int = 0, **config) -> pd.DataFrame:
    """GRPO of the start on the task's questions (reward: the right object), probed like ``sft_path``."""
    grpo_config = rl.GRPOConfig(steps=steps, lr=lr, probe_every=probe_every, seed=seed, **config)
    _, trajectory = rl.grpo(task.start, task.prompts, task.allowed, grpo_config, pad_id=PAD, eos_id=EOS,
                            probe=task.probe)
    return _path("RL", lr, trajectory.drop(columns="reward"))


def null_path(task: RazorTask, *, lr: float, steps: int, probe_every: int, seed: int = 0) -> pd.DataFrame:
    """The optimizer null: the same optimizer, learning rate and steps on facts the start already recalls
    (``align.optimizer_null``): nothing to learn, so what it forgets is the step size's own cost."""
    _, trajectory = align.optimizer_null(task.lab, task.start, task.known, steps=steps, lr=lr, batch_size=16,
                                         seed=seed, probe=task.probe, probe_every=probe_every)
    return _path("null", lr, trajectory)


def razor_runs(task: RazorTask, *, sft_lrs: Sequence[float], rl_lrs: Sequence[float],
               null_lrs: Sequence[float], steps: int, probe_every: int, seed: int = 0) -> pd.DataFrame:
    """Every run's trajectory in one table (method, lr, step, the probe's columns), with ``forgetting``: the
    start's unseen recall minus the run's."""
    paths = ([sft_path(task, lr=lr, steps=steps, probe_every=probe_every, seed=seed) for lr in sft_lrs]
             + [rl_path(task, lr=lr, steps=steps, probe_every=probe_every, seed=seed) for lr in rl_lrs]
             + [null_path(task, lr=lr, steps=steps, probe_every=probe_every, seed=seed) for lr in null_lrs])
    runs = pd.concat(paths, ignore_index=True)
    start = runs.loc[runs.step == 0, "unseen recall"].iloc[0]
    return runs.assign(forgetting=start - runs["unseen recall"])


def at_accuracy(runs: pd.DataFrame, target: float) -> pd.DataFrame:
    """Each SFT and RL run where its task accuracy first reaches ``target`` (interpolated between probes;
    ``align.at_strength``); NaN for a run that never does."""
    rows = {}
    for (method, lr), path in runs[runs.method != "null"].groupby(["method", "lr"], sort=False):
        columns = path.drop(columns=["method", "lr"])
        rows[f"{method}, lr {lr:g}"] = align.at_strength(columns.reset_index(drop=True), target, by="task accuracy")
    return pd.DataFrame(rows).T


RAZOR_COLOURS = {"SFT": "tab:blue", "RL": "tab:red", "null": "tab:gray"}


def plot_razor(runs: pd.DataFrame, kl: str = "KL(start‖model)") -> plt.Figure:
    """Left: task accuracy against steps, one line per run; right: forgetting (points of unseen recall) against
    ``kl`` on the task's questions, every probe of every run, the optimizer null included."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    markers = {}
    for (method, lr), path in runs.groupby(["method", "lr"], sort=False):
        marker = markers.setdefault(lr, "osD^v"[len(markers) % 5])
        label = f"{method}, lr {lr:g}"
        colour = RAZOR_COLOURS[method]
        left.plot(path.step, path["task accuracy"], marker=marker, color=colour, label=label, ms=4)
        right.plot(path[kl], 100 * path.forgetting, marker=marker, color=colour, label=label, ms=5, lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("task accuracy (new people's questions)")
    left.legend(fontsize=7)
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel(f"{kl} at the answer, on the task's questions (nats)")
    right.set_ylabel("forgetting: unseen recall lost (points)")
    right.set_title("RL's razor says: one curve for both methods")
    fig.tight_layout()
    return fig
