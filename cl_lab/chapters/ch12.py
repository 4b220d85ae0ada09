"""Chapter 12 helpers (the alignment tax): SFT → DPO on the tiny language model, its capability matrix, the
optimizer null of each stage, the remedies compared at matched alignment strength on facts no remedy saw,
Schulman's KL estimators, the β × replay playground, and one MNIST check: the KL penalty ≈ ½ΔθᵀFΔθ along a real
fine-tuning step.

The language-model chain lives in ``cl_lab.lm.align`` (the data, the losses, the probe); this module runs it the
way the chapter tells it and draws the figures.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate, models
from cl_lab.chapters.ch02 import mnist
from cl_lab.device import seed_everything
from cl_lab.fisher import fisher_diagonal
from cl_lab.lm import BASE_RELATIONS, Lab, align, kl_estimators, nulls, tiny_lm
from cl_lab.methods.alignment import diagonal_quadratic, fisher_quadratic, kl_along, sft_loss

STAGES = ("base", "SFT", "DPO")
SHOWN = ("recall", "unseen recall", "paraphrase", "instruction", "format", "win rate")  # the [0, 1] columns
REMEDY_COLOURS = {"DPO (plain)": "tab:red", "null control": "tab:pink", "KL on text": "tab:blue",
                  "replay": "tab:green", "LoRA only": "tab:purple", "averaging": "tab:orange"}
UNSEEN_SHARE = 0.5  # the share of the held-out people whose facts no remedy's text contains


# ------------------------------------------------------------------ the LM chain: SFT, then DPO

@dataclass
class LMChain:
    """The lab, the chain's data, the SFT model (the DPO reference), the probe measuring every row, and the
    ``holdout``: people (among those never aligned on) whose every sentence is kept out of the remedies' text,
    so that ``unseen recall`` scores facts that no stage and no remedy trained on."""

    lab: Lab
    data: align.AlignmentData
    sft_model: nn.Module
    probe: align.Probe
    base_row: dict
    sft_row: dict
    holdout: nulls.Holdout


def lm_chain(seed: int = 0, sft_steps: int = 150, sft_lr: float = 3e-4, n_sft_subjects: int = 60,
             lab_config: dict | None = None, device: str = "cpu") -> LMChain:
    """The tiny LM of ``seed`` (pretrained once, then cached on disk; ``lab_config`` overrides ``LMConfig``
    fields, e.g. ``lm.SMOKE_CONFIG``) and its SFT into the question format; kept in memory per setting, so the
    playground starts from the same SFT model as the chapter."""
    return _lm_chain(seed, sft_steps, sft_lr, n_sft_subjects, tuple(sorted((lab_config or {}).items())), device)


@lru_cache(maxsize=4)
def _lm_chain(seed: int, sft_steps: int, sft_lr: float, n_sft_subjects: int, lab_config: tuple,
              device: str) -> LMChain:
    lab = tiny_lm(seed, progress=False, device=device, **dict(lab_config))
    data = align.alignment_data(lab.world, n_sft_subjects=n_sft_subjects, seed=seed)
    holdout = nulls.hold_out(lab.world, round(UNSEEN_SHARE * len(data.heldout_subjects)), seed,
                             among=data.heldout_subjects)
    held = set(holdout.subjects)
    model = align.sft(lab, data, steps=sft_steps, lr=sft_lr, seed=seed)
    probe = align.Probe(lab, data, model, seen=[f for f in lab.world.train_facts if f.subject not in held],
                        unseen=holdout.facts, unseen_paraphrases=holdout.paraphrases, seed=seed)
    return LMChain(lab, data, model, probe, probe(lab.model), probe(model), holdout)


def run_dpo(chain: LMChain, config: align.DPOConfig) -> tuple[nn.Module, pd.DataFrame]:
    """DPO from the chain's SFT model on its pairs, with the trajectory of capability rows; replay and the KL on
    text draw from the pretraining corpus without the held-out people (``chain.holdout.texts``)."""
    return align.dpo(chain.lab, chain.sft_model, chain.data.pairs, config, chain.probe, texts=chain.holdout.texts)


def null_task(chain: LMChain, model: nn.Module, n_facts: int = 40, seed: int = 0, *, require_known: bool = True
              ) -> list:
    """The facts of an optimizer null from ``model``: ``n_facts`` pretraining facts it already recalls, drawn at
    random (seeded) outside the held-out people, so the null never trains what ``unseen recall`` scores."""
    return nulls.known_fact_task(chain.lab, n_facts, seed, model=model, exclude=chain.holdout.facts,
                                 require_known=require_known).train_facts


def stage_nulls(chain: LMChain, dpo_config: align.DPOConfig, *, sft_steps: int, sft_lr: float = 3e-4,
                sft_batch: int = 32, n_facts: int = 40, require_known: bool = True) -> dict[str, pd.DataFrame]:
    """The optimizer null of each stage (``align.optimizer_null``): SFT's optimizer and steps from the base model,
    and DPO's from the SFT model, each on facts its starting model already recalls. Returns each null's probe
    rows at its first and last step."""
    seed = dpo_config.seed
    _, sft_path = align.optimizer_null(
        chain.lab, chain.lab.model, null_task(chain, chain.lab.model, n_facts, seed, require_known=require_known),
        steps=sft_steps, lr=sft_lr, batch_size=sft_batch, seed=seed, probe=chain.probe, probe_every=sft_steps)
    _, dpo_path = align.optimizer_null(
        chain.lab, chain.sft_model, null_task(chain, chain.sft_model, n_facts, seed + 1, require_known=require_known),
        steps=dpo_config.steps, lr=dpo_config.lr, batch_size=dpo_config.batch_size, seed=seed, probe=chain.probe,
        probe_every=dpo_config.steps)
    return {"SFT": sft_path, "DPO": dpo_path}


def capability_matrix(chain: LMChain, dpo_model: nn.Module, null_paths: dict[str, pd.DataFrame] | None = None
                      ) -> pd.DataFrame:
    """Rows base → SFT → DPO, columns: the probe's measurements; with ``null_paths`` (``stage_nulls``), each
    stage's optimizer null as a row "<stage>'s null" after the stage (its last probe)."""
    rows = {"base": chain.base_row, "SFT": chain.sft_row}
    if null_paths:
        rows["SFT's null"] = null_paths["SFT"].iloc[-1].drop("step").to_dict()
    rows["DPO"] = chain.probe(dpo_model)
    if null_paths:
        rows["DPO's null"] = null_paths["DPO"].iloc[-1].drop("step").to_dict()
    return pd.DataFrame(rows).T


