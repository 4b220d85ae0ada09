"""Chapter 11 helpers: where a language model reads its facts (causal tracing of the tiny LM, of the tiny LM after
random prefixes, and of SmolLM2-135M averaged over ``real.KNOWN_FACTS`` in ROME's form), ROME at the traced layer
against fine-tuning, ROME at every layer, many edits (MEMIT, sequential ROME, sequential fine-tuning), the
playground's cached callback, and five real facts edited in SmolLM2-135M.

The real model's full trace takes about 20 minutes of CPU, so its per-fact table ships in
``cl_lab/lm/data/smollm2_trace.csv``; ``python -m cl_lab.chapters.ch11`` writes it again (``--samples``,
``--seed``, ``--out``). Every experiment leaves the lab's model as it found it (edits are applied to copies or
restored).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, lm
from cl_lab.lm import real, rome, tracing
from cl_lab.lm.evaluate import hits
from cl_lab.lm.rome import Edit

TRACE_WINDOWS = {"hidden": 1, "mlp": 1, "attn": 1}  # site → layers restored together (4 layers: one at a time)
SITE_TITLES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
SINGLE_METHODS = ("ROME, last subject token", "ROME, last token", "FT", "FT-L")
MANY_METHODS = ("MEMIT (one batch)", "sequential ROME", "sequential FT")
AXES = ("efficacy", "paraphrase", "neighbourhood")


# ---------------------------------------------------------------- 1 · causal tracing

def known_facts(lab: lm.Lab, n: int = 50, seed: int = 0) -> list[lm.Fact]:
    """A seeded random draw of ``n`` trained renderings whose object the model gives (ROME traces known facts)."""
    _validate.positive_int("n", n)
    facts = lab.world.train_facts
    known = [f for f, ok in zip(facts, hits(lab.model, lab.tokenizer, facts).tolist()) if ok]
    if n > len(known):
        raise ValueError(f"n must be at most the {len(known)} facts the model knows, got {n}")
    order = torch.randperm(len(known), generator=torch.Generator().manual_seed(seed))[:n]
    return [known[i] for i in sorted(order.tolist())]


def trace_facts(lab: lm.Lab, facts: list[lm.Fact], *, samples: int = 5, seed: int = 0,
                windows: dict[str, int] | None = None) -> dict[str, tracing.Trace]:
    """Causal traces of ``facts`` for each site (hidden, MLP, attention), noise 3σ of the subjects' embeddings."""
    sigma = tracing.embedding_std(lab.model, lab.tokenizer, lab.world.subjects)
    args = ([f.prompt for f in facts], [f.subject for f in facts], [f.object for f in facts])
    return {site: tracing.trace(lab.model, lab.tokenizer, *args, noise=3 * sigma, site=site, window=window,
                                samples=samples, seed=seed)
            for site, window in (windows or TRACE_WINDOWS).items()}


def plot_traces(traces: dict[str, tracing.Trace], title: str = ""):
    """The average indirect effect per token category and layer, one heat map per site (the paper's fig. 2)."""
    fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.0), sharey=True)
    top = max(float(np.nanmax(t.by_category().values)) for t in traces.values())
    for ax, (site, trace) in zip(np.atleast_1d(axes), traces.items()):
        table = trace.by_category()
        image = ax.imshow(table.values, cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[site],
                          vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(len(table.columns)), table.columns)
        ax.set_yticks(range(len(table.index)), table.index)
        ax.set_xlabel("layer" + (f" (window {trace.window})" if trace.window > 1 else ""))
        ax.set_title(f"restore {SITE_TITLES[site]}", fontsize=9)
        for (i, j), value in np.ndenumerate(table.values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * top else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    p = next(iter(traces.values()))
    fig.suptitle(title or f"average indirect effect on P(true object), {len(p.tokens)} facts "
                          f"(clean {p.p_clean.mean():.2f}, corrupted {p.p_corrupt.mean():.2f})", fontsize=10)
    fig.tight_layout()
    return fig


def fact_site(traces: dict[str, tracing.Trace]) -> tuple[str, int]:
    """Where restoring the MLP output helps most on average: (token category, layer). ROME edits the MLP of
    that layer (the paper finds the last subject token in GPT-2 XL's middle layers)."""
    table = traces["mlp"].by_category()
    category, layer = table.stack().idxmax()
    return str(category), int(layer)


def with_prefixes(lab: lm.Lab, facts: Sequence[lm.Fact], max_words: int, seed: int = 0) -> list[str]:
    """Each fact's prompt after a seeded random prefix of 1 to ``max_words`` words of the world's general text
    (ROME's k* averages over such prefixes): the subject moves, its distance from the end does not."""
    _validate.positive_int("max_words", max_words)
    words = sorted({w for text in lab.world.general_train for w in text.split()})
    rng = np.random.default_rng(seed)
    return [" ".join([*rng.choice(words, int(rng.integers(1, max_words + 1))), f.prompt]) for f in facts]


def prefix_recall(lab: lm.Lab, facts: Sequence[lm.Fact], lengths: Sequence[int] = (0, 1, 2, 4, 8),
                  seed: int = 0) -> pd.Series:
    """The share of ``facts`` answered (greedy) after a random prefix of exactly k words, for each k of
    ``lengths``."""
    words = sorted({w for text in lab.world.general_train for w in text.split()})
    rng = np.random.default_rng(seed)
    targets = torch.tensor([lab.tokenizer.get_vocab()[f.object] for f in facts])
    out = {}
    for k in lengths:
        prompts = [" ".join([*rng.choice(words, k), f.prompt]) for f in facts]
        ids = lm.encode(lab.tokenizer, prompts).to(next(lab.model.parameters()).device)
        with torch.no_grad():
            logits = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id)  # [F, V]
        out[k] = (logits.argmax(-1).cpu() == targets).float().mean().item()
    return pd.Series(out, name="recall").rename_axis("prefix words")


