"""Causal tracing (Meng et al. 2022, arXiv 2202.05262, sec. 2) from scratch, with forward hooks.

Three runs of a prompt whose next token should be the object o:

1. **clean**: P(o) as the model gives it;
2. **corrupted**: Gaussian noise (3σ, σ the standard deviation of the subjects' token embeddings) added to the
   embeddings of the subject tokens, so the model loses track of who the prompt is about; P(o) falls;
3. **corrupted, one activation restored**: the clean run's value of one activation (layer l, token i) is put
   back into the corrupted run. Its **indirect effect** is IE = P_restored(o) − P_corrupted(o): how much of
   the fact flows through that one state.

Activations are named as in TransformerLens (read, not used), each name saying where it sits:

| name                           | what                        | GPT-2 module            | Llama module           |
|--------------------------------|-----------------------------|-------------------------|------------------------|
| ``hook_embed``                 | token embeddings            | ``transformer.wte``     | ``model.embed_tokens`` |
| ``blocks.{l}.hook_resid_post`` | hidden state after block l  | ``transformer.h.{l}``   | ``model.layers.{l}``   |
| ``blocks.{l}.hook_mlp_out``    | the MLP's output in block l | ``….mlp``               | ``….mlp``              |
| ``blocks.{l}.hook_attn_out``   | the attention's output      | ``….attn``              | ``….self_attn``        |

``hooked`` puts functions on named activations for one run and always removes them; ``run_with_cache`` records
activations; ``trace`` is the batched experiment: every (layer, token) restoration of every prompt, all noise
samples, in a few forward passes. Like the paper, MLP and attention outputs are restored in a window of
``window`` layers around l (the paper: 10 of GPT-2 XL's 48), hidden states one layer at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.layout import layout
from cl_lab.lm.tokenizer import encode, is_word_level

SITES = {"hidden": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_PART = {"hook_resid_post": "block", "hook_mlp_out": "mlp", "hook_attn_out": "attn"}
EMBED = "hook_embed"
CATEGORIES = ("first subject token", "last subject token", "first token after", "further tokens", "last token")
TOKEN_SETS = ("all", "key")  # every token from the subject on, or only the last subject token and the last token

Patch = Callable[[torch.Tensor], torch.Tensor]  # an activation [B, T, d] -> its replacement


def hook_name(site: str, layer: int) -> str:
    """'blocks.{layer}.hook_resid_post' for site 'hidden', '….hook_mlp_out' for 'mlp', '….hook_attn_out' for 'attn'."""
    _validate.one_of("site", site, tuple(SITES))
    return f"blocks.{layer}.{SITES[site]}"


def check_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as a list (every layer when None); an index outside the model raises a ValueError."""
    n = layout(model).n_layers
    if layers is None:
        return list(range(n))
    layers = list(layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n]
    if bad or not layers:
        raise ValueError(f"layers must be layer indices in 0..{n - 1}, got {layers}")
    return layers