def remedy_configs(base: align.DPOConfig, *, kl_coef: float = 0.3, replay_share: float = 0.25,
                   lora_rank: int = 8, lora_lr: float = 2e-3, null_seed: int = 100) -> dict[str, align.DPOConfig]:
    """The runs of the remedies section: plain DPO, the same with another data order (the null control), and
    each remedy alone, every other setting as in ``base``."""
    replace = lambda **kw: align.DPOConfig(**{**base.__dict__, **kw})  # noqa: E731
    return {"DPO (plain)": base, "null control": replace(seed=base.seed + null_seed),
            "KL on text": replace(kl_coef=kl_coef), "replay": replace(replay_share=replay_share),
            "LoRA only": replace(lora_rank=lora_rank, lora_lr=lora_lr)}


def matched(paths: dict[str, pd.DataFrame], target: float, by: str = "win rate") -> pd.DataFrame:
    """Every path's row where ``by`` first reaches ``target`` (see ``align.at_strength``)."""
    return pd.DataFrame({name: align.at_strength(path, target, by) for name, path in paths.items()}).T


# ------------------------------------------------------------------ KL estimators on the LM

def estimator_contexts(chain: LMChain, n_texts: int = 60) -> dict[str, torch.Tensor]:
    """Where to compare next-token distributions: the answer position of the held-out people's questions
    (where DPO moved the model) and every position of held-out general text (where it barely did)."""
    world = chain.lab.world
    questions = [f.prompt for r in BASE_RELATIONS for f in world.questions(r.name, chain.data.heldout_subjects)]
    gen = torch.Generator().manual_seed(0)
    texts = [world.general_test[i] for i in torch.randperm(len(world.general_test), generator=gen)[:n_texts]]
    return {"questions": chain.lab.encode(questions), "general text": chain.lab.encode(texts)}


def kl_estimator_tables(chain: LMChain, policies: dict[str, nn.Module], n_samples: int = 2000, seed: int = 0
                        ) -> pd.DataFrame:
    """k1, k2, k3 of KL(π ‖ π_SFT) against the exact KL, for each policy π and context set (rows: policy,
    contexts, estimator)."""
    pad = chain.lab.tokenizer.pad_token_id
    tables = {}
    for name, ids in estimator_contexts(chain).items():
        last = name == "questions"
        reference = kl_estimators.next_token_logits(chain.sft_model, ids, pad, last_only=last)
        for policy_name, policy in policies.items():
            logits = kl_estimators.next_token_logits(policy, ids, pad, last_only=last)
            estimates = kl_estimators.kl_estimates(logits, reference, n_samples, seed)
            tables[(policy_name, name)] = kl_estimators.estimator_table(estimates)
    return pd.concat(tables, names=["policy", "contexts", "estimator"]).sort_index()


