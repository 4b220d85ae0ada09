"""Knowledge editing on a causal LM (GPT-2 or Llama): ROME, MEMIT, and the fine-tuning baselines FT and FT-L,
with CounterFact-style scores.

An ``Edit`` asks that ``prompt`` (which names ``subject``) be answered ``target`` instead of ``true``.

- **ROME** (Meng et al. 2022, arXiv 2202.05262, sec. 3) writes one fact into the MLP output projection of one
  layer (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``): the key k* is that projection's input at the last
  subject token, averaged over a few contexts (``subject_keys``); the value v* = W k* + δ, where δ, added to
  the MLP's output at that token, makes the model say the target (``optimise_values``: −log P(target) over
  the contexts, a KL "essence" term on other prompts about the subject, a pull towards the old value and a
  norm bound); then the rank-one closed form (``cl_lab.methods.editing.rome_update``) with the key
  covariance C of the layer (``layer_covariances``: every token of a corpus).
- **MEMIT** (Meng et al. 2023, arXiv 2210.07229) writes a batch: a target hidden state z per edit at the last
  layer of a range, then, layer by layer, the least-squares update that moves the residual a share of the
  way (``memit``).
- **FT / FT-L** (ROME's baselines): Adam on the same projection's weights, unconstrained or with every weight
  kept within ±ε of its old value (an L∞ bound) (``finetune``).
- ``edit_scores``: efficacy (P(target) > P(true) on the prompt), paraphrase (the same on other phrasings),
  neighbourhood (P(true) > P(target) on prompts about other subjects whose answer is ``true``).

The edited token is ROME's last subject token by default; ``token="last"`` edits at the prompt's last token
instead (the authors' code offers it as ``fact_token="last"``), for models that read the subject there. All
functions change the model in place only where they say so; ``updated`` and ``restored`` undo weight changes
exactly at the end of a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.layout import layout, weight_out_in
from cl_lab.lm.tokenizer import encode
from cl_lab.lm.tracing import answer_token, check_layers, last_logits, subject_span
from cl_lab.lm.world import BASE_RELATIONS, RELATIONS, World
from cl_lab.methods.editing import key_covariance, memit_update, rome_update

SITES = ("mlp", "hidden")  # where δ is added: the MLP's output (ROME) or the block's output (MEMIT's z)
TOKENS = ("subject_last", "last")  # the token whose key is edited: ROME's last subject token, or the prompt's last


@dataclass(frozen=True)
class Edit:
    """One requested edit, CounterFact-style: ``prompt`` should be answered ``target``, not ``true``.

    ``paraphrases``: other prompts about the same subject and relation; ``neighbours``: prompts about other
    subjects whose answer is ``true`` (they should keep it); ``essence``: prompts about the subject whose
    next-token distribution the KL term keeps (ROME uses "{subject} is a").
    """

    prompt: str
    subject: str
    target: str
    true: str
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    essence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target", "true"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for text in (self.prompt,) + self.paraphrases + self.essence:
            if self.subject not in text:
                raise ValueError(f"subject must occur in the prompt, got subject {self.subject!r} and prompt "
                                 f"{text!r}")
        if self.target == self.true:
            raise ValueError(f"target must differ from true, got {self.target!r} for both")


def _edits(edits: Sequence[Edit]) -> list[Edit]:
    edits = list(edits)
    if not edits:
        raise ValueError("edits must hold at least one Edit, got none")
    bad = [type(e).__name__ for e in edits if not isinstance(e, Edit)]
    if bad:
        raise TypeError(f"edits must be Edit objects, got {bad[:3]}")
    return edits


def essence_prompt(subject: str, relation: str) -> str:
    """ROME's essence prompt "{subject} is a"; for a job edit (in this world "{s} is a" asks for the job, so
    the KL would fight the edit) the subject's language prompt "{subject} speaks" instead."""
    return f"{subject} speaks" if relation == "works_as" else f"{subject} is a"


