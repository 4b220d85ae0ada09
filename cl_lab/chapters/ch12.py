"""Chapter 12 helpers (the alignment tax): a toy post-training chain on MNIST, its capability matrix, the three
mitigations (KL penalty, pretraining replay, a low-rank adapter per stage), the KL-versus-Fisher check and the
β / replay playground.

The toy. A "pretrained" MLP answers 11-way: the ten digits, plus an output 10 that means "I won't answer" and
that pretraining never uses. General capability = 10-way accuracy on clean test digits. Three post-training
stages follow, each starting from the previous checkpoint and each with its own target metric:

- **SFT** (an instruction format): inverted digits (white ink on black → black on white; the toy's "prompt
  format") must be answered with the *next* digit, (y + 1) mod 10. Metric: that rule's accuracy on inverted
  test digits.
- **DPO** (a safety preference): gibberish inputs (each image's pixels shuffled) with the pair chosen = refuse
  (output 10), rejected = the reference model's own answer. Metric: refusal rate on held-out gibberish.
- **RL** (a verifiable reward, a new skill): digits rotated by 90° earn reward 1 when answered with the right
  digit; the policy samples its answer and learns from the reward alone. Metric: greedy reward on rotated
  test digits.
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
from cl_lab.methods.alignment import (
    STAGES,
    StageAdapters,
    check_beta,
    check_fraction,
    check_stage,
    diagonal_quadratic,
    dpo_loss_from_logits,
    fisher_quadratic,
    kl_along,
    kl_to_reference,
    reinforce_loss,
    sft_loss,
)

REFUSE = 10  # the extra output: "I won't answer"
N_OUT = 11
METRICS = ("general", "sft", "dpo", "rl")  # columns of the capability matrix
METRIC_NAMES = {"general": "general: digit accuracy", "sft": "SFT: next digit (inverted)",
                "dpo": "DPO: refuses gibberish", "rl": "RL: rotated digits"}
KL_INPUTS = ("stage", "general")
ANCHORS = ("previous", "pretrained")


# ------------------------------------------------------------------ inputs of each stage

def invert(x: torch.Tensor) -> torch.Tensor:
    """Images x [N, 784] with ink and background swapped: the SFT stage's "prompt format"."""
    return 1.0 - x


def rotate90(x: torch.Tensor) -> torch.Tensor:
    """Images x [N, 784] rotated by 90° (exactly, by transposing and flipping the 28×28 grid)."""
    return x.reshape(-1, 28, 28).transpose(1, 2).flip(2).reshape(len(x), 784)