def module_of(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the activation ``name`` (see the module docstring's table)."""
    lay = layout(model)
    if name == EMBED:
        return lay.embedding()
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in _PART:
        raise ValueError(f"name must be '{EMBED}' or 'blocks.<layer>.<{'|'.join(_PART)}>', got {name!r}")
    layer = int(parts[1])
    check_layers(model, [layer])
    return lay.module(_PART[parts[2]], layer)


@contextlib.contextmanager
def hooked(model: nn.Module, patches: dict[str, Patch]) -> Iterator[None]:
    """Within the block, activation ``name`` is replaced by ``patches[name](activation)`` on every forward pass.

    A module returning a tuple (attention: output and weights) has its first element replaced. The hooks are
    removed on exit, also when the block raises: the model is left exactly as it was.
    """
    handles = []

    def make(fn: Patch):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + output[1:]
            return fn(output)
        return hook

    try:
        for name, fn in patches.items():
            handles.append(module_of(model, name).register_forward_hook(make(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attention_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return (ids != pad_id).long()


def last_logits(model: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token logits [B, V] at each right-padded row's last real token (only those positions reach the head)."""
    mask = _attention_mask(ids, pad_id)  # [B, T]
    last = mask.sum(1) - 1  # [B]
    keep = torch.unique(last)  # [K] the distinct last positions
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, K, V]
    return logits[torch.arange(len(ids)), torch.searchsorted(keep, last)].float()


@torch.no_grad()
def run_with_cache(model: nn.Module, ids: torch.Tensor, names: Sequence[str],
                   pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Last-token logits [B, V] and a copy of every activation in ``names`` ({name: [B, T, d]})."""
    cache: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Patch:
        def fn(x: torch.Tensor) -> torch.Tensor:
            cache[name] = x.detach().clone()
            return x
        return fn

    with hooked(model, {n: keep(n) for n in names}):
        logits = last_logits(model, ids, pad_id)
    return logits, cache


def subject_span(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[int, int]:
    """[start, end) token positions of ``subject``'s first occurrence in the encoded ``prompt`` (leading special
    tokens counted): the tokens whose characters overlap the subject's, from the tokenizer's offsets.
    Raises a ValueError when the subject is not in the prompt."""
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject must occur in the prompt, got subject {subject!r} and prompt {prompt!r}")
    offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < at + len(subject) and b > at]
    return inside[0], inside[-1] + 1


def answer_token(tokenizer: PreTrainedTokenizerBase, answer: str) -> int:
    """The token id of a one-token ``answer`` as it follows a prompt (word-level: the word; subword: ' ' + word)."""
    if is_word_level(tokenizer):
        vocab = tokenizer.get_vocab()
        if answer not in vocab:
            raise ValueError(f"answer must be a word of the vocabulary, got {answer!r}")
        return vocab[answer]
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer must be one token after a space, got {answer!r} ({len(ids)} tokens)")
    return ids[0]


@torch.no_grad()
def embedding_std(model: nn.Module, tokenizer: PreTrainedTokenizerBase, subjects: Sequence[str]) -> float:
    """σ of the token embeddings of ``subjects``' tokens (every entry of every subject token's embedding)."""
    if not subjects:
        raise ValueError("subjects must hold at least one subject, got none")
    rows = []
    for subject in subjects:
        start, end = subject_span(tokenizer, subject, subject)
        ids = encode(tokenizer, [subject])[:, start:end]  # [1, n]
        rows.append(layout(model).embedding()(ids.to(next(model.parameters()).device))[0])
    return torch.cat(rows).float().std().item()


@dataclass
class Trace:
    """The result of ``trace``: probabilities of the true object, per prompt, layer and token.

    ``p_restored[f, j, i]`` is P(o) for prompt f with the clean activation of ``layers[j]`` (or its window)
    at token i restored; nan where token i was not traced (past the prompt's end, or outside ``tokens="key"``).
    Tokens before the subject are not run: the noise cannot reach them (attention is causal), so restoring
    them changes nothing and their IE is exactly 0.
    """

    site: str
    window: int
    noise: float
    layers: list[int]
    tokens: list[list[str]]  # each prompt's tokens, as decoded
    spans: list[tuple[int, int]]  # each prompt's subject [start, end)
    p_clean: torch.Tensor  # [F]
    p_corrupt: torch.Tensor  # [F]
    p_restored: torch.Tensor  # [F, L, T]

    @property
    def effect(self) -> torch.Tensor:
        """The indirect effects IE = P_restored − P_corrupted [F, L, T] (nan where not traced)."""
        return self.p_restored - self.p_corrupt[:, None, None]

    def by_category(self) -> pd.DataFrame:
        """The average indirect effect, rows ``CATEGORIES`` (paper, fig. 2), columns the layers.

        "first token after" is the token right after the subject when it is not the last token; "further
        tokens" are averaged within each prompt first. Categories a prompt lacks are left out of its mean.
        """
        table = np.full((len(self.tokens), len(CATEGORIES), len(self.layers)), np.nan)
        effect = self.effect.numpy()
        for f, (toks, (start, end)) in enumerate(zip(self.tokens, self.spans)):
            last = len(toks) - 1
            groups = {0: [start], 1: [end - 1], 2: [end] if end < last else [],
                      3: list(range(end + 1, last)), 4: [last]}
            for c, positions in groups.items():
                values = effect[f][:, positions]  # [L, n]
                if positions and not np.isnan(values).all():
                    table[f, c] = np.nanmean(values, axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a category no prompt has: nan, said as such
            mean = np.nanmean(table, axis=0)
        return pd.DataFrame(mean, index=list(CATEGORIES), columns=self.layers)


def subject_noise(noise: float, samples: int, n_tokens: int, dim: int, seed: int = 0, index: int = 0) -> torch.Tensor:
    """The noise ``trace`` adds to prompt ``index``'s subject embeddings: [samples, n_tokens, dim], N(0, noise²),
    drawn from a generator seeded by (``seed``, ``index``) alone, so a prompt gets the same draws in any batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return noise * torch.randn(samples, n_tokens, dim, generator=gen)


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a row at ``layer``: ROME's [l − w//2, l + ⌈w/2⌉) clipped to the model."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _positions(tokens: str, start: int, length: int, end: int) -> list[int]:
    return list(range(start, length)) if tokens == "all" else sorted({end - 1, length - 1})


@torch.no_grad()
def trace(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], subjects: Sequence[str],
          answers: Sequence[str], *, noise: float, site: str = "hidden", window: int = 1,
          layers: Sequence[int] | None = None, tokens: str = "all", samples: int = 5, seed: int = 0,
          chunk: int = 8) -> Trace:
    """Causal tracing of each prompt (Meng et al. 2022, sec. 2): P(answer) clean, corrupted, and corrupted with
    each (layer, token) activation of ``site`` restored.

    ``noise``: the noise's standard deviation (the paper: 3 × ``embedding_std``); 0 corrupts nothing.
    ``site``: 'hidden' (block outputs), 'mlp' or 'attn' outputs, restored in a window of ``window`` layers.
    ``layers``: the layers to restore at (default every one). ``tokens``: 'all' (every token from the subject
    on) or 'key' (the last subject token and the last token). ``samples`` noise draws per prompt, the same
    draws for every restoration of a prompt (and for every site: the same ``seed`` gives the same corrupted
    runs); probabilities are averaged over them. ``chunk`` prompts go through the model together.
    """
    prompts, subjects, answers = list(prompts), list(subjects), list(answers)
    if not prompts or not len(prompts) == len(subjects) == len(answers):
        raise ValueError(f"prompts, subjects and answers must be non-empty and equally long, got "
                         f"{len(prompts)}, {len(subjects)} and {len(answers)}")
    noise = _validate.non_negative("noise", noise)
    _validate.one_of("site", site, tuple(SITES))
    _validate.positive_int("window", window)
    _validate.one_of("tokens", tokens, TOKEN_SETS)
    _validate.positive_int("samples", samples)
    _validate.positive_int("chunk", chunk)
    layers = check_layers(model, layers)
    n_layers = layout(model).n_layers
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    spans = [subject_span(tokenizer, p, s) for p, s in zip(prompts, subjects)]
    targets = torch.tensor([answer_token(tokenizer, a) for a in answers])  # [F]
    ids = encode(tokenizer, prompts).to(device)  # [F, T]
    lengths = (ids != pad).sum(1).tolist()
    p_clean, p_corrupt = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    p_restored = torch.full((len(prompts), len(layers), ids.shape[1]), float("nan"))
    try:
        for s in range(0, len(prompts), chunk):
            part = list(range(s, min(s + chunk, len(prompts))))
            _trace_chunk(model, ids[part], [spans[f] for f in part], [lengths[f] for f in part], targets[part],
                         part, noise, site, window, layers, n_layers, tokens, samples, seed, pad,
                         p_clean, p_corrupt, p_restored)
    finally:
        model.train(was_training)
    decoded = [[tokenizer.decode([t]) for t in row[:n].tolist()] for row, n in zip(ids, lengths)]
    return Trace(site, window, noise, layers, decoded, spans, p_clean, p_corrupt, p_restored)


def _trace_chunk(model, ids, spans, lengths, targets, rows_of, noise, site, window, layers, n_layers, tokens,
                 samples, seed, pad, p_clean, p_corrupt, p_restored) -> None:
    """Fill the outputs for one chunk of prompts: one clean pass with a cache, one pass for every restoration."""
    names = [hook_name(site, layer) for layer in range(n_layers)]
    clean_logits, clean = run_with_cache(model, ids, names, pad)  # [C, V], {name: [C, T, d]}
    # one row per (prompt, restored layer or none, token or none), each repeated for the noise samples
    plan = []  # (prompt c, layer index j or -1, token i or -1)
    for c, ((start, end), n) in enumerate(zip(spans, lengths)):
        plan.append((c, -1, -1))
        plan += [(c, j, i) for j in range(len(layers)) for i in _positions(tokens, start, n, end)]
    plan_t = torch.tensor(plan).repeat_interleave(samples, 0)  # [R, 3]
    sample = torch.arange(samples).repeat(len(plan))  # [R]
    prompt_of, layer_of, token_of = plan_t.unbind(1)
    d = module_of(model, EMBED).weight.shape[1]
    draws = torch.zeros(len(spans), samples, ids.shape[1], d)  # [C, S, T, d] noise on the subject tokens only
    for c, (start, end) in enumerate(spans):
        draws[c, :, start:end] = subject_noise(noise, samples, end - start, d, seed, rows_of[c])
    device = ids.device
    row_noise = draws[prompt_of, sample].to(device)  # [R, T, d]
    patches: dict[str, Patch] = {EMBED: lambda x: x + row_noise.to(x.dtype)}
    for layer in range(n_layers):
        # rows whose restored window covers this layer
        covers = torch.tensor([layer in _window(layers[j], window, n_layers) if j >= 0 else False
                               for j in layer_of.tolist()])
        if covers.any():
            rows = covers.nonzero()[:, 0].to(device)
            positions = token_of[covers].to(device)
            values = clean[names[layer]][prompt_of[covers].to(device), positions]  # [K, d]
            patches[names[layer]] = _restore(rows, positions, values)
    with hooked(model, patches):
        logits = last_logits(model, ids[prompt_of.to(device)], pad)  # [R, V]
    probs = torch.softmax(logits, -1)[torch.arange(len(logits)), targets[prompt_of].to(device)].cpu()  # [R]
    probs = probs.view(len(plan), samples).mean(1)  # [P] averaged over the noise samples
    clean_p = torch.softmax(clean_logits, -1)[torch.arange(len(ids)), targets.to(device)].cpu()
    for (c, j, i), p in zip(plan, probs.tolist()):
        f = rows_of[c]
        if j < 0:
            p_corrupt[f] = p
            p_clean[f] = clean_p[c]
        else:
            p_restored[f, j, i] = p
    if tokens == "all":  # before the subject: nothing to restore
        for c, (start, _) in enumerate(spans):
            p_restored[rows_of[c], :, :start] = p_corrupt[rows_of[c]]


def _restore(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> Patch:
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, positions] = values.to(x.dtype)
        return x
    return fn