def world_edits(world: World, n: int, *, seed: int = 0, n_neighbours: int = 10) -> list[Edit]:
    """``n`` edits of the tiny LM's world, one per subject (distinct subjects, a seeded random draw):

    a random pretrained relation of the subject, one of its trained renderings as the prompt, a random other
    object of that relation as the target; paraphrases: the fact's other renderings (trained and held out);
    neighbours: up to ``n_neighbours`` trained renderings of subjects outside the edited set with the same
    relation and the same true object.
    """
    _validate.positive_int("n", n)
    _validate.non_negative_int("n_neighbours", n_neighbours)
    if n > len(world.subjects) - 1:
        raise ValueError(f"n must leave some pretrained subjects unedited (≤ {len(world.subjects) - 1}), got {n}")
    rng = np.random.default_rng(seed)
    subjects = [world.subjects[i] for i in rng.permutation(len(world.subjects))[:n]]
    edited = set(subjects)
    renderings: dict[tuple[str, str], list] = {}
    for fact in world.train_facts + world.heldout_facts:
        renderings.setdefault((fact.subject, fact.relation), []).append(fact)
    trained = {(f.subject, f.relation, f.template) for f in world.train_facts}
    out = []
    for subject in subjects:
        relation = BASE_RELATIONS[int(rng.integers(len(BASE_RELATIONS)))].name
        true = world.knowledge[(subject, relation)]
        facts = sorted(renderings[(subject, relation)], key=lambda f: f.template)
        train = [f for f in facts if (f.subject, f.relation, f.template) in trained]
        main = train[int(rng.integers(len(train)))]
        others = [o for o in RELATIONS[relation].objects if o != true]
        target = others[int(rng.integers(len(others)))]
        pool = [f.prompt for f in world.train_facts if f.relation == relation and f.object == true
                and f.subject not in edited]
        picked = rng.permutation(len(pool))[:n_neighbours]
        out.append(Edit(main.prompt, subject, target, true,
                        paraphrases=tuple(f.prompt for f in facts if f.template != main.template),
                        neighbours=tuple(pool[i] for i in sorted(picked)),
                        essence=(essence_prompt(subject, relation),)))
    return out


# ---------------------------------------------------------------- keys and the covariance

class _Stop(Exception):
    """Raised by a hook once it has what it needs: the later layers are not run."""