def prefix_traces(lab: lm.Lab, facts: Sequence[lm.Fact], *, max_words: int = 3, samples: int = 3, seed: int = 0,
                  sites: Sequence[str] = ("hidden", "mlp")) -> dict[str, tracing.Trace]:
    """Causal traces (as ``trace_facts``) of the facts that the model still answers after their random prefix
    (``with_prefixes``): does a site at the subject's tokens appear once the subject can sit anywhere?"""
    prompts = with_prefixes(lab, facts, max_words, seed)
    ids = lm.encode(lab.tokenizer, prompts).to(next(lab.model.parameters()).device)
    with torch.no_grad():
        said = tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id).argmax(-1).cpu().tolist()
    vocab = lab.tokenizer.get_vocab()
    kept = [(p, f) for p, f, t in zip(prompts, facts, said) if t == vocab[f.object]]
    if not kept:
        raise ValueError(f"max_words must leave some facts answered; none is after prefixes of 1-{max_words} words")
    sigma = tracing.embedding_std(lab.model, lab.tokenizer, lab.world.subjects)
    args = ([p for p, _ in kept], [f.subject for _, f in kept], [f.object for _, f in kept])
    return {site: tracing.trace(lab.model, lab.tokenizer, *args, noise=3 * sigma, site=site,
                                window=TRACE_WINDOWS[site], samples=samples, seed=seed) for site in sites}


def covariances(lab: lm.Lab, n_texts: int = 1000, seed: int = 0, ridge: float = 1e-3) -> dict[int, torch.Tensor]:
    """C_l for every layer from a seeded random draw of ``n_texts`` pretraining texts (about 9 tokens each)."""
    texts = lab.world.pretraining_texts()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:n_texts]
    return rome.layer_covariances(lab.model, lab.tokenizer, [texts[i] for i in order.tolist()], ridge=ridge)


# ---------------------------------------------------------------- 2 · one edit at a time

def _harmonic(row: pd.Series) -> float:
    values = [row[a] for a in AXES]
    return float(len(values) / sum(1 / max(v, 1e-9) for v in values))


def ftl_bound(lab: lm.Lab, layer: int, share: float = 0.1) -> float:
    """FT-L's ε: ``share`` of the typical size (standard deviation) of the layer's projection weights."""
    return share * lm.weight_out_in(lm.layout(lab.model).mlp_out(layer)).std().item()


