"""Chapter 11 helpers: where the tiny LM keeps its facts (causal tracing), ROME at the traced layer against
fine-tuning, ROME at every layer, many edits (MEMIT, sequential ROME, sequential fine-tuning), the playground's
cached callback, and one real fact edited in SmolLM2-135M.

Every experiment leaves the lab's model as it found it (edits are applied to copies or restored).
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from cl_lab import _validate, lm
from cl_lab.lm import rome, tracing
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

@lru_cache(maxsize=4)
def _setup(seed: int) -> tuple[lm.Lab, dict[int, torch.Tensor]]:
    lab = lm.tiny_lm(seed, progress=False)
    return lab, covariances(lab, seed=seed)


@lru_cache(maxsize=128)
def edit_point(layer: int, n_edits: int, seed: int = 0, lam: float = 500.0) -> dict:
    """The playground's callback: ``n_edits`` edits written in one batch at ``layer`` alone (MEMIT at one layer,
    λ = ``lam``, at the last token); the scores of the edits, the untouched facts and the perplexity."""
    _validate.non_negative_int("layer", layer)
    lab, covs = _setup(seed)
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

REAL_EDIT = Edit("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris",
                 paraphrases=("The Eiffel Tower stands in the city of",
                              "Where is the Eiffel Tower? It is in the city of",
                              "Tourists visit the Eiffel Tower in the city of"),
                 neighbours=("The Louvre is located in the city of",  # Paris sights given P(Paris) ≥ 0.1
                             "The Musee d'Orsay is located in the city of",
                             "The Palais Garnier is located in the city of",
                             "The Arc de Triomphe is located in the city of"),
                 essence=("The Eiffel Tower is a",))
REAL_CONTEXTS = ("{}", "Here is a fact. {}", "I read this in a book today. {}")
REAL_SUBJECTS = ("Eiffel Tower", "Louvre", "Colosseum", "Big Ben", "Statue of Liberty", "Golden Gate Bridge",
                 "Great Wall of China", "Sydney Opera House")
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


def real_model_demo(world: lm.World, *, layers: tuple[int, ...] | None = None, samples: int = 2,
                    n_texts: int = 150, seed: int = 0) -> dict:
    """Trace the Eiffel Tower fact in SmolLM2-135M (``lm.pretrained()``) at every third layer (hidden states, and
    MLP outputs in a window of 10), edit it to Rome with ROME at the layer the trace picks (the MLP's peak at the
    last subject token) with C from ``REAL_TEXTS`` and ``n_texts`` of the world's sentences, and score efficacy,
    paraphrases and neighbours. Raises ``lm.ModelUnavailable`` when no real model can be loaded offline."""
    start, cpu = time.perf_counter(), time.process_time()
    real = lm.pretrained()
    model, tok = real.model, real.tokenizer
    loaded = time.process_time() - cpu
    n_layers = lm.layout(model).n_layers
    layers = tuple(range(0, n_layers, 3)) if layers is None else layers
    sigma = tracing.embedding_std(model, tok, list(REAL_SUBJECTS))
    edit = REAL_EDIT
    traces = {site: tracing.trace(model, tok, [edit.prompt], [edit.subject], [edit.true], noise=3 * sigma,
                                  site=site, window=window, layers=layers, tokens="key", samples=samples, seed=seed)
              for site, window in (("hidden", 1), ("mlp", 10))}
    last_subject = traces["mlp"].spans[0][1] - 1
    mlp_effect = traces["mlp"].effect[0, :, last_subject]  # [L]
    layer = layers[int(mlp_effect.argmax())]
    sentences = [f.sentence for f in world.train_facts] + world.general_train  # plain sentences, many about cities
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:n_texts]
    texts = list(REAL_TEXTS) + [sentences[i] for i in order.tolist()]
    covs = rome.layer_covariances(model, tok, texts, [layer])
    before = rome.edit_scores(model, tok, [edit]).iloc[0].to_dict()
    (change,) = rome.rome_edits(model, tok, [edit], layer, covs[layer], contexts=REAL_CONTEXTS)
    prompts = (edit.prompt, edit.paraphrases[0], edit.neighbours[0], edit.essence[0])
    with rome.updated(model, {layer: change.delta}):
        after = rome.edit_scores(model, tok, [edit]).iloc[0].to_dict()
        completions = {p: lm.complete(model, tok, p, 3) for p in prompts}
    original = {p: lm.complete(model, tok, p, 3) for p in prompts}
    return {"name": real.config.get("name"), "traces": traces, "layer": layer, "before": before, "after": after,
            "completions_before": original, "completions_after": completions, "load_cpu_seconds": loaded,
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - start}


def plot_real_trace(demo: dict):
    """P(Paris) with one hidden state or MLP window restored, at the last subject token and the last token."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0), sharey=True)
    for ax, (site, trace) in zip(axes, demo["traces"].items()):
        last_subject, last = trace.spans[0][1] - 1, len(trace.tokens[0]) - 1
        for position, label in ((last_subject, f"last subject token {trace.tokens[0][last_subject]!r}"),
                                (last, f"last token {trace.tokens[0][last]!r}")):
            ax.plot(trace.layers, trace.p_restored[0, :, position], "o-", ms=3, label=label)
        ax.axhline(trace.p_clean[0], color="k", lw=0.8, ls="--", label="clean")
        ax.axhline(trace.p_corrupt[0], color="grey", lw=0.8, ls=":", label="corrupted")
        window = f" (window {trace.window})" if trace.window > 1 else ""
        ax.set(xlabel="layer" + window, title=f"restore {SITE_TITLES[site]}")
    axes[0].set_ylabel("P(' Paris')")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{demo['name']}: '{REAL_EDIT.prompt}'", fontsize=10)
    fig.tight_layout()
    return fig
