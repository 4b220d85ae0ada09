"""Null controls for forgetting in the tiny LM: what fine-tuning costs when there is nothing new to learn, and
which pretraining facts a remedy never saw.

**The optimizer null.** Fine-tune a copy of the pretrained LM with the same optimizer, learning rate, batch size
and steps as a real run, but on facts the model *already recalls* (``known_fact_task``). The task teaches
nothing, so whatever recall of the *other* pretraining facts (``scored_complement``) drops is the optimizer's
own cost: Adam's first steps move every weight by about ``lr`` whatever the gradient's size (its update is
m̂/√v̂, about ±1 per coordinate while the moments are young; Kingma & Ba 2015, arXiv 1412.6980, Alg. 1). A
run's forgetting counts as interference from new content only beyond this null
(``forgetting_beyond_null``).

**Facts no remedy saw.** Replay and a KL on pretraining text train on ``World.pretraining_texts()``, which
holds the very sentences that recall scores. ``hold_out`` draws whole pretraining subjects, removes every
sentence about them from the texts a remedy may use, and keeps their facts for scoring.

The unit of a draw is a *fact*: one (subject, relation) pair, with all its trained renderings (the sentences
in pretraining) as the task's examples and its held-out renderings as paraphrases, as in
``cl_lab.lm.stream``'s ``"subjects"`` tasks (20 people × 4 relations = 80 facts = 320 renderings).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cl_lab import _validate
from cl_lab.data.streams import Stream
from cl_lab.lm.evaluate import fact_batch, hits
from cl_lab.lm.lab import Lab
from cl_lab.lm.stream import FactTask
from cl_lab.lm.world import Fact, World

FactKey = tuple[str, str]  # (subject, relation)


def _check_lab(lab: Lab) -> World:
    if not isinstance(lab, Lab) or lab.world is None:
        raise TypeError(f"lab must be a tiny-LM Lab with a world (cl_lab.lm.tiny_lm), got {type(lab).__name__}")
    return lab.world


def fact_keys(facts: Iterable[Fact | FactKey]) -> set[FactKey]:
    """The (subject, relation) keys of ``facts`` (``Fact``s, or keys already)."""
    return {(f.subject, f.relation) if isinstance(f, Fact) else tuple(f) for f in facts}


def _by_fact(facts: Sequence[Fact]) -> dict[FactKey, list[Fact]]:
    grouped: dict[FactKey, list[Fact]] = {}
    for f in facts:
        grouped.setdefault((f.subject, f.relation), []).append(f)
    return grouped


def known_facts(lab: Lab, model: nn.Module | None = None) -> list[FactKey]:
    """The pretraining facts whose every trained rendering ``model`` (default ``lab.model``) recalls, in the
    world's order."""
    world = _check_lab(lab)
    correct = hits(lab.model if model is None else model, lab.tokenizer, world.train_facts).tolist()  # [N]
    ok: dict[FactKey, bool] = {}
    for f, hit in zip(world.train_facts, correct):
        key = (f.subject, f.relation)
        ok[key] = ok.get(key, True) and hit
    return [key for key, good in ok.items() if good]


def _draw(keys: Sequence[FactKey], n: int, seed: int, what: str) -> list[FactKey]:
    if n > len(keys):
        raise ValueError(f"n must be at most the {len(keys)} {what}, got {n}")
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed))[:n]
    return [keys[i] for i in sorted(order.tolist())]


def known_fact_task(lab: Lab, n: int, seed: int, *, model: nn.Module | None = None,
                    exclude: Iterable[Fact | FactKey] = (), length: int | None = None, task_id: int = 0,
                    require_known: bool = True) -> FactTask:
    """A task of ``n`` pretraining facts that ``model`` (default ``lab.model``) already recalls, drawn at random
    (seeded) among those not in ``exclude``: the optimizer null's task.

    Rendered like ``fact_stream(kind="subjects")``'s tasks: x_train = x_test = every trained rendering of the
    facts (prompt ids [N, L], right-padded to ``length``, default the longest prompt), y = object ids [N],
    ``paraphrase_facts`` = their held-out renderings. ``fact_stream``'s ``n_subjects`` people make ``4 ·
    n_subjects`` facts, so ``known_fact_task(lab, 4 * n_subjects, …)`` matches a subjects task in size.
    ``require_known=False`` draws among all pretraining facts (for a SMOKE lab, which recalls none).
    """
    world = _check_lab(lab)
    _validate.positive_int("n", n)
    _validate.non_negative_int("seed", seed)
    _validate.non_negative_int("task_id", task_id)
    excluded = fact_keys(exclude)
    every = known_facts(lab, model) if require_known else list(_by_fact(world.train_facts))
    pool = [k for k in every if k not in excluded]
    chosen = _draw(pool, n, seed, "known facts outside exclude")
    trained, held = _by_fact(world.train_facts), _by_fact(world.heldout_facts)
    train = [f for k in chosen for f in trained[k]]
    paraphrase = [f for k in chosen for f in held.get(k, [])]
    x, y = fact_batch(lab.tokenizer, train, length=length)  # [N, L], [N]
    return FactTask(task_id, f"known facts {task_id + 1}", x, y, x.clone(), y.clone(), tuple(sorted(set(y.tolist()))),
                    train_facts=train, test_facts=train, paraphrase_facts=paraphrase)