def _located(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], subjects: Sequence[str],
             token: str = "subject_last") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [R, T] and each row's edited token [R]: its last subject token, or its last token."""
    _validate.one_of("token", token, TOKENS)
    ids = encode(tokenizer, list(prompts))
    if token == "last":
        return ids, (ids != tokenizer.pad_token_id).sum(1) - 1
    last = torch.tensor([subject_span(tokenizer, p, s)[1] - 1 for p, s in zip(prompts, subjects)])
    return ids, last


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, ids: torch.Tensor, pad_id: int, *, output: bool) -> torch.Tensor:
    """``module``'s output (``output=True``) or its first input [B, T, d] on ids, without running the layers after
    it (a hook stops the forward pass there)."""
    seen = []

    def keep(value):
        seen.append((value[0] if isinstance(value, tuple) else value).detach())
        raise _Stop

    handle = (module.register_forward_hook(lambda mod, args, out: keep(out)) if output
              else module.register_forward_pre_hook(lambda mod, args: keep(args)))
    try:
        model(input_ids=ids, attention_mask=(ids != pad_id).long())
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _capture_input(model: nn.Module, module: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The input of ``module`` [B, T, d_in] on ids."""
    return _capture(model, module, ids, pad_id, output=False).float()


def mlp_keys(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             subjects: Sequence[str], layer: int, *, token: str = "subject_last",
             batch_size: int = 256) -> torch.Tensor:
    """ROME's keys: the input of layer ``layer``'s MLP output projection at each prompt's last subject token
    (or, ``token="last"``, its last token) [R, d_k] (the MLP's hidden activation there)."""
    (layer,) = check_layers(model, [layer])
    ids, last = _located(tokenizer, prompts, subjects, token)
    device = next(model.parameters()).device
    proj = layout(model).mlp_out(layer)
    out = []
    for s in range(0, len(ids), batch_size):
        inputs = _capture_input(model, proj, ids[s:s + batch_size].to(device), tokenizer.pad_token_id)
        out.append(inputs[torch.arange(len(inputs)), last[s:s + batch_size].to(device)].cpu())
    return torch.cat(out)


@torch.no_grad()
def layer_covariances(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                      layers: Sequence[int] | None = None, ridge: float = 1e-3,
                      batch_size: int = 256) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] [d_k, d_k] (float64) of each layer's keys over every real token of ``texts`` (each with its
    end token), with a ridge of ``ridge`` × its mean eigenvalue so that C is safely invertible (ROME: 100,000
    Wikipedia tokens). One pass per batch serves every layer; the layers after the last one are not run."""
    layers = sorted(set(check_layers(model, layers)))
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one text, got none")
    device, pad, lay = next(model.parameters()).device, tokenizer.pad_token_id, layout(model)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for s in range(0, len(texts), batch_size):
        ids = encode(tokenizer, texts[s:s + batch_size], add_eos=True).to(device)  # [B, T]
        real = ids != pad

        def grab(layer: int):
            def hook(mod, args):
                keys[layer].append(args[0].detach()[real].float().cpu())  # [n_real, d_k]
                if layer == layers[-1]:
                    raise _Stop
            return hook

        handles = [lay.mlp_out(layer).register_forward_pre_hook(grab(layer)) for layer in layers]
        try:
            model(input_ids=ids, attention_mask=real.long())
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
    return {layer: key_covariance(torch.cat(keys[layer]), ridge) for layer in layers}


def subject_keys(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layer: int,
                 contexts: Sequence[str] = ("{}",), token: str = "subject_last") -> torch.Tensor:
    """k* of each edit [N, d_k]: the key at the last subject token (or the last token), averaged over the prompt
    placed in each of ``contexts`` ("{}" is the bare prompt; ROME: about 20 short prefixes of generated text)."""
    edits, contexts = _edits(edits), _contexts(contexts)
    prompts = [c.format(e.prompt) for e in edits for c in contexts]
    keys = mlp_keys(model, tokenizer, prompts, [e.subject for e in edits for _ in contexts], layer, token=token)
    return keys.view(len(edits), len(contexts), -1).mean(1)


def _contexts(contexts: Sequence[str]) -> list[str]:
    contexts = list(contexts)
    if not contexts or any(not isinstance(c, str) or c.count("{}") != 1 for c in contexts):
        raise ValueError(f"contexts must be strings with one '{{}}' each (where the prompt goes), got {contexts}")
    return contexts


# ---------------------------------------------------------------- values: v* (ROME) and z (MEMIT)

@dataclass
class Values:
    """What ``optimise_values`` found: the site's old output at the last subject token of each bare prompt
    ``init`` [N, d], the change ``delta`` [N, d], and the final mean P(target) over the rewriting prompts."""

    init: torch.Tensor
    delta: torch.Tensor
    p_target: torch.Tensor  # [N]

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def _site_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    _validate.one_of("site", site, SITES)
    (layer,) = check_layers(model, [layer])
    lay = layout(model)
    return lay.mlp(layer) if site == "mlp" else lay.block(layer)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def essence_kl(log_new: torch.Tensor, log_old: torch.Tensor) -> torch.Tensor:
    """ROME's essence term per prompt [E]: KL(P_new ‖ P_old) = Σ_x P_new(x) (log P_new(x) − log P_old(x)) of the
    next-token log-distributions [E, V], in the direction of the authors' code (``kl_div(old, new,
    log_target=True)``)."""
    return (log_new.exp() * (log_new - log_old)).sum(-1)


def optimise_values(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layer: int, *,
                    site: str = "mlp", token: str = "subject_last", contexts: Sequence[str] = ("{}",),
                    steps: int = 20, lr: float = 0.5,
                    kl_factor: float = 0.0625, weight_decay: float = 0.5, clamp: float = 4.0,
                    stop_loss: float = 0.05) -> Values:
    """ROME's v* (Meng et al. 2022, eq. 4), for every edit at once (each δ only reaches its own prompts, Adam is
    elementwise, and an edit that has converged is held still, so the batch equals one run per edit).

    δ_e [d] is added to ``site``'s output ('mlp': the MLP's, for ROME; 'hidden': the block's, for MEMIT's z)
    at the last subject token of every prompt of edit e, essence prompts included (``token="last"``: at each
    prompt's last token, as ROME's code does with ``fact_token="last"``), and minimises

        mean over contexts of −log P(target | context(prompt))
        + kl_factor · mean over essence prompts of KL(P_δ(· | p) ‖ P_old(· | p))
        + weight_decay · ‖δ‖ / ‖v₀‖²     (ROME's code; v₀ the old output on the bare prompt)

    by at most ``steps`` Adam steps at ``lr``, with ‖δ‖ ≤ ``clamp`` · ‖v₀‖ after each, stopping once every edit's
    loss is below ``stop_loss`` (ROME: 20 steps, lr 0.5, kl 0.0625, decay 0.5, clamp 4, stop at 0.05; MEMIT:
    clamp 0.75). The model's weights are not changed.
    """
    edits, contexts = _edits(edits), _contexts(contexts)
    for name, value in (("steps", steps),):
        _validate.positive_int(name, value)
    for name, value in (("lr", lr), ("clamp", clamp)):
        _validate.positive(name, value)
    for name, value in (("kl_factor", kl_factor), ("weight_decay", weight_decay)):
        _validate.non_negative(name, value)
    module = _site_module(model, site, layer)
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    rewrite = [(i, c.format(e.prompt)) for i, e in enumerate(edits) for c in contexts]
    essence = [(i, p) for i, e in enumerate(edits) for p in e.essence]
    rows = rewrite + essence
    ids, last = _located(tokenizer, [p for _, p in rows], [edits[i].subject for i, _ in rows], token)
    ids, last = ids.to(device), last.to(device)
    owner = torch.tensor([i for i, _ in rows], device=device)  # [R] the edit of each row
    n_rw = len(rewrite)
    targets = torch.tensor([answer_token(tokenizer, edits[i].target) for i, _ in rewrite], device=device)
    bare, bare_last = _located(tokenizer, [e.prompt for e in edits], [e.subject for e in edits], token)
    with _frozen(model):
        init = _site_output(model, module, bare.to(device), bare_last.to(device), pad)  # [N, d] v₀
        with torch.no_grad():
            old = torch.log_softmax(last_logits(model, ids[n_rw:], pad), -1) if essence else None  # [E, V]
        delta = torch.zeros(len(edits), init.shape[1], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        max_norm = clamp * init.norm(dim=1, keepdim=True)  # [N, 1]
        done = torch.zeros(len(edits), dtype=torch.bool, device=device)

        def add_delta(mod, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.clone()
            out[torch.arange(len(out), device=device), last] += delta[owner].to(out.dtype)
            return (out,) + output[1:] if isinstance(output, tuple) else out

        handle = module.register_forward_hook(add_delta)
        try:
            for step in range(steps + 1):
                log_p = torch.log_softmax(last_logits(model, ids, pad), -1)  # [R, V]
                nll = -log_p[torch.arange(n_rw, device=device), targets]  # [n_rw]
                p_target = torch.zeros(len(edits), device=device).index_add_(0, owner[:n_rw], nll.neg().exp())
                if step == steps:
                    break
                loss = torch.zeros(len(edits), device=device).index_add_(0, owner[:n_rw], nll) / len(contexts)
                if essence:
                    kl = essence_kl(log_p[n_rw:], old)  # [E]
                    counts = torch.bincount(owner[n_rw:], minlength=len(edits)).clamp(min=1)
                    loss = loss + kl_factor * torch.zeros_like(loss).index_add_(0, owner[n_rw:], kl) / counts
                loss = loss + weight_decay * delta.norm(dim=1) / init.norm(dim=1).pow(2)
                done |= loss.detach() < stop_loss  # ROME stops an edit once its loss is below 0.05
                if done.all():
                    break
                kept = delta.detach().clone()
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
                with torch.no_grad():
                    delta.mul_(torch.clamp(max_norm / delta.norm(dim=1, keepdim=True).clamp(min=1e-12), max=1.0))
                    delta[done] = kept[done]
        finally:
            handle.remove()
    return Values(init.detach().cpu(), delta.detach().cpu(), (p_target / len(contexts)).detach().cpu())


def _site_output(model: nn.Module, module: nn.Module, ids: torch.Tensor, last: torch.Tensor,
                 pad: int) -> torch.Tensor:
    """The output of ``module`` at each row's position ``last`` [R, d]."""
    output = _capture(model, module, ids, pad, output=True)  # [R, T, d]
    return output[torch.arange(len(ids), device=ids.device), last].float()


# ---------------------------------------------------------------- ROME, MEMIT, FT

@dataclass
class RomeEdit:
    """One ROME edit at ``layer``: k* [d_k], v* [d] (without the bias) and the rank-one change Δ [d, d_k]."""

    layer: int
    k_star: torch.Tensor
    v_star: torch.Tensor
    delta: torch.Tensor


def rome_edits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layer: int,
               C: torch.Tensor, *, contexts: Sequence[str] = ("{}",), token: str = "subject_last",
               **value_options) -> list[RomeEdit]:
    """ROME's change for each edit on its own, all computed on the current model (which is not changed):
    k* from ``subject_keys``, v* = W k* + δ from ``optimise_values`` (site 'mlp'), Δ = ``rome_update``."""
    edits = _edits(edits)
    k_star = subject_keys(model, tokenizer, edits, layer, contexts, token)  # [N, d_k]
    values = optimise_values(model, tokenizer, edits, layer, site="mlp", token=token, contexts=contexts,
                             **value_options)
    W = weight_out_in(layout(model).mlp_out(layer)).detach().cpu().float()  # [d, d_k]
    out = []
    for k, d in zip(k_star, values.delta):
        v_star = W @ k + d
        out.append(RomeEdit(layer, k, v_star, rome_update(W, C, k, v_star)))
    return out


