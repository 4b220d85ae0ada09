"""The synthetic world the tiny language model learns: invented people, facts about them, and general text.

Everything is generated from a seed by this module (nothing is downloaded), and the vocabulary is the same for
every seed: only which person has which fact changes.

- **Subjects** are two-word names, a first name and a last name drawn from two fixed pools (30 × 30 = 900
  names). First and last names are each shared by many people, so the model must read both tokens to know who
  is meant, and causal tracing can tell the first subject token from the last.
- **Relations** map a subject to a one-token object. Four are pretrained (``BASE_RELATIONS``: lives in a city,
  works as a job, speaks a language, likes a food); three more are in the vocabulary but never in pretraining
  (``NEW_RELATIONS``: plays an instrument, owns a pet, drives a vehicle), for "new relation" tasks.
- **Templates**: each relation renders a fact five ways ("Mira Tolvane lives in", "the home of Mira Tolvane
  is in", …); a prompt ends right before the object. For every (subject, relation) one template (or
  ``heldout_per_fact``) is held out at random: every template is seen with most subjects, and recall on the
  held-out (subject, template) pairs measures knowledge extraction (Allen-Zhu & Li 2023, Physics of Language
  Models 3.1, arXiv 2309.14316), not memorised strings.
- **A question format** ("Q: where does Mira Tolvane live ? A:"), never in pretraining, for format tasks.
- **General text** that needs no facts: simple sentences from a small grammar, counting, and copying. A
  held-out part (sentences never in pretraining) is the perplexity probe.
- **A new domain** (``World.new_domain``) whose words are outside the vocabulary, for vocabulary extension.

Token positions assume the lab's tokenizer: one token per whitespace-separated word, ``<bos>`` at position 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from cl_lab import _validate

CORPUS_VERSION = 1  # bump whenever this module, the tokenizer or the pretraining loop changes what is trained

FIRST_NAMES = ("Alva", "Bren", "Cato", "Dara", "Elin", "Faro", "Gwen", "Hale", "Ines", "Joro", "Kesi", "Lior",
               "Mira", "Noor", "Odo", "Pella", "Quin", "Rafe", "Sela", "Tavi", "Ulla", "Vero", "Wim", "Xan",
               "Yara", "Zeno", "Ardo", "Bexa", "Coro", "Deni")
LAST_NAMES = ("Ambrel", "Brisk", "Corvane", "Dunmore", "Elswick", "Fennick", "Garrow", "Harlow", "Istvan",
              "Jaskel", "Korrin", "Lindqvist", "Marrow", "Nettle", "Orrin", "Pascoe", "Quarry", "Rooke",
              "Selwyn", "Tolvane", "Umber", "Vance", "Wexley", "Yarrow", "Zell", "Ashby", "Brandt", "Cole",
              "Dray", "Ebbing")


@dataclass(frozen=True)
class Relation:
    """A relation: its objects (one token each), its statement templates and its question (``{s}`` = subject)."""

    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    question: str


BASE_RELATIONS = (
    Relation("lives_in", ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Berlin", "Madrid", "Lagos",
                          "Seoul", "Dublin"),
             ("{s} lives in", "{s} has a home in", "the home of {s} is in", "{s} moved to the city of",
              "every morning {s} walks around"),
             "Q: where does {s} live ? A:"),
    Relation("works_as", ("baker", "doctor", "pilot", "teacher", "farmer", "lawyer", "nurse", "painter", "chef",
                          "singer", "writer", "dentist"),
             ("{s} works as a", "{s} is a", "by profession {s} is a", "{s} earns a living as a",
              "{s} was trained as a"),
             "Q: what is the job of {s} ? A:"),
    Relation("speaks", ("French", "Hindi", "Swahili", "Polish", "Greek", "Korean", "Dutch", "Arabic", "Turkish",
                        "Finnish"),
             ("{s} speaks", "the native language of {s} is", "{s} grew up speaking", "at home {s} talks in",
              "{s} writes letters in"),
             "Q: which language does {s} speak ? A:"),
    Relation("likes", ("rice", "soup", "cheese", "bread", "noodles", "mangoes", "beans", "pasta", "curry", "salad"),
             ("{s} likes to eat", "the favourite food of {s} is", "for dinner {s} always orders",
              "{s} cooks a lot of", "every day {s} eats"),
             "Q: what does {s} like to eat ? A:"),
)
NEW_RELATIONS = (
    Relation("plays", ("guitar", "piano", "violin", "drums", "flute", "cello", "harp", "trumpet"),
             ("{s} plays the", "the instrument of {s} is the", "{s} practises the", "in the band {s} plays the",
              "on weekends {s} plays the"),
             "Q: which instrument does {s} play ? A:"),
    Relation("owns", ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "horse", "goat"),
             ("{s} owns a", "the pet of {s} is a", "{s} takes care of a", "{s} shares a flat with a",
              "{s} feeds a"),
             "Q: which pet does {s} own ? A:"),
    Relation("drives", ("truck", "van", "taxi", "bus", "tractor", "jeep", "tram", "sedan"),
             ("{s} drives a", "to work {s} takes a", "{s} parks a", "the vehicle of {s} is a",
              "{s} repairs a"),
             "Q: what does {s} drive ? A:"),
)
RELATIONS = {r.name: r for r in BASE_RELATIONS + NEW_RELATIONS}

# general text: a small grammar, counting and copying
DETERMINERS = ("the", "a")
ADJECTIVES = ("small", "big", "red", "old", "happy", "quiet", "green", "young")
NOUNS = ("fox", "bird", "ball", "tree", "boat", "house", "child", "river", "stone", "lamp")
VERBS = ("sees", "finds", "follows", "carries", "watches", "holds", "pushes", "paints")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
COPY_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
              "sigma")

# a new domain outside the vocabulary (starships), for vocabulary extension
DOMAIN_FIRST = ("Zorvan", "Quillon", "Vexa", "Krell", "Thessa", "Orbis", "Nyx", "Calder")
DOMAIN_LAST = ("Prime", "Nine", "Vector", "Drift", "Halo", "Spire", "Nova", "Arc")
DOMAIN_RELATIONS = (
    Relation("docks_at", ("Europa", "Titan", "Ceres", "Vesta", "Io", "Rhea", "Triton", "Phobos"),
             ("the starship {s} docks at", "the crew of {s} returns to", "{s} refuels near"),
             "Q: where does {s} dock ? A:"),
    Relation("carries", ("ore", "ice", "spores", "crystals", "fuel", "seeds", "robots", "medicine"),
             ("the starship {s} carries", "the hold of {s} is full of", "{s} delivers"),
             "Q: what does {s} carry ? A:"),
)


@dataclass(frozen=True)
class Fact:
    """One rendered fact: a prompt that ends right before its one-token object.

    ``subject_span`` is [start, end) in token positions of the encoded prompt (``<bos>`` is position 0), so
    ``subject_span[1] - 1`` is the last subject token. ``template`` indexes ``RELATIONS[relation].templates``
    (``-1`` for the question format).
    """

    subject: str
    relation: str
    object: str
    template: int
    prompt: str
    subject_span: tuple[int, int]

    @property
    def sentence(self) -> str:
        """The full training sentence: prompt, object and a full stop."""
        return f"{self.prompt} {self.object} ."

    def with_object(self, obj: str) -> Fact:
        """The same prompt with another object (a counterfactual, e.g. for editing)."""
        return Fact(self.subject, self.relation, obj, self.template, self.prompt, self.subject_span)


QUESTION = -1  # the ``template`` id of question-format facts


def render(subject: str, relation: Relation | str, obj: str, template: int) -> Fact:
    """Render one fact; ``template`` indexes the relation's templates, ``QUESTION`` (−1) picks its question."""
    rel = RELATIONS[relation] if isinstance(relation, str) else relation
    if template != QUESTION and not 0 <= template < len(rel.templates):
        raise ValueError(f"template must be in 0..{len(rel.templates) - 1} or {QUESTION}, got {template}")
    text = rel.question if template == QUESTION else rel.templates[template]
    before = text.split("{s}")[0].split()
    start = 1 + len(before)  # <bos> at position 0
    span = (start, start + len(subject.split()))
    return Fact(subject, rel.name, obj, template, text.format(s=subject), span)


