"""Shipping an update to a language model: the shadow evaluation, a canary rule, a fallback router, and
per-tenant adapters with versions and rollback.

- ``prompt_embeddings``: what a drift detector watches, the mean of the last hidden states over a prompt's
  tokens (``cl_lab.drift`` does the testing).
- ``capability_matrix``: the shadow evaluation, one row per model (base, candidates, the routed system), one
  column per capability (old facts, their paraphrases, general perplexity, the new domain's facts).
- ``ship``: the release rule on that matrix: the target capability must improve by a margin and no guard may
  drop by more than its tolerance.
- ``canary``: live traffic, a share of it served by the candidate, a guard accuracy compared with the control's
  at every check; one-sided z-test, rollback at the first check that fails.
- ``DomainRouter``: the fallback of the source notes made concrete: queries the old tokenizer can read go to the
  base model, the rest to the candidate.
- ``AdapterRegistry``: PEFT LoRA adapters, one name per (tenant, version), all held in memory on one frozen base;
  serving a tenant activates its current version, a rollback moves the pointer back.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from cl_lab import _validate
from cl_lab.lm.evaluate import fact_batch, hits, object_logits, perplexity
from cl_lab.lm.lab import Lab, LMClassifier
from cl_lab.lm.tokenizer import encode, unknown_words
from cl_lab.lm.world import Domain, Fact

CAPABILITIES = ("old", "old_paraphrase", "general_ppl", "new", "new_paraphrase")


@torch.no_grad()
def prompt_embeddings(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """[N, d]: the mean over each prompt's real tokens of the causal LM's last hidden state."""
    lm = model.lm if isinstance(model, LMClassifier) else model
    body = lm.base_model if hasattr(lm, "base_model") and not hasattr(lm, "transformer") else lm
    was_training = lm.training
    lm.eval()
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            ids = encode(tokenizer, list(prompts[s:s + batch_size]))  # [B, L]
            real = ids != tokenizer.pad_token_id  # [B, L]
            h = body(input_ids=ids, attention_mask=real.long(), output_hidden_states=True).hidden_states[-1]
            out.append((h * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True))  # [B, d]
    finally:
        lm.train(was_training)
    return torch.cat(out)


def _recall_or_zero(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> float:
    """Recall, or 0 when the tokenizer cannot even read the facts (the base model on a new domain)."""
    if unknown_words(tokenizer, [f.sentence for f in facts]):
        return 0.0
    return hits(model, tokenizer, facts).double().mean().item()


def capability_matrix(models: dict, world, domain: Domain, *, old_facts: int | None = 480,
                      seed: int = 0) -> pd.DataFrame:
    """The shadow evaluation: ``models`` maps a name to a ``Lab`` (or to an object with ``model`` and
    ``tokenizer``, e.g. a ``DomainRouter``); rows are the models, columns ``CAPABILITIES``.

    ``old``: recall of a seeded random sample of ``old_facts`` pretraining facts (trained renderings);
    ``old_paraphrase``: their held-out renderings (same sample size); ``general_ppl``: perplexity on the held-out
    general text; ``new``/``new_paraphrase``: the domain's trained and held-out renderings (0 for a model whose
    tokenizer cannot read them).
    """
    gen = torch.Generator().manual_seed(seed)

    def sample(facts: list[Fact]) -> list[Fact]:
        if old_facts is None or old_facts >= len(facts):
            return facts
        return [facts[i] for i in sorted(torch.randperm(len(facts), generator=gen)[:old_facts].tolist())]

    old, old_para = sample(world.train_facts), sample(world.heldout_facts)
    rows = {}
    for name, m in models.items():
        evaluate = m.recall if isinstance(m, DomainRouter) else (lambda facts, m=m: _recall_or_zero(
            m.model, m.tokenizer, facts))
        ppl = m.perplexity(world.general_test) if isinstance(m, DomainRouter) else \
            perplexity(m.model, m.tokenizer, world.general_test)
        rows[name] = {"old": evaluate(old), "old_paraphrase": evaluate(old_para), "general_ppl": ppl,
                      "new": evaluate(domain.train_facts), "new_paraphrase": evaluate(domain.heldout_facts)}
    return pd.DataFrame.from_dict(rows, orient="index")[list(CAPABILITIES)]


@dataclass(frozen=True)
class Guard:
    """A capability that must not get worse than the baseline by more than ``tolerance`` (absolute for
    recalls; relative for perplexity, where lower is better)."""

    capability: str
    tolerance: float


def ship(matrix: pd.DataFrame, candidate: str, baseline: str, *, target: str = "new", min_gain: float = 0.1,
         guards: Sequence[Guard] = (Guard("old", 0.05), Guard("general_ppl", 0.25))) -> dict:
    """The release rule on a capability matrix: ship ``candidate`` when ``target`` rises by at least
    ``min_gain`` over ``baseline`` and no guard breaks. Returns the decision and the reasons."""
    for name in (candidate, baseline):
        if name not in matrix.index:
            raise ValueError(f"{name!r} must be a row of the matrix {list(matrix.index)}")
    cand, base = matrix.loc[candidate], matrix.loc[baseline]
    reasons = []
    if cand[target] - base[target] < min_gain:
        reasons.append(f"{target} +{cand[target] - base[target]:.3f} < +{min_gain}")
    for g in guards:
        if g.capability.endswith("ppl"):
            rise = cand[g.capability] / base[g.capability] - 1
            if rise > g.tolerance:
                reasons.append(f"{g.capability} +{rise:.0%} > +{g.tolerance:.0%}")
        elif base[g.capability] - cand[g.capability] > g.tolerance:
            reasons.append(f"{g.capability} −{base[g.capability] - cand[g.capability]:.3f} > −{g.tolerance}")
    return {"candidate": candidate, "ship": not reasons, "reasons": "; ".join(reasons) or "all guards hold"}


def canary(control: np.ndarray, candidate: np.ndarray, *, share: float = 0.1, per_check: int = 500,
           checks: int = 20, margin: float = 0.02, z: float = 3.0, seed: int = 0) -> dict:
    """One canary release, simulated on logged outcomes: ``control`` and ``candidate`` [N] say whether each
    model answers each of N guard queries correctly. Every check, ``per_check`` requests arrive (drawn at random
    from the N), a ``share`` of them served by the candidate; after each check the accumulated accuracies are
    compared one-sidedly,

        z_obs = (acc_control − acc_candidate − margin) / √(a_c(1 − a_c)/n_control + a_k(1 − a_k)/n_candidate),

    a_c, a_k the two accuracies (unpooled: under a non-zero margin the two are not equal, and a pooled variance
    would misjudge the candidate's); the candidate is rolled back at the first check with z_obs > ``z``. A stricter z
    than 1.64 pays for looking ``checks`` times. Returns whether and when it was rolled back, the requests the
    candidate served, and the errors it made that the control would not have (the canary's cost).
    """
    control, candidate = np.asarray(control, dtype=bool), np.asarray(candidate, dtype=bool)
    if control.shape != candidate.shape or control.ndim != 1 or not len(control):
        raise ValueError(f"control and candidate must be [N] outcomes of one shape, got {control.shape} and "
                         f"{candidate.shape}")
    _validate.in_range("share", share, 0.0, 1.0, high_open=True)
    _validate.positive_int("per_check", per_check)
    _validate.positive_int("checks", checks)
    rng = np.random.default_rng(_validate.non_negative_int("seed", seed))
    ok = {"control": 0, "candidate": 0}
    n = {"control": 0, "candidate": 0}
    extra_errors = 0
    for check in range(1, checks + 1):
        queries = rng.integers(len(control), size=per_check)
        to_candidate = rng.random(per_check) < share
        q_cand, q_ctrl = queries[to_candidate], queries[~to_candidate]
        ok["candidate"] += int(candidate[q_cand].sum())
        ok["control"] += int(control[q_ctrl].sum())
        n["candidate"] += len(q_cand)
        n["control"] += len(q_ctrl)
        extra_errors += int((control[q_cand] & ~candidate[q_cand]).sum())
        if min(n.values()) == 0:
            continue
        acc = {k: ok[k] / n[k] for k in ok}
        var = sum(acc[k] * (1 - acc[k]) / n[k] for k in acc)
        se = math.sqrt(max(var, 1e-12))
        if (acc["control"] - acc["candidate"] - margin) / se > z:
            return {"rolled back": True, "at check": check, "candidate requests": n["candidate"],
                    "extra errors": extra_errors}
    return {"rolled back": False, "at check": math.nan, "candidate requests": n["candidate"],
            "extra errors": extra_errors}


def canary_table(control: np.ndarray, candidates: dict, *, runs: int = 200, seed: int = 0, **kwargs) -> pd.DataFrame:
    """``canary`` over ``runs`` seeds for each candidate: rollback rate, median check of the rollback, and the
    mean extra errors the candidate made while it served."""
    rows = []
    for name, outcome in candidates.items():
        res = [canary(control, outcome, seed=seed + r, **kwargs) for r in range(runs)]
        at = [r["at check"] for r in res if r["rolled back"]]
        rows.append({"candidate": name, "accuracy drop": float(np.mean(control) - np.mean(outcome)),
                     "rolled back": float(np.mean([r["rolled back"] for r in res])),
                     "median check": float(np.median(at)) if at else math.nan,
                     "extra errors": float(np.mean([r["extra errors"] for r in res]))})
    return pd.DataFrame(rows).set_index("candidate")


@dataclass
class DomainRouter:
    """Serve each query with the base model when the base tokenizer can read it, else with the candidate
    (the source notes' "route out-of-domain queries to the base model", with the domain decided by the
    vocabulary: exact here, where every new-domain query holds a new word)."""

    base: Lab
    candidate: Lab

    def routes(self, texts: Sequence[str]) -> list[bool]:
        """True where a text goes to the candidate."""
        return [bool(unknown_words(self.base.tokenizer, [t])) for t in texts]

    def _hits(self, facts: Sequence[Fact]) -> torch.Tensor:
        to_cand = torch.tensor(self.routes([f.sentence for f in facts]))
        out = torch.zeros(len(facts), dtype=torch.bool)
        for lab, mask in ((self.candidate, to_cand), (self.base, ~to_cand)):
            if mask.any():
                chosen = [f for f, m in zip(facts, mask.tolist()) if m]
                x, y = fact_batch(lab.tokenizer, chosen)
                out[mask] = object_logits(lab.model, x, lab.tokenizer.pad_token_id).argmax(1) == y
        return out

    def recall(self, facts: Sequence[Fact]) -> float:
        return self._hits(facts).double().mean().item() if facts else math.nan

    def perplexity(self, texts: Sequence[str]) -> float:
        """Perplexity of the routed system (each text scored by the model it is routed to)."""
        to_cand = self.routes(texts)
        parts = [(lab, [t for t, c in zip(texts, to_cand) if c == flag])
                 for lab, flag in ((self.candidate, True), (self.base, False))]
        total, count = 0.0, 0
        for lab, chosen in parts:
            if chosen:
                ids = encode(lab.tokenizer, chosen, add_eos=True)
                n = int((ids[:, 1:] != lab.tokenizer.pad_token_id).sum())
                total += math.log(perplexity(lab.model, lab.tokenizer, chosen)) * n
                count += n
        return math.exp(total / count)


@dataclass
class AdapterRegistry:
    """Per-tenant LoRA adapters on one frozen base LM (PEFT), every version kept in memory.

    ``publish(tenant, train)`` adds a fresh adapter named ``"{tenant}_v{k}"``, lets ``train(model)`` fit it (the
    model is a PEFT model with only that adapter trainable and active), and makes it the tenant's current
    version. ``serve(tenant)`` activates the current version and returns the model; ``rollback(tenant)`` makes
    the previous version current again: a pointer move, no weights copied.
    """

    lab: Lab
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("c_attn", "c_fc", "c_proj")
    model: nn.Module | None = field(default=None, init=False)
    versions: dict[str, list[str]] = field(default_factory=dict, init=False)
    current: dict[str, int] = field(default_factory=dict, init=False)

    def _config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
                          fan_in_fan_out=True, bias="none")

    def publish(self, tenant: str, train: Callable[[nn.Module], object]) -> str:
        from peft import get_peft_model

        if not tenant.isidentifier():
            raise ValueError(f"tenant must be a plain identifier (letters, digits, _), got {tenant!r}")
        name = f"{tenant}_v{len(self.versions.get(tenant, [])) + 1}"
        if self.model is None:
            self.model = get_peft_model(copy_model(self.lab.model), self._config(), adapter_name=name)
        else:
            self.model.add_adapter(name, self._config())
        self.model.set_adapter(name)  # only this adapter is trainable and active
        train(self.model)
        self.model.eval()
        self.versions.setdefault(tenant, []).append(name)
        self.current[tenant] = len(self.versions[tenant]) - 1
        return name

    def serve(self, tenant: str) -> nn.Module:
        if tenant not in self.versions:
            raise KeyError(f"tenant must be one of {sorted(self.versions)}, got {tenant!r}")
        self.model.set_adapter(self.versions[tenant][self.current[tenant]])
        return self.model

    def rollback(self, tenant: str) -> str:
        """Make the tenant's previous version current; returns its name."""
        if self.current.get(tenant, 0) == 0:
            raise ValueError(f"tenant {tenant!r} has no earlier version to roll back to")
        self.current[tenant] -= 1
        return self.versions[tenant][self.current[tenant]]

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapter (its A and B matrices), by parameter name."""
        return {k: v.detach() for k, v in self.model.named_parameters() if f".{name}." in k}

    def n_adapter_parameters(self, name: str) -> int:
        return sum(v.numel() for v in self.adapter_state(name).values())


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (PEFT wraps the model it is given in place)."""
    import copy

    return copy.deepcopy(model)


def serialized_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """``state`` as ``torch.save`` writes it (what a registry stores or ships)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