def known_fact_stream(lab: Lab, sizes: Sequence[int], seed: int, *, model: nn.Module | None = None,
                      exclude: Iterable[Fact | FactKey] = (), length: int | None = None,
                      require_known: bool = True) -> Stream:
    """A Domain-IL stream of ``len(sizes)`` known-fact tasks with ``sizes[i]`` facts each, disjoint from one
    another and from ``exclude``: the null of a stream trained with ``train.fit`` (same steps, lr, optimizer).
    ``length`` pads every prompt to one width (default: the longest prompt of the world's trained facts)."""
    world = _check_lab(lab)
    sizes = [_validate.positive_int("sizes", n) for n in sizes]
    if not sizes:
        raise ValueError("sizes must hold at least one task size, got none")
    if length is None:
        length = max(len(lab.tokenizer(f.prompt)["input_ids"]) for f in world.train_facts)
    excluded, tasks = fact_keys(exclude), []
    for i, n in enumerate(sizes):
        task = known_fact_task(lab, n, seed + i, model=model, exclude=excluded, length=length, task_id=i,
                               require_known=require_known)
        excluded |= fact_keys(task.train_facts)
        tasks.append(task)
    return Stream("lm-known-facts", "domain", tasks, lab.model.config.vocab_size, (length,))


def scored_complement(lab: Lab, exclude_facts: Iterable[Fact | FactKey], n: int | None = None, seed: int = 0
                      ) -> list[Fact]:
    """The trained renderings of pretraining facts outside ``exclude_facts`` (e.g. the null's task), for
    scoring recall on facts the null never trained; ``n`` keeps a seeded random draw of that many facts (all
    their renderings), default every one."""
    world = _check_lab(lab)
    excluded = fact_keys(exclude_facts)
    trained = _by_fact(world.train_facts)
    keys = [k for k in trained if k not in excluded]
    if n is not None:
        _validate.positive_int("n", n)
        keys = _draw(keys, n, seed, "facts outside exclude_facts")
    return [f for k in keys for f in trained[k]]


def forgetting_beyond_null(before: float, after: float, null_after: float) -> float:
    """How much more a run forgot than the optimizer null: (before − after) − (before − null_after), i.e.
    ``null_after − after``, with all three measured on the same facts (e.g. ``scored_complement``)."""
    for name, value in (("before", before), ("after", after), ("null_after", null_after)):
        _validate.finite(name, value)
    return (before - after) - (before - null_after)


@dataclass(frozen=True)
class Holdout:
    """Pretraining subjects held out from every remedy's text.

    ``texts``: the pretraining corpus without any sentence about a held-out subject (what replay or a KL on
    text may use); ``facts``: the held-out subjects' trained renderings (the sentences recall would score);
    ``paraphrases``: their held-out renderings.
    """

    subjects: tuple[str, ...]
    texts: list[str]
    facts: list[Fact]
    paraphrases: list[Fact]


def hold_out(world: World, n_subjects: int, seed: int, among: Sequence[str] | None = None) -> Holdout:
    """Hold out ``n_subjects`` pretraining subjects, a seeded random draw from ``among`` (default every
    pretraining subject): their facts are scored, and no text about them is left in ``Holdout.texts``."""
    if not isinstance(world, World):
        raise TypeError(f"world must be a cl_lab.lm World, got {type(world).__name__}")
    _validate.positive_int("n_subjects", n_subjects)
    _validate.non_negative_int("seed", seed)
    pool = list(world.subjects if among is None else among)
    unknown = sorted(set(pool) - set(world.subjects))
    if unknown:
        raise ValueError(f"among must name pretraining subjects of this world, got {unknown[:3]}")
    if n_subjects > len(pool):
        raise ValueError(f"n_subjects must be at most the {len(pool)} subjects of among, got {n_subjects}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n_subjects]
    subjects = tuple(pool[i] for i in sorted(order.tolist()))
    held = set(subjects)
    facts = [f for f in world.train_facts if f.subject in held]
    removed = {f.sentence for f in facts}
    texts = [t for t in world.pretraining_texts() if t not in removed]
    return Holdout(subjects, texts, facts, [f for f in world.heldout_facts if f.subject in held])