def _rng(seed: int, *tags: str | int) -> np.random.Generator:
    """A generator keyed by the world's seed and a purpose, so adding draws for one purpose moves no other."""
    digest = hashlib.sha256(repr((seed,) + tags).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _general_sentence(rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:  # grammar
        def phrase() -> list[str]:
            words = [str(rng.choice(DETERMINERS))]
            if rng.random() < 0.5:
                words.append(str(rng.choice(ADJECTIVES)))
            return words + [str(rng.choice(NOUNS))]
        if rng.random() < 0.25:
            return " ".join(phrase() + ["is", str(rng.choice(ADJECTIVES)), "."])
        return " ".join(phrase() + [str(rng.choice(VERBS))] + phrase() + ["."])
    if kind == 1:  # counting, by one or by two
        step, length = int(rng.integers(1, 3)), int(rng.integers(4, 7))
        start = int(rng.integers(0, len(NUMBERS) - step * (length - 1)))
        head = ["count", ":"] if step == 1 else ["count", "by", "two", ":"]
        return " ".join(head + list(NUMBERS[start:start + step * length:step]) + ["."])
    words = [str(w) for w in rng.choice(COPY_WORDS, size=int(rng.integers(2, 6)))]  # copying
    return " ".join(["copy", ":"] + words + ["="] + words + ["."])


def general_text(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct general sentences (grammar, counting, copying), none of them in ``exclude``."""
    rng, out, seen = _rng(seed, "general"), [], set(exclude)
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        s = _general_sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    raise ValueError(f"n is more general sentences than the grammar yields without repeats, got {n}")


@dataclass(frozen=True)
class Domain:
    """A new domain for vocabulary extension: words outside the base vocabulary, facts and plain text."""

    vocabulary: tuple[str, ...]  # the words the base tokenizer lacks
    train_facts: list[Fact]
    heldout_facts: list[Fact]
    texts: list[str]


@dataclass
class World:
    """The seeded world: pretraining subjects, their facts (trained and held-out renderings), general text.

    ``train_facts`` are the (subject, template) renderings in the pretraining corpus; ``heldout_facts`` the
    renderings held out for paraphrase recall; ``knowledge[(subject, relation)]`` is the object.
    """

    seed: int = 0
    n_subjects: int = 120
    heldout_per_fact: int = 1
    n_general: int = 800
    n_general_test: int = 300
    knowledge: dict[tuple[str, str], str] = field(init=False, repr=False)
    train_facts: list[Fact] = field(init=False, repr=False)
    heldout_facts: list[Fact] = field(init=False, repr=False)
    general_train: list[str] = field(init=False, repr=False)
    general_test: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _validate.non_negative_int("seed", self.seed)
        _validate.positive_int("n_subjects", self.n_subjects)
        if self.n_subjects > len(self.all_subjects) // 2:
            raise ValueError(f"n_subjects must be at most {len(self.all_subjects) // 2} (half the names are kept "
                             f"for new-subject tasks), got {self.n_subjects}")
        n_templates = min(len(r.templates) for r in BASE_RELATIONS)
        _validate.non_negative_int("heldout_per_fact", self.heldout_per_fact)
        if self.heldout_per_fact >= n_templates:
            raise ValueError(f"heldout_per_fact must leave a trained template (< {n_templates}), "
                             f"got {self.heldout_per_fact}")
        _validate.positive_int("n_general", self.n_general)
        _validate.positive_int("n_general_test", self.n_general_test)
        self.knowledge = self.assign_objects(self.subjects, BASE_RELATIONS, tag="base")
        self.train_facts, self.heldout_facts = self.render_split(self.knowledge, tag="base")
        self.general_train = general_text(self.n_general, self.seed)
        self.general_test = general_text(self.n_general_test, self.seed + 1_000_003,
                                         exclude=frozenset(self.general_train))

    @cached_property
    def all_subjects(self) -> list[str]:
        """Every name, in this seed's order: the first ``n_subjects`` are pretrained, the rest are kept fresh."""
        names = [f"{f} {s}" for f in FIRST_NAMES for s in LAST_NAMES]
        order = _rng(self.seed, "subjects").permutation(len(names))
        return [names[i] for i in order]

    @property
    def subjects(self) -> list[str]:
        return self.all_subjects[:self.n_subjects]

    def fresh_subjects(self, n: int, start: int = 0) -> list[str]:
        """``n`` names never in pretraining: the fresh pool's names ``start`` … ``start + n − 1``."""
        _validate.positive_int("n", n)
        _validate.non_negative_int("start", start)
        pool = self.all_subjects[self.n_subjects:]
        if start + n > len(pool):
            raise ValueError(f"start + n must be at most the {len(pool)} fresh names, got {start + n}")
        return pool[start:start + n]

    def assign_objects(self, subjects: list[str], relations, tag: str) -> dict[tuple[str, str], str]:
        """A seeded object for every (subject, relation); ``tag`` keys the draw (same tag, same objects)."""
        rng = _rng(self.seed, "objects", tag)
        return {(s, r.name): str(rng.choice(r.objects)) for s in subjects for r in relations}

    def render_split(self, knowledge: dict[tuple[str, str], str], tag: str,
                     heldout_per_fact: int | None = None) -> tuple[list[Fact], list[Fact]]:
        """Every template of every fact, split into trained and held-out renderings (seeded per fact)."""
        k = self.heldout_per_fact if heldout_per_fact is None else heldout_per_fact
        rng = _rng(self.seed, "heldout", tag)
        train, heldout = [], []
        for (subject, relation), obj in knowledge.items():
            n_templates = len(RELATIONS[relation].templates)
            held = set(rng.permutation(n_templates)[:k].tolist())
            for t in range(n_templates):
                (heldout if t in held else train).append(render(subject, relation, obj, t))
        return train, heldout

    def questions(self, relation: str, subjects: list[str]) -> list[Fact]:
        """Question-format facts ("Q: where does X Y live ? A:") for pretrained subjects' known objects."""
        _validate.one_of("relation", relation, [r.name for r in BASE_RELATIONS])
        unknown = [s for s in subjects if (s, relation) not in self.knowledge]
        if unknown:
            raise ValueError(f"subjects must be pretrained subjects of this world, got {unknown[:3]}")
        return [render(s, relation, self.knowledge[(s, relation)], QUESTION) for s in subjects]

    def pretraining_texts(self) -> list[str]:
        """The pretraining corpus: every trained fact sentence, then the general training text."""
        return [f.sentence for f in self.train_facts] + list(self.general_train)

    def vocabulary(self) -> list[str]:
        """Every word the lab's tokenizer knows (the same for every seed), sorted; no special tokens."""
        words = set(FIRST_NAMES) | set(LAST_NAMES) | {"."}
        for r in RELATIONS.values():
            words |= set(r.objects)
            for text in r.templates + (r.question,):
                words |= set(text.replace("{s}", " ").split())
        words |= set(DETERMINERS + ADJECTIVES + NOUNS + VERBS + NUMBERS + COPY_WORDS)
        words |= {"count", "by", "copy", ":", "=", "is"}
        return sorted(words)

    def new_domain(self, n_subjects: int = 16) -> Domain:
        """A starship domain whose names, objects and some words are outside ``vocabulary()``."""
        _validate.positive_int("n_subjects", n_subjects)
        names = [f"{f} {s}" for f in DOMAIN_FIRST for s in DOMAIN_LAST]
        if n_subjects > len(names):
            raise ValueError(f"n_subjects must be at most {len(names)}, got {n_subjects}")
        ships = [names[i] for i in _rng(self.seed, "domain").permutation(len(names))[:n_subjects]]
        rng = _rng(self.seed, "domain objects")
        train, heldout = [], []
        for ship in ships:
            for rel in DOMAIN_RELATIONS:
                obj = str(rng.choice(rel.objects))
                held = int(rng.integers(len(rel.templates)))
                for t, text in enumerate(rel.templates):
                    before = text.split("{s}")[0].split()
                    fact = Fact(ship, rel.name, obj, t, text.format(s=ship), (1 + len(before), 3 + len(before)))
                    (heldout if t == held else train).append(fact)
        texts = [f.sentence for f in train] + [self._domain_sentence(rng, ships) for _ in range(4 * n_subjects)]
        known = set(self.vocabulary())
        words = {w for text in texts + [f.sentence for f in heldout] for w in text.split()}
        return Domain(tuple(sorted(words - known)), train, heldout, texts)

    @staticmethod
    def _domain_sentence(rng: np.random.Generator, ships: list[str]) -> str:
        ship = str(rng.choice(ships))
        forms = (f"the starship {ship} drifts past a nebula .", f"a comet glows near the orbit of {ship} .",
                 f"the hull of {ship} shines under twin suns .", f"a beacon pulses slowly near {ship} .")
        return forms[int(rng.integers(len(forms)))]