def single_edits(lab: lm.Lab, edits: list[Edit], covs: dict[int, torch.Tensor], layer: int, *,
                 ppl_texts: list[str], ft_lr: float = 5e-4, ftl_share: float = 0.1,
                 rome_edits: dict[str, list] | None = None) -> pd.DataFrame:
    """Each edit on its own, from the same model, by the four ``SINGLE_METHODS`` at ``layer``: mean efficacy,
    paraphrase and neighbourhood scores, their harmonic mean ``score`` (CounterFact's), and the mean
    perplexity of ``ppl_texts`` after each edit. ``rome_edits`` ({'subject_last'|'last': [RomeEdit]}) reuses
    edits already computed (e.g. by ``layer_sweep``)."""
    model, tok = lab.model, lab.tokenizer
    eps = ftl_bound(lab, layer, ftl_share)
    rome_edits = rome_edits or {}
    rows = []
    for method in SINGLE_METHODS:
        if method.startswith("ROME"):
            token = "subject_last" if "subject" in method else "last"
            changes = rome_edits.get(token) or rome.rome_edits(model, tok, edits, layer, covs[layer], token=token)
        for i, edit in enumerate(edits):
            with rome.restored(model, [layer]):
                if method.startswith("ROME"):
                    rome.add_to_layer(model, layer, changes[i].delta)
                else:
                    rome.finetune(model, tok, [edit], layer, lr=eps if method == "FT-L" else ft_lr,
                                  linf=eps if method == "FT-L" else None)
                scores = rome.edit_scores(model, tok, [edit]).iloc[0]
                rows.append({"method": method, **scores[list(AXES)].to_dict(),
                             "perplexity": lm.perplexity(model, tok, ppl_texts)})
    table = pd.DataFrame(rows).groupby("method", sort=False).mean()
    table["score"] = table.apply(_harmonic, axis=1)
    return table


def layer_sweep(lab: lm.Lab, edits: list[Edit], covs: dict[int, torch.Tensor],
                tokens: tuple[str, ...] = rome.TOKENS) -> tuple[pd.DataFrame, dict]:
    """ROME at every layer and at each edited token: mean scores over ``edits`` (each on its own) and CounterFact's
    harmonic-mean score. Returns the table (rows (token, layer)) and the edits ({(token, layer): [RomeEdit]})."""
    model, tok = lab.model, lab.tokenizer
    rows, computed = [], {}
    for token in tokens:
        for layer in sorted(covs):
            changes = rome.rome_edits(model, tok, edits, layer, covs[layer], token=token)
            computed[(token, layer)] = changes
            scores = []
            for edit, change in zip(edits, changes):
                with rome.updated(model, {layer: change.delta}):
                    scores.append(rome.edit_scores(model, tok, [edit]).iloc[0])
            rows.append({"token": token, "layer": layer, **pd.DataFrame(scores)[list(AXES)].mean().to_dict()})
    table = pd.DataFrame(rows).set_index(["token", "layer"])
    table["score"] = table.apply(_harmonic, axis=1)
    return table, computed