def gibberish(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels shuffled by its own random permutation [N, 784]: same ink, no digit."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(x.shape, generator=gen), dim=1)
    return x.gather(1, order)


@dataclass
class ChainData:
    """Inputs and targets of the pretraining set and of each stage, train and test, on the CPU."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sft_x: torch.Tensor
    sft_y: torch.Tensor
    sft_x_test: torch.Tensor
    sft_y_test: torch.Tensor
    dpo_x: torch.Tensor
    dpo_x_test: torch.Tensor
    rl_x: torch.Tensor
    rl_y: torch.Tensor
    rl_x_test: torch.Tensor
    rl_y_test: torch.Tensor

    def stage_inputs(self, stage: str) -> torch.Tensor:
        return {"sft": self.sft_x, "dpo": self.dpo_x, "rl": self.rl_x}[check_stage(stage)]


@lru_cache(maxsize=1)
def chain_data() -> ChainData:
    """The toy's data, built once per process from MNIST (4,000 train / 1,000 test images offline)."""
    d = mnist()
    return ChainData(
        d.x_train, d.y_train, d.x_test, d.y_test,
        invert(d.x_train), (d.y_train + 1) % 10, invert(d.x_test), (d.y_test + 1) % 10,
        gibberish(d.x_train, seed=1), gibberish(d.x_test, seed=2),
        rotate90(d.x_train), d.y_train, rotate90(d.x_test), d.y_test)


@torch.no_grad()
def _answers(model: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(x.to(device)).argmax(1).cpu()  # [N]
    model.train(was_training)
    return out


def capabilities(model: nn.Module, reference: nn.Module | None = None, device: torch.device | str = "cpu") -> dict:
    """Every metric of the chain for one model: general digit accuracy, each stage's target metric, the
    over-refusal rate (refusals on clean digits) and, given the pretrained ``reference``, the drift
    KL(π_ref ‖ π_θ) on clean test digits."""
    d = chain_data()
    clean = _answers(model, d.x_test, device)
    drift = {}
    if reference is not None:
        with torch.no_grad():
            x = d.x_test.to(device)
            drift = {"drift": kl_to_reference(model.eval()(x), reference.eval()(x), "ref||policy").item()}
    return {"general": (clean == d.y_test).float().mean().item(),
            "sft": (_answers(model, d.sft_x_test, device) == d.sft_y_test).float().mean().item(),
            "dpo": (_answers(model, d.dpo_x_test, device) == REFUSE).float().mean().item(),
            "rl": (_answers(model, d.rl_x_test, device) == d.rl_y_test).float().mean().item(),
            "over-refusal": (clean == REFUSE).float().mean().item(), **drift}


# ------------------------------------------------------------------ pretraining and one post-training stage

def _batches(n: int, batch_size: int, gen: torch.Generator):
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield idx


def new_model(hidden: Sequence[int] = (100, 100)) -> nn.Module:
    return models.MLP(784, tuple(hidden), N_OUT)


@lru_cache(maxsize=8)
def _pretrained(hidden: tuple[int, ...], steps: int, seed: int, device: str) -> nn.Module:
    d = chain_data()
    gen = seed_everything(seed)
    model = new_model(hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _, idx in zip(range(steps), _batches(len(d.x_train), 64, gen)):
        loss = sft_loss(model(d.x_train[idx].to(device)), d.y_train[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def pretrained(hidden: Sequence[int] = (100, 100), steps: int = 500, seed: int = 0,
               device: torch.device | str = "cpu") -> nn.Module:
    """A fresh copy of the "pretrained" model: clean digits, cross-entropy, Adam; trained once per setting."""
    _validate.positive_int("steps", steps)
    return copy.deepcopy(_pretrained(tuple(hidden), steps, seed, str(device)))


def stage_loss(stage: str, model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor,
               dpo_beta: float, gen: torch.Generator) -> torch.Tensor:
    """The stage's own objective on a batch x [B, D] (y: SFT targets or the RL rule's answers [B])."""
    logits = model(x)
    if stage == "sft":
        return sft_loss(logits, y)
    with torch.no_grad():
        ref_logits = ref(x)
    if stage == "dpo":
        chosen = torch.full_like(y, REFUSE)
        rejected = ref_logits.argmax(1)  # the reference's own answer is the dispreferred one
        return dpo_loss_from_logits(logits, ref_logits, chosen, rejected, dpo_beta)
    probs = logits.detach().softmax(1).cpu()
    actions = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(x.device)  # sampled answers [B]
    rewards = (actions == y).float()  # a verifiable reward: 1 for the previous digit
    return reinforce_loss(logits, actions, rewards)


def train_stage(model: nn.Module, stage: str, ref: nn.Module, *, steps: int = 200, lr: float = 3e-4,
                beta: float = 0.0, kl_inputs: str = "stage", replay: float = 0.0, dpo_beta: float = 1.0,
                params: Sequence[nn.Parameter] | None = None, batch_size: int = 64, seed: int = 0,
                device: torch.device | str = "cpu") -> nn.Module:
    """One post-training stage from the model's current weights (in place). Loss per step:

        (1 − replay)·[stage loss + β·KL(π_θ ‖ π_ref) on ``kl_inputs``] + replay·CE(pretraining batch)

    ``kl_inputs``: 'stage' measures the KL on the stage's own batch (as RLHF does), 'general' on a batch of
    clean digits (unlabelled). ``replay`` is the share of the loss given to pretraining data with labels,
    InstructGPT's PPO-ptx (Ouyang et al. 2022, eq. 2). ``params``: what to train (default: all)."""
    check_stage(stage)
    beta = check_beta(beta)
    replay = check_fraction("replay", replay)
    _validate.one_of("kl_inputs", kl_inputs, KL_INPUTS)
    _validate.positive_int("steps", steps)
    d = chain_data()
    gen = torch.Generator().manual_seed(seed * 1000 + STAGES.index(stage))
    x_stage = d.stage_inputs(stage)
    y_stage = {"sft": d.sft_y, "dpo": d.y_train, "rl": d.rl_y}[stage]
    ref = ref.eval()
    opt = torch.optim.Adam(list(params) if params is not None else model.parameters(), lr=lr)
    model.train()
    batches = _batches(len(x_stage), batch_size, gen)
    for _ in range(steps):
        idx = next(batches)
        x, y = x_stage[idx].to(device), y_stage[idx].to(device)
        loss = stage_loss(stage, model, ref, x, y, dpo_beta, gen)
        if beta > 0:
            kl_x = x if kl_inputs == "stage" else d.x_train[next(batches)].to(device)
            with torch.no_grad():
                ref_logits = ref(kl_x)
            loss = loss + beta * kl_to_reference(model(kl_x), ref_logits)
        if replay > 0:
            ptx = next(batches)
            ptx_loss = sft_loss(model(d.x_train[ptx].to(device)), d.y_train[ptx].to(device))
            loss = (1 - replay) * loss + replay * ptx_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------ the chain and its capability matrix

@dataclass
class Chain:
    """A run of the chain: the capability matrix (rows: after pretraining and after each stage; columns: the
    metrics) and the checkpoint after each row."""

    R: pd.DataFrame
    checkpoints: dict[str, nn.Module]

    @property
    def tax(self) -> float:
        """General capability lost from pretraining to the end of the chain (positive = lost)."""
        return float(self.R["general"].iloc[0] - self.R["general"].iloc[-1])


def run_chain(*, stages: Sequence[str] = STAGES, beta: float = 0.0, kl_inputs: str = "stage", replay: float = 0.0,
              anchor: str = "previous", steps: int = 200, pretrain_steps: int = 500,
              hidden: Sequence[int] = (100, 100), seed: int = 0, device: torch.device | str = "cpu") -> Chain:
    """Pretrain, then each stage in order from the previous checkpoint. ``anchor``: the KL/DPO reference is the
    stage's starting checkpoint ('previous', as in practice) or the pretrained model ('pretrained')."""
    for s in stages:
        check_stage(s)
    _validate.one_of("anchor", anchor, ANCHORS)
    model = pretrained(hidden, pretrain_steps, seed, device)
    base = copy.deepcopy(model)
    rows, checkpoints = {"pretrained": capabilities(model, base, device)}, {"pretrained": base}
    for stage in stages:
        ref = copy.deepcopy(model if anchor == "previous" else checkpoints["pretrained"])
        train_stage(model, stage, ref, steps=steps, beta=beta, kl_inputs=kl_inputs, replay=replay, seed=seed,
                    device=device)
        rows[stage] = capabilities(model, base, device)
        checkpoints[stage] = copy.deepcopy(model)
    return Chain(pd.DataFrame(rows).T, checkpoints)


def run_lora_chain(*, rank: int = 4, steps: int = 200, lr: float = 1e-2, pretrain_steps: int = 500,
                   hidden: Sequence[int] = (100, 100), seed: int = 0, device: torch.device | str = "cpu"
                   ) -> tuple[pd.DataFrame, bool]:
    """A frozen pretrained backbone with one rank-``rank`` adapter per stage, each trained on the bare backbone
    (reference: the backbone). Returns (metrics per way of deploying them: the bare backbone, each stage's
    adapter alone, all adapters summed; whether the backbone stayed bit-identical)."""
    backbone = pretrained(hidden, pretrain_steps, seed, device)
    base = copy.deepcopy(backbone)
    seed_everything(seed)
    model = StageAdapters(backbone, STAGES, rank).to(device)
    before = model.backbone_state()
    for stage in STAGES:
        ref = copy.deepcopy(model.use([]))
        params = model.train_stage(stage)
        train_stage(model, stage, ref, steps=steps, lr=lr, params=params, seed=seed, device=device)
    rows = {"backbone only": capabilities(model.use([]), base, device)}
    rows.update({f"{s} adapter only": capabilities(model.use([s]), base, device) for s in STAGES})
    rows["all adapters summed"] = capabilities(model.use(list(STAGES)), base, device)
    after = model.backbone_state()
    identical = all(torch.equal(before[n], after[n]) for n in before)
    return pd.DataFrame(rows).T, identical


def routed(lora: pd.DataFrame) -> dict:
    """Metrics when an oracle router sends each input type to its own adapter (clean digits to the backbone)."""
    return {"general": lora.loc["backbone only", "general"],
            **{s: lora.loc[f"{s} adapter only", s] for s in STAGES}}


# ------------------------------------------------------------------ the KL as implicit EWC

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


# ------------------------------------------------------------------ plots

def plot_capability_matrix(R: pd.DataFrame, ax=None, title: str = "capability matrix"):
    """Heat map of the chain's matrix: rows = after which stage, columns = the four metrics."""
    ax = ax or plt.subplots(figsize=(5.2, 3.4))[1]
    values = R[list(METRICS)].to_numpy()
    ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for i, j in np.ndindex(values.shape):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="w" if values[i, j] < 0.6 else "k")
    ax.set_xticks(range(len(METRICS)), [METRIC_NAMES[m].split(":")[0] for m in METRICS])
    ax.set_yticks(range(len(R)), [f"after {r}" for r in R.index])
    ax.set_title(title, fontsize=9)
    return ax


def plot_tax_curves(R: pd.DataFrame, ax=None, title: str = ""):
    """Each metric across the chain's stages."""
    ax = ax or plt.subplots(figsize=(5, 3.4))[1]
    for m in METRICS:
        ax.plot(range(len(R)), R[m], "o-", ms=4, label=METRIC_NAMES[m])
    ax.set_xticks(range(len(R)), list(R.index))
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("metric")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return ax


# ------------------------------------------------------------------ the playground

@lru_cache(maxsize=64)
def tax_point(beta: float = 0.0, replay: float = 0.0, kl_inputs: str = "stage", steps: int = 200,
              pretrain_steps: int = 500, hidden: tuple[int, ...] = (100, 100), seed: int = 0,
              device: str = "cpu") -> dict:
    """One chain at KL strength ``beta`` and replay share ``replay``: its capability matrix and the tax."""
    check_beta(beta)
    check_fraction("replay", replay)
    chain = run_chain(beta=beta, kl_inputs=kl_inputs, replay=replay, steps=steps, pretrain_steps=pretrain_steps,
                      hidden=hidden, seed=seed, device=device)
    return {"beta": beta, "replay": replay, "kl_inputs": kl_inputs, "R": chain.R, "tax": chain.tax}


def plot_tax_point(result: dict):
    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(10, 3.4))
    title = f"β = {result['beta']:g} (KL on {result['kl_inputs']} inputs), replay {result['replay']:.2f}"
    plot_capability_matrix(result["R"], ax_m, title)
    plot_tax_curves(result["R"], ax_c, f"tax on general digits: {result['tax']:+.3f}")
    fig.tight_layout()
    return fig
