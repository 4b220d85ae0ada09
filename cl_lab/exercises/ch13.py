"""Chapter 13 exercises: continual pretraining's re-warm + cosine re-decay learning rate, and a replay mix
counted in tokens rather than in sentences.

The schedule is compared with ``cl_lab.lm.cpt.lr_at(..., "rewarm")``; the replay count with the rule
``cl_lab.lm.cpt.TokenMixer`` follows (replayed tokens owed = s/(1 − s) of the new tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cl_lab.exercises._core import Exercise, expect, register, unsolved
from cl_lab.lm.cpt import lr_at

# --- Exercise 13.1 · Re-warm, then cosine re-decay to a floor -------------------------------------------------------


def rewarm_lr(step: int, steps: int, peak_lr: float, warmup: float, floor: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps`` (Ibrahim et al. 2024): linear from
    peak/W up to ``peak_lr`` over the first W = max(1, round(warmup·steps)) steps, then a cosine from ``peak_lr``
    at step W down to ``floor``·``peak_lr`` at the last step."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return peak_lr * (step + 1) / n_warm
    progress = (step - n_warm) / max(steps - 1 - n_warm, 1)  # 0 after the warm-up, 1 at the last step
    return peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_no_warmup(step, steps, peak_lr, warmup, floor):
    progress = step / max(steps - 1, 1)
    return peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _lr_decays_to_zero(step, steps, peak_lr, warmup, floor):
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return peak_lr * (step + 1) / n_warm
    progress = (step - n_warm) / max(steps - 1 - n_warm, 1)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def _lr_properties(fn: Callable) -> None:
    for steps, peak, warmup, floor in ((100, 1e-3, 0.1, 0.1), (37, 3e-4, 0.2, 0.25), (10, 1.0, 0.0, 0.0)):
        got = [float(fn(s, steps, peak, warmup, floor)) for s in range(steps)]
        n_warm = max(1, round(warmup * steps))
        case = f"steps={steps}, peak={peak}, warmup={warmup}, floor={floor}"
        expect(math.isclose(got[0], peak / n_warm, rel_tol=1e-9), f"{case}: step 0 starts at peak/W (the warm-up)",
               peak / n_warm, got[0])
        expect(math.isclose(max(got), peak, rel_tol=1e-9), f"{case}: the peak is reached", peak, max(got))
        expect(math.isclose(got[-1], floor * peak, rel_tol=1e-9, abs_tol=1e-15), f"{case}: the last step sits on "
               "the floor, floor·peak_lr", floor * peak, got[-1])
        want = [lr_at(s, steps, "rewarm", peak_lr=peak, warmup=warmup, floor=floor) for s in range(steps)]
        worst = max(range(steps), key=lambda s: abs(got[s] - want[s]))
        expect(math.isclose(got[worst], want[worst], rel_tol=1e-9, abs_tol=1e-15), f"{case}: equals cl_lab's "
               f"lr_at(..., 'rewarm') at every step (worst: step {worst})", want[worst], got[worst])


check_rewarm_lr = register(Exercise(
    name="rewarm_lr", chapter="13", title="Re-warm, then a cosine re-decay to a floor", difficulty=1, minutes=10,
    stub=unsolved(rewarm_lr), solution=rewarm_lr, properties=_lr_properties,
    wrong_answers={"no warm-up": _lr_no_warmup, "decays to 0 instead of the floor": _lr_decays_to_zero},
))


# --- Exercise 13.2 · A replay mix counted in tokens -----------------------------------------------------------------

def replay_count(new_lengths: list[int], old_lengths: list[int], share: float) -> int:
    """new_lengths: supervised tokens of each new-domain sentence in a batch; old_lengths: those of the replay
    pool's sentences, in the order they would be taken. Returns k, the fewest old sentences (the first k) whose
    tokens make replayed tokens at least ``share`` (0 ≤ share < 1) of all supervised tokens in the batch."""
    owed = share / (1 - share) * sum(new_lengths)  # replayed r with r / (N + r) ≥ s  ⇔  r ≥ s/(1 − s)·N
    k, got = 0, 0
    while got < owed:
        got += old_lengths[k]
        k += 1
    return k


def _replay_in_sentences(new_lengths, old_lengths, share):
    return math.ceil(share / (1 - share) * len(new_lengths))


def _replay_share_of_new_only(new_lengths, old_lengths, share):
    owed, k, got = share * sum(new_lengths), 0, 0
    while got < owed:
        got += old_lengths[k]
        k += 1
    return k


def _replay_cases() -> list[tuple[list[int], list[int], float]]:
    gen = torch.Generator().manual_seed(0)
    long_new = torch.randint(20, 40, (12,), generator=gen).tolist()  # long new-domain sentences
    short_old = torch.randint(3, 8, (200,), generator=gen).tolist()  # short old ones: sentences ≠ tokens
    return [(long_new, short_old, 0.0), (long_new, short_old, 0.25), (long_new, short_old, 0.5),
            (short_old[:30], long_new * 3, 0.2)]


def _replay_properties(fn: Callable) -> None:
    for new, old, share in _replay_cases():
        k = fn(list(new), list(old), share)
        expect(isinstance(k, int) and 0 <= k <= len(old), "returns a whole number of old sentences",
               f"an int in [0, {len(old)}]", k)
        total_new, replayed = sum(new), sum(old[:k])
        case = f"share={share}, {len(new)} new sentences ({total_new} tokens)"
        achieved = replayed / (total_new + replayed)
        expect(achieved >= share - 1e-12, f"{case}: replayed TOKENS are at least the share of all tokens",
               f"≥ {share}", round(achieved, 4))
        if k > 0:
            fewer = sum(old[:k - 1])
            expect(fewer / (total_new + fewer) < share, f"{case}: the fewest such sentences (k − 1 would fall short)",
                   replay_count(new, old, share), k)


check_replay_count = register(Exercise(
    name="replay_count", chapter="13", title="A replay mix counted in tokens", difficulty=2, minutes=15,
    stub=unsolved(replay_count), solution=replay_count, properties=_replay_properties,
    wrong_answers={"counted in sentences": _replay_in_sentences,
                   "share of the new tokens, not of all tokens": _replay_share_of_new_only},
))