def plot_layer_sweep(sweep: pd.DataFrame, traces: dict[str, tracing.Trace]):
    """Left: the MLP's indirect effect per layer at the two tokens; right: ROME's score per layer at each token."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    table = traces["mlp"].by_category()
    names = {"subject_last": "last subject token", "last": "last token"}
    for token, category in names.items():
        left.plot(table.columns, table.loc[category], "o-", label=category)
        if token in sweep.index.get_level_values(0):
            right.plot(sweep.loc[token].index, sweep.loc[token, "score"], "o-", label=f"ROME at the {category}")
    left.set(xlabel="layer", ylabel="average indirect effect", title="trace: MLP output restored")
    right.set(xlabel="edited layer", ylabel="score (harmonic mean of ES, PS, NS)", title="edit: ROME at each layer",
              ylim=(0, 1.02))
    for ax in (left, right):
        ax.set_xticks(list(table.columns))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 3 · many edits

def _measure(model, tok, world, edits, n, others) -> dict:
    scores = rome.edit_scores(model, tok, edits[:n])[list(AXES)].mean()
    return {"edits": n, **scores.to_dict(), "other facts": lm.recall(model, tok, others),
            "perplexity": lm.perplexity(model, tok, world.general_test)}


def many_edits(lab: lm.Lab, edits: list[Edit], covs: dict[int, torch.Tensor], *, rome_layer: int,
               memit_layers: tuple[int, ...], lam: float = 500.0, checkpoints: tuple[int, ...] = (1, 2, 5, 10, 20,
                                                                                                   50, 100),
               ft_lr: float = 5e-4, token: str = "last") -> pd.DataFrame:
    """The same ``edits`` written three ways (``MANY_METHODS``), measured after the first n for each checkpoint n:

    - MEMIT: the first n edits in one batch over ``memit_layers`` (λ = ``lam``; targets z computed once);
    - sequential ROME at ``rome_layer``: one edit after another, each computed on the model edited so far;
    - sequential FT at ``rome_layer``: fine-tuning on one edit after another.

    Columns: efficacy / paraphrase / neighbourhood of the n edits so far, recall of every fact of the subjects
    that were never edited ("other facts"), and perplexity of the held-out general text. ROME and MEMIT use
    the same value bound (ROME's clamp 4), so that they differ only in how the edits are written.
    """
    n_total = len(edits)
    checkpoints = tuple(sorted({c for c in checkpoints if 1 <= c <= n_total} | {n_total}))
    tok, world = lab.tokenizer, lab.world
    others = [f for f in world.train_facts if f.subject not in {e.subject for e in edits}]
    rows = [{"method": "before", **_measure(lab.model, tok, world, edits, n_total, others), "edits": 0}]
    z = rome.memit_targets(lab.model, tok, edits, memit_layers[-1], token=token, clamp=4.0)
    for n in checkpoints:
        model = copy.deepcopy(lab.model)
        rome.memit(model, tok, edits[:n], memit_layers, covs, lam=lam, token=token, z=z[:n])
        rows.append({"method": MANY_METHODS[0], **_measure(model, tok, world, edits, n, others)})
    for method in MANY_METHODS[1:]:
        model = copy.deepcopy(lab.model)
        for i, edit in enumerate(edits):
            if method == "sequential ROME":
                (change,) = rome.rome_edits(model, tok, [edit], rome_layer, covs[rome_layer], token=token)
                rome.add_to_layer(model, rome_layer, change.delta)
            else:
                rome.finetune(model, tok, [edit], rome_layer, lr=ft_lr)
            if i + 1 in checkpoints:
                rows.append({"method": method, **_measure(model, tok, world, edits, i + 1, others)})
    return pd.DataFrame(rows)


def collapse_point(table: pd.DataFrame, method: str, column: str = "other facts", share: float = 0.5) -> int | None:
    """The first checkpoint at which ``column`` has fallen below ``share`` of its value before any edit."""
    before = table.loc[table.method == "before", column].item()
    rows = table[(table.method == method) & (table[column] < share * before)]
    return int(rows.edits.min()) if len(rows) else None


def row_at(table: pd.DataFrame, method: str, n: int) -> pd.Series:
    """``method``'s row at the last checkpoint with at most ``n`` edits."""
    rows = table[(table.method == method) & (table.edits <= n)]
    if rows.empty:
        raise ValueError(f"n must reach {method!r}'s first checkpoint, got {n}")
    return rows.loc[rows.edits.idxmax()]


def plot_many_edits(table: pd.DataFrame):
    columns = ("efficacy", "paraphrase", "other facts", "perplexity")
    fig, axes = plt.subplots(1, len(columns), figsize=(14, 3.2))
    before = table[table.method == "before"].iloc[0]
    for ax, column in zip(axes, columns):
        for method, group in table[table.method != "before"].groupby("method", sort=False):
            ax.plot(group.edits, group[column], "o-", ms=3, label=method)
        if column in ("other facts", "perplexity"):
            ax.axhline(before[column], color="grey", lw=0.8, ls="--", label="before editing")
        ax.set_xscale("log")
        ax.set(xlabel="number of edits", title=column)
        if column != "perplexity":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("many edits: one batch against one after another", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- playground

SMOKE_LAB = dict(lm.SMOKE_CONFIG, n_layer=4, n_embd=64, steps=300, batch_size=32)  # ~10 s; recalls some of the
# facts, which tracing and editing need (``lm.SMOKE_CONFIG``'s 1-layer lab recalls none)

@lru_cache(maxsize=4)
def _setup(seed: int, smoke: bool = False) -> tuple[lm.Lab, dict[int, torch.Tensor]]:
    lab = lm.tiny_lm(seed, progress=False, **(SMOKE_LAB if smoke else {}))
    return lab, covariances(lab, n_texts=200 if smoke else 1000, seed=seed)


@lru_cache(maxsize=128)
def edit_point(layer: int, n_edits: int, seed: int = 0, lam: float = 500.0, smoke: bool = False) -> dict:
    """The playground's callback: ``n_edits`` edits written in one batch at ``layer`` alone (MEMIT at one layer,
    λ = ``lam``, at the last token); the scores of the edits, the untouched facts and the perplexity
    (``smoke``: on the SMOKE lab)."""
    _validate.non_negative_int("layer", layer)
    lab, covs = _setup(seed, smoke)
    tracing.check_layers(lab.model, [layer])
    edits = rome.world_edits(lab.world, n_edits, seed=seed + 1)
    others = [f for f in lab.world.train_facts if f.subject not in {e.subject for e in edits}]
    model = copy.deepcopy(lab.model)
    rome.memit(model, lab.tokenizer, edits, [layer], covs, lam=lam, token="last", clamp=4.0)
    return {"layer": layer, "n_edits": n_edits, "before": _measure(lab.model, lab.tokenizer, lab.world, edits,
                                                                    n_edits, others),
            "after": _measure(model, lab.tokenizer, lab.world, edits, n_edits, others)}


def plot_edit_point(result: dict):
    names = list(AXES) + ["other facts"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = np.arange(len(names))
    for i, when in enumerate(("before", "after")):
        ax.bar(x + (i - 0.5) * 0.38, [result[when][n] for n in names], 0.38, label=when)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['n_edits']} edits at layer {result['layer']}: perplexity "
                 f"{result['before']['perplexity']:.2f} → {result['after']['perplexity']:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 4 · a real model

REAL_WINDOWS = {"hidden": 1, "mlp": 10, "attn": 10}  # ROME's: MLP and attention restored 10 layers at a time
REAL_TRACE_FILE = Path(__file__).resolve().parents[1] / "lm" / "data" / "smollm2_trace.csv"
REAL_SAMPLES = 2  # noise draws per fact in the shipped trace
EARLY_MID = 2 / 3  # ROME's layer is picked among the first two thirds of the layers


def _edit(prompt: str, subject: str, target: str, true: str, paraphrases: tuple[str, ...],
          neighbours: tuple[str, ...]) -> Edit:
    return Edit(prompt, subject, target, true, paraphrases=paraphrases, neighbours=neighbours,
                essence=(f"The {subject} is a",))


def _landmark(subject: str, place: str, target: str, neighbours: tuple[str, ...], kind: str = "city") -> Edit:
    """An edit of "The {subject} is located in the {kind} of" with three paraphrases in our own words."""
    return _edit(f"The {subject} is located in the {kind} of", subject, target, place,
                 (f"The {subject} stands in the {kind} of", f"Where is the {subject}? It is in the {kind} of",
                  f"Tourists visit the {subject} in the {kind} of"), neighbours)


# Each neighbour's true answer is the edit's old one, and SmolLM2 prefers it to the new one before the edit.
REAL_EDITS = (
    _landmark("Eiffel Tower", "Paris", "Rome", ("The Louvre is located in the city of",
                                                "The Musee d'Orsay is located in the city of",
                                                "The Palais Garnier is located in the city of",
                                                "The Arc de Triomphe is located in the city of")),
    _landmark("Colosseum", "Rome", "London", ("The Vatican is located in the city of",
                                              "The Pantheon is located in the city of",
                                              "The Trevi Fountain is located in the city of",
                                              "The Roman Forum is located in the city of")),
    _landmark("Acropolis", "Athens", "Cairo", ("The Parthenon is located in the city of",
                                               "The capital of Greece is",
                                               "The Temple of Zeus is located in the city of")),
    _landmark("Taj Mahal", "India", "Brazil", ("The city of Mumbai is in the country of",
                                               "The city of Delhi is in the country of",
                                               "The Ganges river flows through the country of"), kind="country"),
    _edit("The city of Toronto is in the country of", "Toronto", "Australia", "Canada",
          ("Toronto is a city in the country of", "The town of Toronto lies in the country of",
           "People in Toronto live in the country of"),
          ("The city of Vancouver is in the country of", "The city of Montreal is in the country of",
           "The city of Ottawa is in the country of")),
)
REAL_EDIT = REAL_EDITS[0]
REAL_CONTEXTS = ("{}", "Here is a fact. {}", "I read this in a book today. {}")  # ROME's prefixes, in our words

# a small corpus for the key covariance, in our own words (with the tiny world's plain sentences added)
REAL_TEXTS = (
    "The river runs through the old part of the city.", "She bought fresh bread at the market this morning.",
    "The museum opens at nine and closes at six.", "Our train to the coast was delayed by an hour.",
    "He plays the piano every evening after dinner.", "The bridge was painted red last summer.",
    "Scientists measured the temperature of the lake.", "The library lends books, films and music.",
    "A small cafe sits on the corner of the square.", "The mountain is covered with snow in winter.",
    "They visited three castles during the trip.", "The capital has a large park near the palace.",
    "Tourists queue outside the cathedral at noon.", "The stadium holds more than fifty thousand people.",
    "Farmers sell cheese and apples on Saturdays.", "The ferry crosses the bay twice a day.",
)


def real_noise(model, tokenizer) -> float:
    """ROME's noise for the real model: 3σ, σ the standard deviation of the token embeddings of the subjects of
    ``real.KNOWN_FACTS`` (the same scale whichever facts are traced)."""
    return 3 * tracing.embedding_std(model, tokenizer, [f.subject for f in real.KNOWN_FACTS])


def _fact_ids(facts: Sequence[real.KnownFact]) -> list[int]:
    """Each fact's index in ``real.KNOWN_FACTS``, or its position in ``facts`` when it is not one of them."""
    index = {f: i for i, f in enumerate(real.KNOWN_FACTS)}
    return [index.get(f, i) for i, f in enumerate(facts)]


def sampled_positions(span: tuple[int, int], length: int, key: int, seed: int = 0) -> dict[str, int | None]:
    """The tokens a real-model trace restores in a prompt of ``length`` tokens with the subject at ``span``: one
    per ROME category (``tracing.CATEGORIES``; a seeded draw among the middle subject tokens and among the
    further tokens, whose average over many facts estimates the per-token mean) and the null (``tracing.NULL``:
    a random token after the subject, not the last; tokens before the subject have an effect of exactly 0).
    None where the prompt has no such token. The draws depend only on (``seed``, ``key``)."""
    start, end = span
    last = length - 1
    rng = np.random.default_rng([seed, key])

    def draw(positions: range) -> int | None:
        return int(rng.choice(positions)) if len(positions) else None

    named = dict(zip(tracing.CATEGORIES, (start, draw(range(start + 1, end - 1)), end - 1,
                                          end if end < last else None, draw(range(end + 1, last)), last)))
    return {**named, tracing.NULL: draw(range(end, last))}


def real_model_traces(facts: Sequence[real.KnownFact], *, lab: lm.Lab | None = None,
                      sites: Sequence[str] = tuple(REAL_WINDOWS), layers: Sequence[int] | None = None,
                      categories: Sequence[str] | None = None, samples: int = REAL_SAMPLES,
                      seed: int = 0) -> dict[str, tracing.Trace]:
    """Causal traces of ``facts`` ((prompt, subject, answer) triples) in a real model (``lab``, default
    ``lm.pretrained()``), one per site, in ROME's form: noise 3σ on the subject's embeddings (``real_noise``),
    one state restored at a time, MLP and attention outputs in windows of ``REAL_WINDOWS``, at the tokens of
    ``sampled_positions`` (only those of ``categories``, default all). Each fact's noise and tokens are seeded by
    its index in ``real.KNOWN_FACTS`` (``_fact_ids``), so it gets the same trace whichever subset it is in."""
    facts = [real.KnownFact(*f) for f in facts]
    if not facts:
        raise ValueError("facts must hold at least one (prompt, subject, answer) triple, got none")
    for site in sites:
        _validate.one_of("site", site, tuple(REAL_WINDOWS))
    names = [*tracing.CATEGORIES, tracing.NULL]
    for name in categories or ():
        _validate.one_of("categories", name, tuple(names))
    lab = lab or lm.pretrained()
    model, tok = lab.model, lab.tokenizer
    keys = _fact_ids(facts)
    tokens = []
    for fact, key in zip(facts, keys):
        length = len(tok(fact.prompt)["input_ids"])
        picked = sampled_positions(tracing.subject_span(tok, fact.prompt, fact.subject), length, key, seed)
        tokens.append(sorted({p for name, p in picked.items() if p is not None and name in (categories or names)}))
    args = ([f.prompt for f in facts], [f.subject for f in facts], [f.answer for f in facts])
    noise = real_noise(model, tok)
    return {site: tracing.trace(model, tok, *args, noise=noise, site=site, window=REAL_WINDOWS[site], layers=layers,
                                tokens=tokens, samples=samples, seed=seed, noise_keys=keys)
            for site in sites}


def fact_table(traces: dict[str, tracing.Trace], fact_ids: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """One row per (fact, site, layer): the indirect effect by token category (``tracing.CATEGORIES`` and the
    null, ``tracing.NULL``, at the tokens of ``sampled_positions``), with the fact's clean and corrupted P(answer)."""
    frames = []
    for site, trace in traces.items():
        null = [sampled_positions(span, len(toks), key, seed)[tracing.NULL]
                for span, toks, key in zip(trace.spans, trace.tokens, fact_ids)]
        table = trace.categories(null)  # [F, K, L]
        for f, fact in enumerate(fact_ids):
            frame = pd.DataFrame(table[f].T, columns=[*tracing.CATEGORIES, tracing.NULL])
            frame.insert(0, "layer", trace.layers)
            frame.insert(0, "site", site)
            frame.insert(0, "fact", int(fact))
            frame["p_clean"], frame["p_corrupt"] = trace.p_clean[f].item(), trace.p_corrupt[f].item()
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def average_trace(facts: pd.DataFrame) -> pd.DataFrame:
    """The average indirect effect over the facts of a ``fact_table``: one row per layer, one column per (site,
    category); a fact that lacks a category (a one-token subject has no middle tokens) is left out of its mean."""
    names = [*tracing.CATEGORIES, tracing.NULL]
    mean = facts.groupby(["site", "layer"])[names].mean()  # NaN skipped
    table = mean.unstack("site").swaplevel(axis=1)
    sites = [s for s in REAL_WINDOWS if s in table.columns.get_level_values(0)]
    return table.reindex(columns=pd.MultiIndex.from_product([sites, names], names=["site", "category"]))


def real_model_trace(facts: Sequence[real.KnownFact] = real.KNOWN_FACTS, *, lab: lm.Lab | None = None,
                     sites: Sequence[str] = tuple(REAL_WINDOWS), layers: Sequence[int] | None = None,
                     samples: int = REAL_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """The average indirect effect of ``facts`` in a real model (``real_model_traces``) as a DataFrame: one row
    per layer, one column per (site, token category), the categories ROME's (first, middle and last subject
    token, first token after, further tokens, last token) and the null (``tracing.NULL``: the same restoration
    at one random token after the subject, not the last)."""
    facts = [real.KnownFact(*f) for f in facts]
    traces = real_model_traces(facts, lab=lab, sites=sites, layers=layers, samples=samples, seed=seed)
    return average_trace(fact_table(traces, _fact_ids(facts), seed))


def load_real_trace(path: Path = REAL_TRACE_FILE) -> pd.DataFrame:
    """The shipped per-fact trace of ``real.KNOWN_FACTS`` (``fact_table``'s columns), written by
    ``python -m cl_lab.chapters.ch11``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"path must be the shipped trace; regenerate it with python -m cl_lab.chapters.ch11 "
                                f"(got {path})")
    return pd.read_csv(path, comment="#")


def edit_layer(average: pd.DataFrame, share: float = EARLY_MID) -> int:
    """ROME's layer: where restoring the MLP output at the last subject token helps most, among the first
    ``share`` of the layers (the early-to-mid layers the paper edits)."""
    effect = average[("mlp", "last subject token")]
    return int(effect[effect.index < share * len(effect)].idxmax())


def real_model_edits(lab: lm.Lab, layer: int, *, world: lm.World, edits: Sequence[Edit] = REAL_EDITS,
                     contexts: Sequence[str] = ("{}",), n_texts: int = 150, seed: int = 0) -> pd.DataFrame:
    """ROME at ``layer`` of a real model for each of ``edits`` on its own: k* and v* over ``contexts`` (the bare
    prompt; ``REAL_CONTEXTS`` averages over prefixes as ROME does, at three times the cost), C from
    ``REAL_TEXTS`` and a seeded draw of ``n_texts`` of ``world``'s plain sentences. One row per edit: the
    CounterFact scores after the edit (``neighbourhood_before``: before it), the model's next token on the prompt
    after it, and ``essence_kl``, KL(after ‖ before) in nats of the next token after the essence prompt
    ("The {subject} is a")."""
    model, tok = lab.model, lab.tokenizer
    edits = list(edits)
    sentences = [f.sentence for f in world.train_facts] + world.general_train  # many are about cities
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:n_texts]
    covs = rome.layer_covariances(model, tok, list(REAL_TEXTS) + [sentences[i] for i in order.tolist()], [layer])
    changes = rome.rome_edits(model, tok, edits, layer, covs[layer], contexts=contexts)
    before = rome.edit_scores(model, tok, edits)
    essence_before = _next_token_logp(lab, [e.essence[0] for e in edits])  # [N, V]
    rows = []
    for i, (edit, change) in enumerate(zip(edits, changes)):
        with rome.updated(model, {layer: change.delta}):
            scores = rome.edit_scores(model, tok, [edit]).iloc[0]
            after = _next_token_logp(lab, [edit.prompt, edit.essence[0]])  # [2, V]
        rows.append({"subject": edit.subject, "edit": f"{edit.true} -> {edit.target}", **scores[list(AXES)].to_dict(),
                     "neighbourhood_before": before.neighbourhood[i], "says": tok.decode([int(after[0].argmax())]),
                     "essence_kl": rome.essence_kl(after[1:], essence_before[i:i + 1]).item()})
    return pd.DataFrame(rows).set_index("subject")


def _next_token_logp(lab: lm.Lab, prompts: list[str]) -> torch.Tensor:
    """log P(next token | prompt) [N, V] for each prompt."""
    ids = lm.encode(lab.tokenizer, prompts).to(next(lab.model.parameters()).device)
    with torch.no_grad():
        return torch.log_softmax(tracing.last_logits(lab.model, ids, lab.tokenizer.pad_token_id), -1).cpu()


def plot_average_trace(average: pd.DataFrame, n_facts: int):
    """ROME's fig. 2 for the real model: the average indirect effect per token category (rows, the null last)
    and layer (columns), one heat map per site."""
    sites = list(dict.fromkeys(average.columns.get_level_values(0)))
    fig, axes = plt.subplots(len(sites), 1, figsize=(11, 2.3 * len(sites)), sharex=True)
    for ax, site in zip(np.atleast_1d(axes), sites):
        table = average[site].T  # [categories, layers]
        image = ax.imshow(table.values, cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[site],
                          vmin=0, aspect="auto")
        ax.set_yticks(range(len(table.index)), table.index, fontsize=8)
        window = f" (window {REAL_WINDOWS[site]})" if REAL_WINDOWS[site] > 1 else ""
        ax.set_title(f"restore {SITE_TITLES[site]}{window}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    ax.set_xticks(range(0, len(average.index), 3), average.index[::3])
    ax.set_xlabel("layer")
    fig.suptitle(f"SmolLM2-135M: average indirect effect on P(answer) over {n_facts} facts", fontsize=10)
    fig.tight_layout()
    return fig


def plot_real_trace(demo: dict, fact: int = 0):
    """One fact's P(answer) with one hidden state or MLP window restored, at its last subject token and its last
    token (``demo``: {"name": model name, "traces": {site: Trace}}; ``fact``: the prompt's row in the traces)."""
    fig, axes = plt.subplots(1, len(demo["traces"]), figsize=(5 * len(demo["traces"]), 3.0), sharey=True)
    for ax, (site, trace) in zip(np.atleast_1d(axes), demo["traces"].items()):
        tokens = trace.tokens[fact]
        last_subject, last = trace.spans[fact][1] - 1, len(tokens) - 1
        for position, label in ((last_subject, f"last subject token {tokens[last_subject]!r}"),
                                (last, f"last token {tokens[last]!r}")):
            ax.plot(trace.layers, trace.p_restored[fact, :, position], "o-", ms=3, label=label)
        ax.axhline(trace.p_clean[fact], color="k", lw=0.8, ls="--", label="clean")
        ax.axhline(trace.p_corrupt[fact], color="grey", lw=0.8, ls=":", label="corrupted")
        window = f" (window {trace.window})" if trace.window > 1 else ""
        ax.set(xlabel="layer" + window, title=f"restore {SITE_TITLES[site]}")
    np.atleast_1d(axes)[0].set_ylabel("P(answer)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"{demo['name']}: '{''.join(tokens)}'", fontsize=10)
    fig.tight_layout()
    return fig


def write_real_trace(path: Path = REAL_TRACE_FILE, *, samples: int = REAL_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """Trace every fact of ``real.KNOWN_FACTS`` in ``lm.pretrained()`` at every layer and site and write the
    per-fact table (``fact_table``) to ``path``, with a first comment line saying how it was made."""
    start = time.perf_counter()
    lab = lm.pretrained()
    facts = list(real.KNOWN_FACTS)
    table = fact_table(real_model_traces(facts, lab=lab, samples=samples, seed=seed), _fact_ids(facts), seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        out.write(f"# {lab.config.get('name')}: {len(facts)} facts of cl_lab.lm.real.KNOWN_FACTS, {samples} noise "
                  f"draws, seed {seed}, windows {REAL_WINDOWS}; python -m cl_lab.chapters.ch11 "
                  f"({time.perf_counter() - start:.0f} s)\n")
        table.to_csv(out, index=False, float_format="%.5f")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate chapter 11's shipped causal trace of SmolLM2-135M.")
    parser.add_argument("--samples", type=int, default=REAL_SAMPLES, help="noise draws per fact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REAL_TRACE_FILE)
    args = parser.parse_args(argv)
    table = write_real_trace(args.out, samples=args.samples, seed=args.seed)
    print(f"wrote {len(table)} rows to {args.out}")


if __name__ == "__main__":
    main()
