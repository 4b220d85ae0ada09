"""LM task streams in the ``(x, y, t)`` protocol of the rest of cl_lab.

A fact is a prompt → object-token prediction: x = the prompt's right-padded token ids [N, L] (a LongTensor),
y = the object's token id [N], t = the task id. With ``lab.as_classifier()`` as the model, ``train.fit``, the
methods of chapters 01–08, ``Run.R``, BWT and continual evaluation apply unchanged. The stream is Domain-IL
with one shared head: the whole vocabulary (``n_out`` = the model's vocabulary size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cl_lab import _validate
from cl_lab.data.streams import Stream, Task
from cl_lab.lm.evaluate import fact_batch
from cl_lab.lm.lab import Lab
from cl_lab.lm.world import BASE_RELATIONS, NEW_RELATIONS, Fact, World

KINDS = ("subjects", "relation", "format")


@dataclass
class FactTask(Task):
    """A ``Task`` that also keeps its facts: ``train_facts`` (x_train), ``test_facts`` (x_test) and the held-out
    renderings ``paraphrase_facts`` (templates of the same facts never trained; empty for ``format``)."""

    train_facts: list[Fact] = field(default_factory=list)
    test_facts: list[Fact] = field(default_factory=list)
    paraphrase_facts: list[Fact] = field(default_factory=list)


def _task_facts(world: World, kind: str, i: int, n_subjects: int) -> tuple[str, list[Fact], list[Fact], list[Fact]]:
    """(name, train, test, paraphrase) facts of task ``i``."""
    if kind == "subjects":  # new people, the four pretrained relations
        subjects = world.fresh_subjects(n_subjects, start=i * n_subjects)
        train, held = world.render_split(world.assign_objects(subjects, BASE_RELATIONS, tag=f"task{i}"),
                                         tag=f"task{i}")
        return f"new people {i + 1}", train, train, held
    if kind == "relation":  # pretrained people, a relation never pretrained
        relation = NEW_RELATIONS[i]
        subjects = world.subjects[:n_subjects]
        train, held = world.render_split(world.assign_objects(subjects, [relation], tag=f"task{i}"), tag=f"task{i}")
        return relation.name, train, train, held
    relation = BASE_RELATIONS[i].name  # format: pretrained facts asked as questions; tested on other people
    train = world.questions(relation, world.subjects[:n_subjects])
    test = world.questions(relation, world.subjects[n_subjects:2 * n_subjects])
    return f"Q&A {relation}", train, test, []


def fact_stream(lab: Lab, n_tasks: int = 3, kind: str = "subjects", *, n_subjects: int = 20) -> Stream:
    """A stream of ``n_tasks`` fact tasks on ``lab``'s world, as ``FactTask``s (x [N, L] ids, y [N] object ids).

    ``kind``:
    - ``"subjects"``: task i teaches the four pretrained relations for ``n_subjects`` new people (names never
      in pretraining; a fresh set per task), under the trained templates; tested on the same renderings
      (recall of what was taught). ``paraphrase_facts`` hold the held-out templates. Up to 10 tasks at 20.
    - ``"relation"``: task i teaches a relation never pretrained (plays an instrument, owns a pet, drives a
      vehicle) for ``n_subjects`` pretrained people. Up to 3 tasks.
    - ``"format"``: task i teaches the question format of pretrained relation i ("Q: where does X Y live ?
      A:" → the city) on ``n_subjects`` people's known facts, and tests it on ``n_subjects`` *other* people:
      learning the format, not new facts. Up to 4 tasks; needs 2·n_subjects ≤ the world's subjects.

    Every task's prompts are padded to one length L (the longest prompt of the stream), so batches of
    different tasks (replay) concatenate. Train and test facts keep a fixed order; ``Task.sample`` draws
    seeded random subsets.
    """
    if not isinstance(lab, Lab) or lab.world is None:
        raise TypeError(f"lab must be a tiny-LM Lab with a world (cl_lab.lm.tiny_lm), got {type(lab).__name__}")
    _validate.one_of("kind", kind, KINDS)
    _validate.positive_int("n_tasks", n_tasks)
    _validate.positive_int("n_subjects", n_subjects)
    world = lab.world
    limit = {"subjects": (len(world.all_subjects) - world.n_subjects) // n_subjects, "relation": len(NEW_RELATIONS),
             "format": len(BASE_RELATIONS)}[kind]
    if n_tasks > limit:
        raise ValueError(f"n_tasks must be at most {limit} for kind={kind!r} (n_subjects={n_subjects}), got {n_tasks}")
    needed = 2 * n_subjects if kind == "format" else n_subjects
    if kind != "subjects" and needed > world.n_subjects:
        raise ValueError(f"n_subjects must be at most {world.n_subjects // (2 if kind == 'format' else 1)} for "
                         f"kind={kind!r} (the world has {world.n_subjects} subjects), got {n_subjects}")
    parts = [_task_facts(world, kind, i, n_subjects) for i in range(n_tasks)]
    length = max(len(lab.tokenizer(f.prompt)["input_ids"]) for _, tr, te, _ in parts for f in tr + te)
    tasks = []
    for i, (name, train, test, paraphrase) in enumerate(parts):
        x_tr, y_tr = fact_batch(lab.tokenizer, train, length=length)
        x_te, y_te = fact_batch(lab.tokenizer, test, length=length)
        classes = tuple(sorted(set(y_tr.tolist()) | set(y_te.tolist())))
        tasks.append(FactTask(i, name, x_tr, y_tr, x_te, y_te, classes, train_facts=train, test_facts=test,
                              paraphrase_facts=paraphrase))
    return Stream(f"lm-facts-{kind}", "domain", tasks, lab.model.config.vocab_size, (length,))
