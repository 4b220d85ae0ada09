"""Chapter 04's exercises: a class-balanced reservoir, and iCaRL's herding selection."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from cl_lab.exercises._core import Exercise, expect, register, unsolved
from cl_lab.methods.replay import ReplayBuffer, herding_order


def _positions(kept) -> list[int]:
    return [int(i) for i in kept]


# ---- Exercise 4.1 · A class-balanced reservoir ----------------------------------------------------------------

def class_balanced_reservoir(labels, size, generator):
    """labels: a list of int class labels, in stream order; size: the memory M; generator: a torch.Generator
    for every random draw. Returns the stream positions held at the end (a list of min(M, len(labels)) ints).

    While there is room, keep every item. Once full, an item of class c
      - evicts a random held item of a largest class if c holds fewer items than that class;
      - otherwise is kept with probability held_c / seen_c (a reservoir inside class c), in place of a random
        held item of class c.
    """
    memory, held, seen = [], {}, {}  # stream positions; per class: items held, items seen
    for position, c in enumerate(labels):
        seen[c] = seen.get(c, 0) + 1
        if len(memory) < size:
            memory.append(position)
            held[c] = held.get(c, 0) + 1
            continue
        largest = max(held.values())
        if held.get(c, 0) < largest:
            victims = [slot for slot, j in enumerate(memory) if held[labels[j]] == largest]
        elif torch.rand(1, generator=generator).item() < held[c] / seen[c]:
            victims = [slot for slot, j in enumerate(memory) if labels[j] == c]
        else:
            continue
        slot = victims[int(torch.randint(len(victims), (1,), generator=generator))]
        held[labels[memory[slot]]] -= 1
        held[c] = held.get(c, 0) + 1
        memory[slot] = position
    return memory


def _counts(labels: list[int], kept: list[int]) -> dict[int, int]:
    counts = {c: 0 for c in sorted(set(labels))}
    for i in kept:
        counts[labels[i]] += 1
    return counts


def _library_counts(labels: list[int], size: int) -> dict[int, int]:
    buffer, y = ReplayBuffer(size, "class_balanced", seed=0), torch.tensor(labels)
    buffer.add(torch.arange(len(y), dtype=torch.float32)[:, None], y, torch.zeros_like(y))  # x: the position
    return buffer.class_counts()


def _shuffled(labels: list[int], seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return [labels[i] for i in order]


def _class_balanced_properties(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    short = [0, 1, 1, 2, 0]
    expect(sorted(_positions(fn(short, 8, gen))) == list(range(5)), "a stream shorter than M is kept whole",
           list(range(5)), fn(short, 8, gen))
    imbalanced = [0] * 100 + [1] * 30 + [2] * 20  # class-incremental: sorted by class, 5:1.5:1
    kept = _positions(fn(imbalanced, 30, torch.Generator().manual_seed(1)))
    expect(len(kept) == 30 and len(set(kept)) == 30 and all(0 <= i < len(imbalanced) for i in kept),
           "holds M distinct stream positions", "30 distinct positions in 0..149", f"{len(set(kept))} distinct")
    counts = _counts(imbalanced, kept)
    expect(max(counts.values()) - min(counts.values()) <= 1,
           "a class-sorted, imbalanced stream (100, 30, 20 items; M = 30) ends balanced", "10 of each", counts)
    scarce = _shuffled([0] * 100 + [1] * 40 + [2] * 4, seed=2)
    counts = _counts(scarce, _positions(fn(scarce, 30, torch.Generator().manual_seed(2))))
    expect(counts == _library_counts(scarce, 30),
           "a class with fewer items than its share keeps them all, the others split the rest, as cl_lab's "
           "ReplayBuffer('class_balanced') does (shuffled stream)", _library_counts(scarce, 30), counts)
    stream, trials = [0] * 60 + [1] * 60, 200
    inclusion = np.zeros(60)
    for trial in range(trials):
        class_0 = [i for i in _positions(fn(stream, 20, torch.Generator().manual_seed(100 + trial))) if i < 60]
        inclusion[class_0] += 1
    p = stats.chisquare(inclusion, np.full(60, inclusion.sum() / 60)).pvalue
    first, last = inclusion[:20].mean() / trials, inclusion[40:].mean() / trials
    expect(p > 1e-3, "inside a class every item is equally likely to be held (a reservoir per class: χ² over "
           f"{trials} runs)", "10/60 ≈ 0.17 for early and late items alike",
           f"first third {first:.2f}, last third {last:.2f} (χ² p = {p:.1g})")


def _plain_reservoir(labels, size, generator):
    memory = []
    for position in range(len(labels)):
        if len(memory) < size:
            memory.append(position)
        else:
            slot = int(torch.randint(position + 1, (1,), generator=generator))
            if slot < size:
                memory[slot] = position
    return memory


def _keep_the_first_m(labels, size, generator):
    return list(range(min(size, len(labels))))


def _no_reservoir_inside_a_class(labels, size, generator):
    memory, held = [], {}
    for position, c in enumerate(labels):
        if len(memory) < size:
            memory.append(position)
            held[c] = held.get(c, 0) + 1
            continue
        largest = max(held.values())
        if held.get(c, 0) < largest:  # balancing only: once a class is at the largest count its new items drop
            victims = [slot for slot, j in enumerate(memory) if held[labels[j]] == largest]
            slot = victims[int(torch.randint(len(victims), (1,), generator=generator))]
            held[labels[memory[slot]]] -= 1
            held[c] = held.get(c, 0) + 1
            memory[slot] = position
    return memory


check_class_balanced_reservoir = register(Exercise(
    name="class_balanced_reservoir", chapter="04", title="A class-balanced reservoir", difficulty=3, minutes=25,
    stub=unsolved(class_balanced_reservoir), solution=class_balanced_reservoir,
    properties=_class_balanced_properties,
    wrong_answers={"a plain reservoir (the stream's class mix)": _plain_reservoir,
                   "keep the first M and nothing after": _keep_the_first_m,
                   "balancing only, no reservoir inside a class (later items of a full class dropped)":
                   _no_reservoir_inside_a_class}))


# ---- Exercise 4.2 · iCaRL's herding ---------------------------------------------------------------------------

def herding_selection(features, m):
    """features: [N, D] one class's features; m ≤ N. Returns a LongTensor [m] of row indices, in the order chosen.

    iCaRL (Rebuffi et al. 2017, Alg. 4): L2-normalise each row to φ, μ = the mean of φ. Step k = 1..m picks the
    not-yet-chosen row i that minimises ‖μ − (φ_i + Σ_{j<k} φ_{p_j}) / k‖: the running mean of the exemplars
    tracks the class mean.
    """
    phi = F.normalize(features, dim=1)  # [N, D]
    mu = phi.mean(0)  # [D]
    chosen, running = [], torch.zeros_like(mu)
    available = torch.ones(len(phi), dtype=torch.bool)
    for k in range(1, m + 1):
        distance = (mu - (running + phi) / k).norm(dim=1).masked_fill(~available, float("inf"))  # [N]
        i = int(distance.argmin())
        chosen.append(i)
        running += phi[i]
        available[i] = False
    return torch.tensor(chosen, dtype=torch.long)


def _herding_case(seed: int, n: int = 40, d: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, 1, generator=gen) * 4 + 0.2  # rows of very different norms
    return (torch.randn(n, d, generator=gen) + 0.8) * scales


def _herding_properties(fn) -> None:
    features = _herding_case(0)
    got = _positions(fn(features.clone(), 10))
    expect(len(got) == 10 and len(set(got)) == 10 and all(0 <= i < 40 for i in got),
           "returns m distinct row indices", "10 distinct indices in 0..39", got)
    everything = _positions(fn(features[:8].clone(), 8))
    expect(sorted(everything) == list(range(8)), "with m = N every row is chosen once", list(range(8)), everything)
    phi = F.normalize(features, dim=1)
    nearest = int((phi - phi.mean(0)).norm(dim=1).argmin())
    expect(got[0] == nearest, "the first exemplar is the normalised row nearest the class mean", nearest, got[0])
    for seed in (0, 1, 2):
        features = _herding_case(seed)
        want, got = herding_order(features, 12).tolist(), _positions(fn(features.clone(), 12))
        expect(got == want, f"equals cl_lab's herding_order, pick by pick (seed {seed})", want, got)


def _nearest_to_the_mean(features, m):
    phi = F.normalize(features, dim=1)
    return (phi - phi.mean(0)).norm(dim=1).argsort()[:m]


def _not_normalised(features, m):
    mu = features.mean(0)
    chosen, running = [], torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, m + 1):
        distance = (mu - (running + features) / k).norm(dim=1).masked_fill(~available, float("inf"))
        i = int(distance.argmin())
        chosen.append(i)
        running += features[i]
        available[i] = False
    return torch.tensor(chosen)


def _picks_may_repeat(features, m):
    phi = F.normalize(features, dim=1)
    mu = phi.mean(0)
    chosen, running = [], torch.zeros_like(mu)
    for k in range(1, m + 1):
        i = int((mu - (running + phi) / k).norm(dim=1).argmin())
        chosen.append(i)
        running += phi[i]
    return torch.tensor(chosen)


check_herding_selection = register(Exercise(
    name="herding_selection", chapter="04", title="iCaRL's herding", difficulty=2, minutes=20,
    stub=unsolved(herding_selection), solution=herding_selection, properties=_herding_properties,
    wrong_answers={"the m rows nearest the class mean": _nearest_to_the_mean,
                   "features not L2-normalised": _not_normalised,
                   "a chosen row may be chosen again": _picks_may_repeat}))
