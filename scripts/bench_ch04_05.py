"""Benchmarks for chapters 04 (replay) and 05 (GEM / A-GEM): the numbers the issue's budget asks for.

Prints: the cost of one step of each method relative to a naive step (batch 10, MLP 784-100-100-10, the
chapter-05 protocol) for K = 1..5 old tasks, and the samples each step sends through the network; the seconds
of one new playground point of each chapter; and
the per-step cost of ER with each buffer policy relative to naive on the chapter-04 setting. Wall-clock
numbers on a shared machine are noisy: read the ratios, and rerun on a quiet machine for absolute times.

    python scripts/bench_ch04_05.py
"""

from __future__ import annotations

import time

from cl_lab.chapters import ch04, ch05
from cl_lab.methods.replay import ER, POLICIES


def main() -> None:
    print("== chapter 05: one training step, relative to a naive step (best of 30, round-robin) ==")
    cost = ch05.step_cost([1, 2, 3, 4, 5], memory_per_task=256, repeats=30)
    print(cost.pivot(index="K", columns="method", values="ratio to naive").round(2).to_string())
    print("samples sent through the network per step (load-independent):")
    print(cost.pivot(index="K", columns="method", values="samples per step").to_string())
    ratio = cost.set_index(["K", "method"])["ratio to naive"]
    print(f"budget: A-GEM step ≤ 2.5× naive → measured {ratio[(5, 'A-GEM')]:.2f}× at K = 5")
    print(f"budget: GEM step at K = 5 ≤ 4× naive → measured {ratio[(5, 'GEM')]:.2f}× (256 memories per task), "
          f"{ratio[(5, 'GEM (10 memories per task per step)')]:.2f}× (10 per task per step)")

    print("\n== playground points (one new setting, seconds) ==")
    for policy, size in (("herding", 50), ("reservoir", 4000), ("gss", 200)):
        start = time.perf_counter()
        ch04.playground(policy, size)
        print(f"ch04 playground {policy:>9}, M = {size:>4}: {time.perf_counter() - start:.2f} s")
    for memories in (4, 64, 256):
        start = time.perf_counter()
        ch05.playground(memories)
        print(f"ch05 playground {memories:>3} memories per task: {time.perf_counter() - start:.2f} s")

    print("\n== chapter 04: seconds per ER step (Class-IL split MNIST, MLP 784-100-10, batch 64) ==")
    naive = ch04.step_seconds(lambda: None, steps=60, hidden=(100,))
    print(f"naive: {1e3 * naive:.2f} ms")
    for policy in POLICIES:
        per_step = ch04.step_seconds(lambda p=policy: ER(200, p), steps=60, hidden=(100,))
        print(f"ER {policy:>14}, M = 200: {1e3 * per_step:.2f} ms ({per_step / naive:.2f}× naive)")


if __name__ == "__main__":
    main()