def add_to_layer(model: nn.Module, layer: int, delta: torch.Tensor) -> None:
    """W ← W + Δ for layer ``layer``'s MLP output projection, in place (Δ [out, in], any layout)."""
    weight = weight_out_in(layout(model).mlp_out(layer))
    with torch.no_grad():
        weight += delta.to(weight.dtype).to(weight.device)


@contextlib.contextmanager
def restored(model: nn.Module, layers) -> Iterator[nn.Module]:
    """Within the block the MLP output projections of ``layers`` may change freely (an edit, fine-tuning); their
    exact old parameters come back on exit."""
    lay = layout(model)
    saved = [(p, p.detach().clone()) for layer in layers for p in lay.mlp_out(layer).parameters()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


@contextlib.contextmanager
def updated(model: nn.Module, deltas: dict[int, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, each layer's MLP output projection has ``deltas[layer]`` added; the exact old weights
    come back on exit."""
    with restored(model, deltas):
        for layer, delta in deltas.items():
            add_to_layer(model, layer, delta)
        yield model


def memit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layers: Sequence[int],
          covariances: dict[int, torch.Tensor], *, lam: float = 15_000.0, contexts: Sequence[str] = ("{}",),
          token: str = "subject_last", z: torch.Tensor | None = None, **value_options) -> dict[int, torch.Tensor]:
    """MEMIT (Meng et al. 2023, arXiv 2210.07229, alg. 1), in place: every edit at once, spread over ``layers``.

    1. z_e: the hidden state after the last of ``layers`` at edit e's token that makes the model say the target
       (``memit_targets``, unless ``z`` is given).
    2. For each layer l in order: the keys K (``subject_keys`` on the model edited so far), the residual
       R = (z − h_last) / (number of layers left), and Δ_l = ``memit_update``(λ C_l, K, R), applied at once.

    ``covariances[l]`` is C_l = E[k kᵀ] at layer l, ``lam`` MEMIT's λ (15,000 for GPT-J, 20,000 for GPT-2 XL).
    ``z`` [N, d]: targets from an earlier call of ``memit_targets`` (they depend only on the unedited model).
    Returns {layer: Δ_l}.
    """
    edits = _edits(edits)
    layers = sorted(check_layers(model, layers))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {layers}")
    missing = [x for x in layers if x not in covariances]
    if missing:
        raise ValueError(f"covariances must hold a C for every layer, got none for {missing}")
    _validate.positive("lam", lam)
    top = layout(model).block(layers[-1])
    ids, last = _located(tokenizer, [e.prompt for e in edits], [e.subject for e in edits], token)
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    ids, last = ids.to(device), last.to(device)
    if z is None:
        z = memit_targets(model, tokenizer, edits, layers[-1], token=token, contexts=contexts, **value_options)
    if z.shape[0] != len(edits):
        raise ValueError(f"z must hold one target per edit ({len(edits)}), got {z.shape[0]}")
    deltas = {}
    for i, layer in enumerate(layers):
        keys = subject_keys(model, tokenizer, edits, layer, contexts, token)  # [N, d_k]
        residual = (z - _site_output(model, top, ids, last, pad).cpu()) / (len(layers) - i)  # [N, d]
        deltas[layer] = memit_update(lam * covariances[layer], keys, residual)
        add_to_layer(model, layer, deltas[layer])
    return deltas


def memit_targets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layer: int, *,
                  token: str = "subject_last", contexts: Sequence[str] = ("{}",), **value_options) -> torch.Tensor:
    """MEMIT's z [N, d]: the hidden state after block ``layer`` at each edit's token that makes the model say the
    target (``optimise_values`` with site 'hidden'; MEMIT's norm bound 0.75 · ‖h‖ unless ``clamp`` is given)."""
    value_options = {"clamp": 0.75, **value_options}
    return optimise_values(model, tokenizer, edits, layer, site="hidden", token=token, contexts=contexts,
                           **value_options).target


def finetune(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit], layer: int, *,
             steps: int = 25, lr: float = 5e-4, linf: float | None = None, stop_loss: float = 1e-2) -> int:
    """ROME's fine-tuning baselines, in place: Adam on layer ``layer``'s MLP output projection (weight and
    bias) with −log P(target) on the edits' prompts, at most ``steps`` steps, stopping once the mean loss is
    below ``stop_loss``. ``linf``: FT-L, every parameter clamped to within ±linf of its old value after each
    step (ROME: 5e-4 for GPT-2 XL); None: FT, unconstrained. Returns the number of steps taken."""
    edits = _edits(edits)
    _validate.positive_int("steps", steps)
    _validate.positive("lr", lr)
    if linf is not None:
        _validate.positive("linf", linf)
    (layer,) = check_layers(model, [layer])
    proj = layout(model).mlp_out(layer)
    params = [p for p in proj.parameters()]
    old = [p.detach().clone() for p in params]
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    ids = encode(tokenizer, [e.prompt for e in edits]).to(device)
    targets = torch.tensor([answer_token(tokenizer, e.target) for e in edits], device=device)
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    taken = 0
    try:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(last_logits(model, ids, pad), targets)
            if loss.item() < stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
            if linf is not None:
                with torch.no_grad():
                    for p, p0 in zip(params, old):
                        p.copy_(torch.maximum(torch.minimum(p, p0 + linf), p0 - linf))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return taken


# ---------------------------------------------------------------- scores

@torch.no_grad()
def edit_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit],
                batch_size: int = 512) -> pd.DataFrame:
    """CounterFact-style scores, one row per edit (Meng et al. 2022, sec. 3.2):

    - ``efficacy``: 1 if P(target) > P(true) on the prompt;
    - ``paraphrase``: the share of paraphrases with P(target) > P(true);
    - ``neighbourhood``: the share of neighbour prompts with P(true) > P(target) (nan without neighbours);
    - ``p_target``: P(target) on the prompt.
    """
    edits = _edits(edits)
    rows = [(i, kind, p) for i, e in enumerate(edits)
            for kind, prompts in (("efficacy", (e.prompt,)), ("paraphrase", e.paraphrases),
                                  ("neighbourhood", e.neighbours)) for p in prompts]
    x = encode(tokenizer, [p for _, _, p in rows])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logp = torch.cat([torch.log_softmax(last_logits(model, x[s:s + batch_size].to(device),
                                                        tokenizer.pad_token_id), -1).cpu()
                          for s in range(0, len(x), batch_size)])  # [R, V]
    finally:
        model.train(was_training)
    new = torch.tensor([answer_token(tokenizer, edits[i].target) for i, _, _ in rows])
    old = torch.tensor([answer_token(tokenizer, edits[i].true) for i, _, _ in rows])
    lp_new, lp_old = logp.gather(1, new[:, None])[:, 0], logp.gather(1, old[:, None])[:, 0]
    table = pd.DataFrame({"edit": [i for i, _, _ in rows], "kind": [k for _, k, _ in rows],
                          "success": np.where([k == "neighbourhood" for _, k, _ in rows],
                                              (lp_old > lp_new).numpy(), (lp_new > lp_old).numpy()).astype(float),
                          "p_target": lp_new.exp().numpy()})
    scores = table.pivot_table(index="edit", columns="kind", values="success", aggfunc="mean")
    scores = scores.reindex(index=range(len(edits)), columns=["efficacy", "paraphrase", "neighbourhood"])
    scores["p_target"] = table[table.kind == "efficacy"].set_index("edit").p_target
    return scores
