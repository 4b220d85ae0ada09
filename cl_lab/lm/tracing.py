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
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first token after",
              "further tokens", "last token")
NULL = "random non-subject token"  # a null control: the same restoration at a token the caller draws
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

    def categories(self, null_positions: Sequence[int | None] | None = None) -> np.ndarray:
        """Each prompt's indirect effect by token category [F, K, L]: rows ``CATEGORIES`` (the paper's fig. 2),
        then ``NULL`` (the effect at prompt f's token ``null_positions[f]``, None for none) when ``null_positions``
        is given; nan where the prompt lacks the category or its tokens were not traced.

        A category with several tokens (the middle subject tokens, the further tokens) is the mean of its traced
        tokens' single-token effects. "first token after" is the token right after the subject when it is not
        the last token.
        """
        with_null = null_positions is not None
        if with_null and len(null_positions) != len(self.tokens):
            raise ValueError(f"null_positions must hold one position per prompt ({len(self.tokens)}), got "
                             f"{len(null_positions)}")
        table = np.full((len(self.tokens), len(CATEGORIES) + with_null, len(self.layers)), np.nan)
        effect = self.effect.numpy()
        for f, (toks, (start, end)) in enumerate(zip(self.tokens, self.spans)):
            last = len(toks) - 1
            null = [null_positions[f]] if with_null and null_positions[f] is not None else []
            groups = [[start], list(range(start + 1, end - 1)), [end - 1], [end] if end < last else [],
                      list(range(end + 1, last)), [last]] + ([null] if with_null else [])
            for c, positions in enumerate(groups):
                values = effect[f][:, positions]  # [L, n]
                if positions and not np.isnan(values).all():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # a layer with no traced token: nan
                        table[f, c] = np.nanmean(values, axis=1)
        return table

    def by_category(self, null_positions: Sequence[int | None] | None = None) -> pd.DataFrame:
        """The average indirect effect over prompts, rows the categories of ``categories`` that some prompt has,
        columns the layers. Categories a prompt lacks are left out of its mean."""
        table = self.categories(null_positions)
        names = list(CATEGORIES) + ([NULL] if null_positions is not None else [])
        present = ~np.isnan(table).all(axis=(0, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a prompt lacking a category is left out
            mean = np.nanmean(table[:, present], axis=0)
        return pd.DataFrame(mean, index=[n for n, keep in zip(names, present) if keep], columns=self.layers)


def subject_noise(noise: float, samples: int, n_tokens: int, dim: int, seed: int = 0, index: int = 0) -> torch.Tensor:
    """The noise ``trace`` adds to prompt ``index``'s subject embeddings: [samples, n_tokens, dim], N(0, noise²),
    drawn from a generator seeded by (``seed``, ``index``) alone, so a prompt gets the same draws in any batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return noise * torch.randn(samples, n_tokens, dim, generator=gen)


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a row at ``layer``: ROME's [l − w//2, l + ⌈w/2⌉) clipped to the model."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _positions(tokens: str | list[int], start: int, length: int, end: int) -> list[int]:
    if tokens == "all":
        return list(range(start, length))
    return sorted({end - 1, length - 1}) if tokens == "key" else sorted(set(tokens))


def _check_tokens(tokens, spans: list[tuple[int, int]], lengths: list[int]) -> list:
    """``tokens`` as one entry per prompt: 'all', 'key', or that prompt's list of positions to restore."""
    if isinstance(tokens, str):
        _validate.one_of("tokens", tokens, TOKEN_SETS)
        return [tokens] * len(spans)
    tokens = [list(t) for t in tokens]
    bad = [f for f, (t, (start, _), n) in enumerate(zip(tokens, spans, lengths))
           if not t or any(isinstance(i, bool) or not isinstance(i, int) or not start <= i < n for i in t)]
    if len(tokens) != len(spans) or bad:
        raise ValueError(f"tokens must be 'all', 'key', or one non-empty list per prompt of positions from its "
                         f"subject's first token to its last token, got {tokens}")
    return tokens


def _chunks(lengths: list[int], chunk: int) -> list[list[int]]:
    """Prompts grouped by length, at most ``chunk`` to a group: a group needs no padding, and the model's head
    runs at one position."""
    by_length: dict[int, list[int]] = {}
    for f, n in enumerate(lengths):
        by_length.setdefault(n, []).append(f)
    return [group[s:s + chunk] for _, group in sorted(by_length.items()) for s in range(0, len(group), chunk)]


@torch.no_grad()
def trace(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], subjects: Sequence[str],
          answers: Sequence[str], *, noise: float, site: str = "hidden", window: int = 1,
          layers: Sequence[int] | None = None, tokens: str | Sequence[Sequence[int]] = "all", samples: int = 5,
          seed: int = 0, chunk: int = 8, noise_keys: Sequence[int] | None = None) -> Trace:
    """Causal tracing of each prompt (Meng et al. 2022, sec. 2): P(answer) clean, corrupted, and corrupted with
    each (layer, token) activation of ``site`` restored.

    ``noise``: the noise's standard deviation (the paper: 3 × ``embedding_std``); 0 corrupts nothing.
    ``site``: 'hidden' (block outputs), 'mlp' or 'attn' outputs, restored in a window of ``window`` layers.
    ``layers``: the layers to restore at (default every one). ``tokens``: 'all' (every token from the subject
    on), 'key' (the last subject token and the last token), or one list of positions per prompt. ``samples``
    noise draws per prompt, the same draws for every restoration of a prompt (and for every site: the same
    ``seed`` gives the same corrupted runs); probabilities are averaged over them. ``chunk``: at most this many
    prompts of the same length go through the model together. ``noise_keys``: the integer that seeds each
    prompt's noise with ``seed`` (default: its position), so that a prompt traced within another list gets the
    same draws.
    """
    prompts, subjects, answers = list(prompts), list(subjects), list(answers)
    if not prompts or not len(prompts) == len(subjects) == len(answers):
        raise ValueError(f"prompts, subjects and answers must be non-empty and equally long, got "
                         f"{len(prompts)}, {len(subjects)} and {len(answers)}")
    noise = _validate.non_negative("noise", noise)
    _validate.one_of("site", site, tuple(SITES))
    _validate.positive_int("window", window)
    _validate.positive_int("samples", samples)
    _validate.positive_int("chunk", chunk)
    layers = check_layers(model, layers)
    keys = list(range(len(prompts))) if noise_keys is None else [int(k) for k in noise_keys]
    if len(keys) != len(prompts):
        raise ValueError(f"noise_keys must hold one integer per prompt ({len(prompts)}), got {len(keys)}")
    n_layers = layout(model).n_layers
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    spans = [subject_span(tokenizer, p, s) for p, s in zip(prompts, subjects)]
    targets = torch.tensor([answer_token(tokenizer, a) for a in answers])  # [F]
    ids = encode(tokenizer, prompts).to(device)  # [F, T]
    lengths = (ids != pad).sum(1).tolist()
    tokens = _check_tokens(tokens, spans, lengths)
    p_clean, p_corrupt = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    p_restored = torch.full((len(prompts), len(layers), ids.shape[1]), float("nan"))
    try:
        for part in _chunks(lengths, chunk):
            _trace_chunk(model, ids[part, :lengths[part[0]]], [spans[f] for f in part], [tokens[f] for f in part],
                         targets[part], [keys[f] for f in part], part, noise, site, window, layers, n_layers,
                         samples, seed, pad, p_clean, p_corrupt, p_restored)
    finally:
        model.train(was_training)
    decoded = [[tokenizer.decode([t]) for t in row[:n].tolist()] for row, n in zip(ids, lengths)]
    return Trace(site, window, noise, layers, decoded, spans, p_clean, p_corrupt, p_restored)


def _trace_chunk(model, ids, spans, tokens, targets, keys, rows_of, noise, site, window, layers, n_layers, samples,
                 seed, pad, p_clean, p_corrupt, p_restored) -> None:
    """Fill the outputs for one chunk of prompts of one length (``ids`` [C, T], no padding): a clean pass with a
    cache, a corrupted pass that keeps every block's input, then one pass per first restored layer s that runs
    only blocks s, s+1, … from the corrupted input of block s (the blocks below s compute the corrupted run)."""
    names = [hook_name(site, layer) for layer in range(n_layers)]
    clean_logits, clean = run_with_cache(model, ids, names, pad)  # [C, V], {name: [C, T, d]}
    device, length = ids.device, ids.shape[1]
    d = module_of(model, EMBED).weight.shape[1]
    draws = torch.zeros(len(spans), samples, length, d)  # [C, S, T, d] noise on the subject tokens only
    for c, (start, end) in enumerate(spans):
        draws[c, :, start:end] = subject_noise(noise, samples, end - start, d, seed, keys[c])
    noisy = ids.repeat_interleave(samples, 0)  # [C·S, T], row c·S + s: prompt c, noise draw s
    corrupt_logits, inputs = _corrupted_run(model, noisy, draws.view(-1, length, d).to(device), pad)
    probability = _target_probability(targets.to(device))
    corrupt = probability(corrupt_logits, torch.arange(len(spans)).repeat_interleave(samples)).view(-1, samples)
    clean_p = probability(clean_logits, torch.arange(len(spans))).cpu()
    for c, f in enumerate(rows_of):
        p_clean[f], p_corrupt[f] = clean_p[c], corrupt[c].mean().item()
    # the restorations (prompt c, layer index j, token i), grouped by the first layer their window restores
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for c, ((start, end), restore) in enumerate(zip(spans, tokens)):
        for j in range(len(layers)):
            first = _window(layers[j], window, n_layers)[0]
            groups.setdefault(first, []).extend((c, j, i) for i in _positions(restore, start, length, end))
    for first, plan in groups.items():
        plan_t = torch.tensor(plan).repeat_interleave(samples, 0)  # [R, 3]
        prompt_of, layer_of, token_of = plan_t.unbind(1)
        source = prompt_of * samples + torch.arange(samples).repeat(len(plan))  # [R] the corrupted row it starts from
        patches: dict[str, Patch] = {}
        for layer in range(first, n_layers):
            covers = torch.tensor([layer in _window(layers[j], window, n_layers) for j in layer_of.tolist()])
            if covers.any():
                rows = covers.nonzero()[:, 0].to(device)
                positions = token_of[covers].to(device)
                values = clean[names[layer]][prompt_of[covers].to(device), positions]  # [K, d]
                patches[names[layer]] = _restore(rows, positions, values)
        with hooked(model, patches), _blocks_from(model, first, inputs[first][source.to(device)]):
            logits = last_logits(model, ids[prompt_of.to(device)], pad)  # [R, V]
        probs = probability(logits, prompt_of).view(len(plan), samples).mean(1).tolist()  # [P] over the draws
        for (c, j, i), p in zip(plan, probs):
            p_restored[rows_of[c], j, i] = p
    for c, ((start, _), restore) in enumerate(zip(spans, tokens)):
        if restore == "all":  # before the subject: nothing to restore
            p_restored[rows_of[c], :, :start] = p_corrupt[rows_of[c]]


def _target_probability(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(logits [R, V], prompt of each row [R]) → P(that prompt's target) [R], on the CPU."""
    def fn(logits: torch.Tensor, prompt_of: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(logits), device=logits.device)
        return torch.softmax(logits, -1)[rows, targets[prompt_of.to(logits.device)]].cpu()
    return fn


def _corrupted_run(model: nn.Module, ids: torch.Tensor, noise: torch.Tensor,
                   pad: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Last-token logits [R, V] of ``ids`` with ``noise`` [R, T, d] added to the embeddings, and every block's
    input hidden states ([R, T, d] per block)."""
    lay = layout(model)
    inputs: list[torch.Tensor] = []
    handles = [lay.block(b).register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
               for b in range(lay.n_layers)]
    try:
        with hooked(model, {EMBED: lambda x: x + noise.to(x.dtype)}):
            logits = last_logits(model, ids, pad)
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs


@contextlib.contextmanager
def _blocks_from(model: nn.Module, first: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass runs only blocks ``first``, ``first`` + 1, …, and block ``first`` reads
    ``hidden`` [B, T, d] instead of what the embeddings give it: the blocks below are skipped. The model's own
    block list comes back on exit. Hooks must be registered before entering (the block indices shift)."""
    lay = layout(model)
    parent_path, _, attr = lay.blocks.rpartition(".")
    parent = lay.model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    handle = blocks[first].register_forward_pre_hook(lambda mod, args: (hidden.to(args[0].dtype),) + args[1:])
    setattr(parent, attr, nn.ModuleList(list(blocks)[first:]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        handle.remove()


def _restore(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> Patch:
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, positions] = values.to(x.dtype)
        return x
    return fn