# ------------------------------------------------------------------ plots

def plot_capability_matrix(R: pd.DataFrame):
    """Left: the [0, 1] columns as bars per stage; right: general perplexity per stage."""
    fig, (ax, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(R)
    for i, stage in enumerate(R.index):
        ax.bar(np.arange(len(SHOWN)) + (i - (len(R) - 1) / 2) * width, R.loc[stage, list(SHOWN)], width, label=stage)
    ax.set_xticks(range(len(SHOWN)), SHOWN)
    ax.set_ylim(0, 1.05)
    ax.set_title("capability matrix: each measurement after each stage", fontsize=9)
    ax.legend(fontsize=8)
    ax_ppl.bar(range(len(R)), R["perplexity"], color=[f"C{i}" for i in range(len(R))])
    ax_ppl.set_xticks(range(len(R)), list(R.index))
    ax_ppl.set_title("general perplexity (lower is better)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_front(paths: dict[str, pd.DataFrame], target: float, column: str = "unseen recall",
               baseline: float | None = None):
    """Each path's ``column`` against its win rate (the tax–alignment front), a dot where it crosses ``target``."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, path in paths.items():
        colour = REMEDY_COLOURS.get(name)
        ax.plot(path["win rate"], path[column], "o-" if name != "averaging" else "s--", ms=3, color=colour, label=name)
        point = align.at_strength(path, target)
        if point.notna().all():
            ax.plot([target], [point[column]], "o", ms=9, mfc="none", color=colour)
    ax.axvline(target, color="grey", ls=":", lw=1)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls=":", lw=1, label="after SFT")
    ax.set_xlabel("preference win rate (held-out people)")
    ax.set_ylabel(f"{column} (pretraining facts)" if "recall" in column else column)
    ax.set_title(f"tax–alignment front; circles: matched at win rate {target:g}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_kl_estimators(table: pd.DataFrame):
    """Per (policy, context set): each estimator's bias and one-sample spread, relative to the exact KL."""
    groups = list(table.groupby(level=[0, 1], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.2), squeeze=False)
    for ax, (name, part) in zip(axes[0], groups):
        part = part.droplevel([0, 1])
        kl = part["exact KL"].iloc[0]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["bias"] / kl, 0.4, label="bias / KL")
        ax.bar(x + 0.2, part["relative std"], 0.4, label="one-sample std / KL")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, list(part.index))
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(f"{', '.join(name)}: KL = {kl:.3g} nats", fontsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


# ------------------------------------------------------------------ the playground: β × replay share

@lru_cache(maxsize=64)
def alignment_point(beta: float = 0.1, replay_share: float = 0.0, seed: int = 0, steps: int = 40,
                    lr: float = 5e-4, sft_steps: int = 150, n_sft_subjects: int = 60, lab_config: tuple = (),
                    device: str = "cpu") -> dict:
    """One DPO run from the chapter's SFT model (``lm_chain``'s, for the same seed, SFT steps, people and lab
    config) at DPO strength ``beta`` and replay share ``replay_share``: its trajectory (a row at the start, half
    way and the end) and last row, beside the SFT row."""
    config = align.DPOConfig(beta=beta, replay_share=replay_share, steps=steps, lr=lr, seed=seed,
                             probe_every=max(steps // 2, 1))
    chain = lm_chain(seed=seed, sft_steps=sft_steps, n_sft_subjects=n_sft_subjects, lab_config=dict(lab_config),
                     device=device)
    _, trajectory = run_dpo(chain, config)
    return {"beta": beta, "replay_share": replay_share, "trajectory": trajectory,
            "last": trajectory.iloc[-1].to_dict(), "sft": chain.sft_row}


def plot_alignment_point(result: dict):
    """Left: win rate and recall along the run; right: the last row against the SFT model's."""
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(10, 3.4))
    traj = result["trajectory"]
    for column, style in (("win rate", "o-"), ("recall", "s-"), ("paraphrase", "^-")):
        ax_t.plot(traj["step"], traj[column], style, ms=4, label=column)
    ax_t.set_ylim(-0.02, 1.02)
    ax_t.set_xlabel("DPO step")
    ax_t.legend(fontsize=8)
    ax_t.set_title(f"β = {result['beta']:g}, replay share {result['replay_share']:.2f}", fontsize=9)
    x = np.arange(len(SHOWN))
    ax_b.bar(x - 0.2, [result["sft"][c] for c in SHOWN], 0.4, label="after SFT", color="grey")
    ax_b.bar(x + 0.2, [result["last"][c] for c in SHOWN], 0.4, label="after DPO", color="tab:red")
    ax_b.set_xticks(x, SHOWN)
    ax_b.set_ylim(0, 1.05)
    ax_b.legend(fontsize=8)
    ax_b.set_title(f"perplexity {result['sft']['perplexity']:.2f} → {result['last']['perplexity']:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ MNIST: the KL as a quadratic

def invert(x: torch.Tensor) -> torch.Tensor:
    """Images x [N, 784] with ink and background swapped: the toy SFT stage's "prompt format"."""
    return 1.0 - x


def _batches(n: int, batch_size: int, gen: torch.Generator):
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield idx


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _, idx in zip(range(steps), _batches(len(x), 64, gen)):
        loss = sft_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@lru_cache(maxsize=4)
def _mnist_pair(hidden: tuple[int, ...], pretrain_steps: int, sft_steps: int, seed: int) -> tuple[nn.Module, nn.Module]:
    d = mnist()
    gen = seed_everything(seed)
    pre = models.MLP(784, hidden, 10)
    _fit(pre, d.x_train, d.y_train, pretrain_steps, 1e-3, gen)
    sft_model = copy.deepcopy(pre)
    _fit(sft_model, invert(d.x_train), (d.y_train + 1) % 10, sft_steps, 3e-4, gen)
    return pre, sft_model


def mnist_sft_update(hidden: Sequence[int] = (100, 100), pretrain_steps: int = 500, sft_steps: int = 200,
                     seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(pretrained MLP, the same after a toy SFT stage): clean digits with Adam, then inverted digits answered
    with the next digit, (y + 1) mod 10. Copies of models trained once per setting."""
    _validate.positive_int("pretrain_steps", pretrain_steps)
    _validate.positive_int("sft_steps", sft_steps)
    pre, sft_model = _mnist_pair(tuple(hidden), pretrain_steps, sft_steps, seed)
    return copy.deepcopy(pre), copy.deepcopy(sft_model)


def mnist_test_sample(n: int, seed: int = 0, inverted: bool = False) -> torch.Tensor:
    """A seeded random draw of ``n`` MNIST test images [n, 784] (never a prefix: stored data may be sorted)."""
    x = mnist().x_test
    _validate.positive_int("n", n)
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return invert(x[rows]) if inverted else x[rows]


def kl_versus_quadratic(reference: nn.Module, moved: nn.Module, x: torch.Tensor,
                        scales: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0)) -> pd.DataFrame:
    """Along the real update Δθ = θ_moved − θ_ref, scaled by t: the exact KL in both directions, the full-Fisher
    quadratic ½ t²ΔθᵀFΔθ and EWC's diagonal ½ t²Σ F_ii Δθ_i², all averaged over inputs x [N, D]. In float64:
    in float32 the KL of a small step drowns in rounding (1–2 % error below t = 0.01 on a tiny net)."""
    reference, moved = copy.deepcopy(reference).cpu().double(), copy.deepcopy(moved).cpu().double()
    x = x.cpu().double()
    theta, after = dict(reference.named_parameters()), dict(moved.named_parameters())
    delta = {n: (after[n] - theta[n]).detach() for n in theta}
    fisher_diag = fisher_diagonal(reference, x, estimate="exact")
    rows = []
    for t in scales:
        _validate.positive("scales", t)
        rows.append({"t": t, "KL(ref‖θ)": kl_along(reference, delta, x, t, "ref||policy"),
                     "KL(θ‖ref)": kl_along(reference, delta, x, t, "policy||ref"),
                     "½ΔθᵀFΔθ (full)": fisher_quadratic(reference, delta, x, t),
                     "½ΣF_iiΔθ_i² (diagonal)": diagonal_quadratic(fisher_diag, delta, t)})
    table = pd.DataFrame(rows).set_index("t")
    table["KL / full quadratic"] = table["KL(ref‖θ)"] / table["½ΔθᵀFΔθ (full)"]
    return table
