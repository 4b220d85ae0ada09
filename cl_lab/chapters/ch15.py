"""Chapter 15 helpers (bonus: the PEFT family and spurious forgetting).

The PEFT family, built with PEFT itself on chapter 09's tiny GPT-2 and its first new task (new people), at one
step budget: full fine-tuning, LoRA (Hu et al. 2021, arXiv:2106.09685), IA³ (Liu et al. 2022, arXiv:2205.05638),
prompt tuning (Lester et al. 2021, arXiv:2104.08691) and OSF, orthogonal-subspace fine-tuning (Nayak et al. 2025,
arXiv:2504.07097). Each is measured for what it learned, what it kept of the pretraining facts beyond an optimizer
null (chapter 09's: the same optimizer, learning rate and steps on facts the LM already knows), general perplexity,
trainable parameters (counted) and seconds per step (a ratio to full fine-tuning, interleaved best-of).

Spurious forgetting (Zheng et al. 2025, arXiv:2501.13453): after a second task, is the first task's knowledge gone,
or only reachable again after a few steps of re-alignment on *other* examples of it? The null re-aligns a model that
never learned the first task.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate, lm, timing, train
from cl_lab.chapters import ch09
from cl_lab.data.streams import Stream
from cl_lab.lm.lab import LMClassifier
from cl_lab.lm.stream import FactTask
from cl_lab.models import count_parameters

METHODS = ("full fine-tuning", "LoRA", "IA³", "prompt tuning", "OSF")
# Each method at the learning rate its paper (or PEFT's examples) trains it with: a soft prompt or a scaling vector
# needs far larger steps than a weight matrix. The null of a method uses the method's own rate.
LRS = {"full fine-tuning": 1e-3, "LoRA": 1e-3, "IA³": 3e-2, "prompt tuning": 1e-1, "OSF": 3e-3}
PROJECTIONS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")  # GPT-2's four projections per block


# ------------------------------------------------------------------ building the family with PEFT

class Aligned(nn.Module):
    """A PEFT causal LM seen as a plain one: forward(input_ids [B, L], attention_mask [B, L]) → ``.logits``
    [B, L, V], one row per input token. Prompt tuning prepends ``n_virtual`` soft tokens, whose logits are dropped,
    so ``LMClassifier``, ``lm.evaluate`` and ``lm_loss`` read it as they read the bare GPT-2."""

    def __init__(self, peft_model: nn.Module, n_virtual: int = 0) -> None:
        super().__init__()
        self.peft = peft_model
        self.n_virtual = _validate.non_negative_int("n_virtual", n_virtual)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.peft(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, n_virtual + L, V]
        return SimpleNamespace(logits=logits[:, self.n_virtual:])  # [B, L, V]


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``transformers`` ``Conv1D`` (weight [in, out], y = x W + b) of ``model`` by the
    equal ``nn.Linear`` (weight [out, in]); PEFT's OSF adapts ``nn.Linear`` layers only. Returns ``model``."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)  # [out, in]
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def peft_config(method: str, *, rank: int = 8, alpha: float = 16.0, n_virtual: int = 4, osf_keep: float = 0.75):
    """PEFT's configuration of one adapter method on GPT-2's projections.

    - ``LoRA`` (Hu et al. 2021, arXiv:2106.09685): ΔW = (α/r)·BA of rank ``rank`` on all four projections
      (``fan_in_fan_out`` for GPT-2's Conv1D), B = 0 at the start;
    - ``IA³`` (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale the attention projection's output
      and the MLP's input to its output projection, 1 at the start (PEFT's GPT-2 defaults);
    - ``prompt tuning`` (Lester et al. 2021, arXiv:2104.08691): ``n_virtual`` trained input embeddings prepended to
      every sequence, started from embeddings of words drawn from the vocabulary (the paper's sampled-vocabulary
      initialisation); the model's weights untouched (see ``keep_positions``);
    - ``OSF`` (Nayak et al. 2025, arXiv:2504.07097): each projection's SVD W = U_high S_high V_highᵀ + U_low S_low
      V_lowᵀ; the top ``osf_keep`` share of singular directions is frozen, the rest trained with gradients
      projected orthogonal to them (needs ``conv1d_to_linear`` first)."""
    from peft import IA3Config, LoraConfig, OSFConfig, PromptTuningConfig, TaskType

    _validate.one_of("method", method, METHODS[1:])
    if method == "LoRA":
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(PROJECTIONS), lora_dropout=0.0,
                          fan_in_fan_out=True, bias="none")
    if method == "IA³":
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                         fan_in_fan_out=True)
    if method == "prompt tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual,
                                  prompt_tuning_init="SAMPLE_VOCAB")
    _validate.in_range("osf_keep", osf_keep, 0.0, 1.0, high_open=True)
    return OSFConfig(effective_rank=osf_keep, target_modules=list(PROJECTIONS))


def family_model(lab: lm.Lab, method: str, *, rank: int = 8, alpha: float = 16.0, n_virtual: int = 4,
                 osf_keep: float = 0.75, seed: int = 0) -> LMClassifier:
    """The lab's LM (copied; the lab is left unchanged) as a classifier, prompts [B, L] → next-token logits [B, V],
    trained by ``method``: every weight (full fine-tuning) or only the PEFT adapter of ``peft_config``."""
    _validate.one_of("method", method, METHODS)
    base = copy.deepcopy(lab.model)
    pad_id = lab.tokenizer.pad_token_id
    if method == "full fine-tuning":
        return LMClassifier(base, pad_id)
    from peft import get_peft_model

    if method == "OSF":
        conv1d_to_linear(base)
    torch.manual_seed(seed)  # LoRA's A and the soft prompt are drawn at random
    with warnings.catch_warnings():  # transformers' deprecation notices raised inside PEFT
        warnings.simplefilter("ignore")
        model = get_peft_model(base, peft_config(method, rank=rank, alpha=alpha, n_virtual=n_virtual,
                                                 osf_keep=osf_keep))
    if method == "prompt tuning":
        keep_positions(model.get_base_model().transformer, n_virtual)
        return LMClassifier(Aligned(model, n_virtual), pad_id)
    return LMClassifier(Aligned(model), pad_id)


def keep_positions(transformer: nn.Module, n_virtual: int) -> None:
    """Give prompt tuning's ``n_virtual`` soft tokens position 0 and every real token the position it had in
    pretraining. The tiny LM always saw ``<bos>`` at position 0; shifted by the soft tokens (PEFT's default) its
    recall collapses before any step (chapter 15, pitfalls). Works on GPT-2, whose position ids may repeat."""
    _validate.positive_int("n_virtual", n_virtual)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("inputs_embeds")  # [B, n_virtual + L, d]: PEFT prepends the soft tokens
        if embeds is not None and kwargs.get("position_ids") is None:
            length = embeds.shape[1] - n_virtual
            positions = torch.cat([torch.zeros(n_virtual, dtype=torch.long), torch.arange(length)])
            kwargs["position_ids"] = positions.to(embeds.device).expand(embeds.shape[0], -1)  # [B, n_virtual + L]
        return args, kwargs

    transformer.register_forward_pre_hook(hook, with_kwargs=True)


def trainable(model: nn.Module) -> int:
    """Counted: the number of parameters with ``requires_grad``."""
    return count_parameters(model)


# ------------------------------------------------------------------ the family on one new task

def new_people(lab: lm.Lab, n_people: int = 10, n_pretrained: int = 300, seed: int = 0) -> Stream:
    """Chapter 09's first new task (the four pretrained relations for ``n_people`` people never seen), evaluated on
    a seeded draw of ``n_pretrained`` pretraining renderings (task 0) and on itself (task 1)."""
    return ch09.first_new_task(ch09.lm_stream(lab, (("subjects", n_people),), n_pretrained=n_pretrained, seed=seed))


@dataclass
class Member:
    """One method trained on the new task and, separately, on its optimizer null."""

    method: str
    lr: float
    trainable: int
    learned: float  # new people's recall after the task
    kept: float  # scored pretraining facts' recall, same model
    null_kept: float  # the same, after the same optimizer, lr and steps on facts the LM already knew
    perplexity: float
    null_perplexity: float
    model: nn.Module


def _fit(model: nn.Module, stream: Stream, steps: int, lr: float, batch_size: int, seed: int) -> train.Run:
    return train.fit(model, stream, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=False,
                     eval_samples=max(len(t.y_test) for t in stream.eval_tasks))


def train_member(lab: lm.Lab, stream: Stream, null: Stream, method: str, *, steps: int = 50,
                 lr: float | None = None, batch_size: int = 32, seed: int = 0, **options) -> Member:
    """``method`` (one of ``METHODS``) trained ``steps`` steps on ``stream``'s task, and a fresh copy on the
    ``null`` stream (``ch09.null_stream``); recall of the scored pretraining facts and general perplexity after each."""
    lr = LRS[method] if lr is None else lr
    model = family_model(lab, method, seed=seed, **options)
    run = _fit(model, stream, steps, lr, batch_size, seed)
    null_model = family_model(lab, method, seed=seed, **options)
    null_run = _fit(null_model, null, steps, lr, batch_size, seed)
    texts = lab.world.general_test
    return Member(method, lr, trainable(model), float(run.R[0, 1]), float(run.R[0, 0]), float(null_run.R[0, 0]),
                  lm.perplexity(model, lab.tokenizer, texts), lm.perplexity(null_model, lab.tokenizer, texts), model)


def step_seconds(lab: lm.Lab, task: FactTask, methods: Sequence[str] = METHODS, batch_size: int = 32,
                 steps: int = 3, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Best-of-``repeats`` seconds of ``steps`` Adam steps of each method on one batch of ``task``, the methods
    interleaved (so load from elsewhere hits all of them alike); divide by full fine-tuning's for a ratio."""
    x, y, _ = task.sample(batch_size, seed=seed)

    def stepper(method: str):
        model = family_model(lab, method, seed=seed).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LRS[method])

        def run() -> None:
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return run

    return timing.best_times({m: stepper(m) for m in methods}, repeats=repeats)


def lora_count(model: nn.Module, rank: int) -> int:
    """LoRA's parameters from the shapes alone: r·(d_in + d_out) for every projection PEFT adapted."""
    return sum(rank * (m.in_features + m.out_features) for m in model.modules() if hasattr(m, "lora_A"))


@torch.no_grad()
def osf_leak(model: nn.Module) -> float:
    """OSF's promise, measured after training: the largest share, over the adapted projections, of the weight change
    ΔW [out, in] that lies along the preserved top singular directions of the pretrained W (left or right),
    ‖U_highᵀ ΔW‖ / ‖ΔW‖ and ‖ΔW V_highᵀ‖ / ‖ΔW‖ (0: the preserved directions were left alone)."""
    worst = 0.0
    for module in model.modules():
        if hasattr(module, "osf_svd_params") and "default" in module.osf_svd_params:
            w = module.get_base_layer().weight.double()  # [out, in], the pretrained weight, untouched
            u, _, vh = torch.linalg.svd(w, full_matrices=False)
            k = module.effective_rank["default"]
            svd = module.osf_svd_params["default"]  # ΔW in float64: a difference of two near-equal products
            delta = ((svd["U_low"].double() * svd["S_low"].double()) @ svd["V_low"].double()
                     - (module._osf_U_low_init["default"].double() * module._osf_S_low_init["default"].double())
                     @ module._osf_V_low_init["default"].double())  # [out, in]
            size = delta.norm().clamp_min(1e-30)
            worst = max(worst, ((u[:, :k].T @ delta).norm() / size).item(), ((delta @ vh[:k].T).norm() / size).item())
    return worst


def family_table(members: Sequence[Member], seconds: dict[str, float], base: dict) -> pd.DataFrame:
    """One row per method: trainable parameters (and their share of the LM), new task learned, pretraining facts
    kept and the null's, forgetting beyond the null (null − kept), perplexity, seconds per step / full fine-tuning's,
    and forgetting beyond the null per 10⁴ trainable parameters."""
    full = seconds["full fine-tuning"]
    rows = {}
    for m in members:
        beyond = m.null_kept - m.kept
        rows[m.method] = {"lr": m.lr, "trainable": m.trainable, "learned": m.learned, "kept": m.kept,
                          "null kept": m.null_kept, "forgot beyond null": beyond,
                          "kept / base": m.kept / base["recall"] if base["recall"] > 0 else float("nan"),
                          "perplexity": m.perplexity,
                          "null perplexity": m.null_perplexity, "step / full": seconds[m.method] / full}
    table = pd.DataFrame(rows).T
    table["kept per 10⁴ trainable"] = table["kept / base"] / (table["trainable"].astype(float) / 1e4)
    return table


def plot_family(table: pd.DataFrame, base: dict):
    """Left: pretraining facts kept (bars: the method; ticks: its optimizer null) and the new task learned, per
    method. Right: kept against trainable parameters (log scale), marker area ∝ the new task learned."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    idx = np.arange(len(table))
    ax.bar(idx - 0.2, table["learned"], 0.4, label="new people: learned", color="tab:blue")
    ax.bar(idx + 0.2, table["kept"], 0.4, label="pretraining facts: kept", color="tab:orange")
    ax.scatter(idx + 0.2, table["null kept"], marker="_", s=400, color="k", zorder=3, label="kept by the null")
    ax.axhline(base["recall"], color="tab:green", ls=":", label="pretrained LM")
    ax.set_xticks(idx, table.index, fontsize=8)
    ax.set(ylim=(0, 1.08), ylabel="recall", title="one step budget: learned, kept, and the optimizer null")
    ax.legend(fontsize=7, loc="lower left")
    for name, row in table.iterrows():
        bx.scatter(row["trainable"], row["kept"], s=30 + 300 * row["learned"], alpha=0.7)
        bx.annotate(f"{name}\n×{row['step / full']:.1f} s/step", (row["trainable"], row["kept"]), fontsize=7,
                    xytext=(5, -4), textcoords="offset points")
    bx.set(xscale="log", xlabel="trainable parameters (counted)", ylabel="pretraining facts kept", ylim=(0, 1.08),
           title="kept against size (area ∝ learned)")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ spurious forgetting

@dataclass
class Realignment:
    """Sequential fine-tuning A → B, then a few steps on a handful of A's examples that are not scored."""

    scored_after_a: float  # recall of A's scored people after learning A
    scored_after_b: float  # … after then learning B
    scored_realigned: float  # … after re-aligning on A's other people
    null_after_b: float  # a model that learned only B: A's scored people
    null_realigned: float  # … after the same re-alignment
    b_after_b: float  # B's recall after B (it was learned)
    b_realigned: float  # B's recall after the re-alignment

    @property
    def recovered(self) -> float:
        """Share of the lost recall that re-alignment brings back: (realigned − after B) / (after A − after B)."""
        lost = self.scored_after_a - self.scored_after_b
        return (self.scored_realigned - self.scored_after_b) / lost if lost > 0 else float("nan")

    @property
    def beyond_null(self) -> float:
        """Recall gained by re-alignment on A's scored people, minus the null's gain (in recall points / 100)."""
        return (self.scored_realigned - self.scored_after_b) - (self.null_realigned - self.null_after_b)


def split_people(task: FactTask, n_realign: int, seed: int = 0) -> tuple[list, list]:
    """A's facts split by person: a seeded draw of ``n_realign`` people whose facts re-align, and the others, whose
    facts are scored (no scored fact is ever a re-alignment example)."""
    people = sorted({f.subject for f in task.train_facts})
    if not 0 < n_realign < len(people):
        raise ValueError(f"n_realign must be between 1 and {len(people) - 1}, got {n_realign}")
    order = torch.randperm(len(people), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = {people[i] for i in order[:n_realign]}
    return ([f for f in task.train_facts if f.subject in chosen],
            [f for f in task.train_facts if f.subject not in chosen])


def _task(lab: lm.Lab, facts: list, task_id: int, name: str, length: int) -> FactTask:
    x, y = lm.fact_batch(lab.tokenizer, facts, length=length)
    return FactTask(task_id, name, x, y, x, y, tuple(sorted(set(y.tolist()))), train_facts=facts, test_facts=facts)


def _stream(task: FactTask, evals: Sequence[FactTask], n_out: int) -> Stream:
    return Stream(task.name, "domain", [task], n_out, tuple(task.x_train.shape[1:]), eval_tasks=list(evals))


def realignment(lab: lm.Lab, *, n_people: int = 10, n_realign: int = 3, steps: int = 50, realign_steps: int = 5,
                realign_batch: int = 8, lr: float = 1e-3, second: str = "relation", seed: int = 0) -> Realignment:
    """Full fine-tuning on A (new people 1), then on B (new people 2), ``steps`` steps each; then ``realign_steps``
    steps, batch ``realign_batch``, on the facts of ``n_realign`` of A's people; A is scored on its other people.
    Null: the same B and the same re-alignment from the pretrained LM, which never learned A."""
    if second == "subjects":
        a, b = lm.fact_stream(lab, 2, "subjects", n_subjects=n_people).tasks
    else:
        a = lm.fact_stream(lab, 1, "subjects", n_subjects=n_people).tasks[0]
        b = lm.fact_stream(lab, 1, second, n_subjects=20).tasks[0]
    length = max(a.x_train.shape[1], b.x_train.shape[1])
    realign_facts, scored_facts = split_people(a, n_realign, seed)
    n_out = lab.model.config.vocab_size
    scored = _task(lab, scored_facts, 0, "A, scored people", length)
    realign = _task(lab, realign_facts, 0, "A, re-alignment people", length)
    b = _task(lab, b.train_facts, 1, "B", length)
    a_task = _task(lab, a.train_facts, 0, "A", length)

    def fit(model, task, n, batch=32):
        return train.fit(model, _stream(task, [scored, b], n_out), steps=n, lr=lr, batch_size=batch, seed=seed,
                         progress=False, eval_samples=max(len(scored.y_test), len(b.y_test))).R[-1]

    model = lab.copy().as_classifier()
    after_a = fit(model, a_task, steps)
    after_b = fit(model, b, steps)
    realigned = fit(model, realign, realign_steps, realign_batch)
    null = lab.copy().as_classifier()
    null_b = fit(null, b, steps)
    null_realigned = fit(null, realign, realign_steps, realign_batch)
    return Realignment(float(after_a[0]), float(after_b[0]), float(realigned[0]), float(null_b[0]),
                       float(null_realigned[0]), float(after_b[1]), float(realigned[1]))


def plot_realignment(r: Realignment, ax=None):
    """A's scored people's recall along A → B → re-alignment, beside the null that never learned A."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.6))
    stages = ["after A", "after B", "re-aligned"]
    ax.plot(stages, [r.scored_after_a, r.scored_after_b, r.scored_realigned], "o-", label="learned A, then B")
    ax.plot(stages[1:], [r.null_after_b, r.null_realigned], "s--", color="0.5", label="null: learned B only")
    ax.set(ylim=(0, 1.05), ylabel="A's scored people: recall",
           title="spurious forgetting? a few steps on other examples of A")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ the playground

@lru_cache(maxsize=64)
def family_point(method: str, steps: int = 30, seed: int = 0, smoke: bool = False) -> dict:
    """The playground: one method of the family on the new task for ``steps`` steps (``smoke``: the SMOKE lab):
    learned, kept, trainable parameters."""
    lab = ch09.lab_of(seed, smoke)
    stream = new_people(lab, 4 if smoke else 10, n_pretrained=50 if smoke else 300, seed=seed)
    start = time.perf_counter()
    model = family_model(lab, method, seed=seed)
    run = _fit(model, stream, steps, LRS[method], 32, seed)
    return {"method": method, "steps": steps, "learned": float(run.R[0, 1]), "kept": float(run.R[0, 0]),
            "trainable": trainable(model), "seconds": time.perf_counter() - start}


def plot_family_point(result: dict):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["new people: learned", "pretraining: kept"], [result["learned"], result["kept"]],
           color=["tab:blue", "tab:orange"])
    ax.set(ylim=(0, 1.05), ylabel="recall",
           title=f"{result['method']}, {result['steps']} steps ({result['trainable']:,} trainable)")
    fig.tight_layout()
    return fig
