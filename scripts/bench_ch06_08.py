"""Benchmarks for chapters 06–08: seconds per run and per widget point, and speed ratios against naive
fine-tuning (ratios are robust on a shared CPU; absolute seconds are not).

Run: python scripts/bench_ch06_08.py   (set OMP_NUM_THREADS=1 on a busy 2-core machine)
"""

from __future__ import annotations

import time

from cl_lab import data, models, train
from cl_lab.chapters import ch06, ch07, ch08
from cl_lab.device import seed_everything
from cl_lab.methods.head_bias import make_remedy
from cl_lab.methods.isolation import PackNet, ProgNN, ProgressiveNet

STEPS = 100
HIDDEN = (100, 100)


def timed_fit(model, stream, method, **kwargs) -> float:
    seed_everything(0)
    return train.fit(model, stream, method, steps=STEPS, seed=0, progress=False, **kwargs).seconds


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    mnist = data.load("mnist")
    task_il = data.split(mnist, 5, scenario="task")
    class_il = data.split(mnist, 5, scenario="class")

    print(f"== chapter 06 (split MNIST Task-IL, 5 tasks × {STEPS} steps, MLP {HIDDEN}) ==")
    naive = timed_fit(models.MLP(784, HIDDEN, 10), task_il, None)
    prog = timed_fit(ProgressiveNet(784, HIDDEN, 10), task_il, ProgNN())
    pack = timed_fit(models.MLP(784, HIDDEN, 10), task_il, PackNet(0.5, retrain_steps=STEPS // 2))
    print(f"naive {naive:.2f} s | ProgNN {prog:.2f} s ({prog / naive:.1f}×) | PackNet incl. retraining "
          f"{pack:.2f} s ({pack / naive:.1f}×)")
    ch06.prune_ratio_point(0.5)  # load data once
    print(f"prune-ratio widget point: {timed(ch06.prune_ratio_point, 0.3):.2f} s")

    print(f"\n== chapter 07 (split MNIST Class-IL, buffer 200, {STEPS} steps per task) ==")
    naive_c = timed_fit(models.MLP(784, HIDDEN, 10), class_il, None)
    for remedy in ("er", "nme", "wa", "er-ace", "bic"):
        seconds = timed_fit(models.MLP(784, HIDDEN, 10), class_il, make_remedy(remedy, 200))
        print(f"{remedy:7s} {seconds:.2f} s ({seconds / naive_c:.1f}× naive)")
    ch07.remedy_point("er", 200, steps=60)  # load data once
    print(f"remedy widget point (60 steps per task): {timed(ch07.remedy_point, 'nme', 100, steps=60):.2f} s")

    print("\n== chapter 08 (split MNIST Class-IL, SGD lr 0.1) ==")
    cost = ch08.evaluation_overhead(class_il, HIDDEN)
    print(f"one training step {cost['train step'] * 1e3:.2f} ms, one evaluation of {cost['evaluated images']} images "
          f"{cost['evaluation'] * 1e3:.2f} ms: ratio {cost['ratio']:.1f}")
    rotated = data.rotated(mnist, (0, 80, 160), scenario="domain")
    cost_rot = ch08.evaluation_overhead(rotated, HIDDEN)
    print(f"rotated MNIST ({cost_rot['evaluated images']} images): ratio {cost_rot['ratio']:.1f}")
    for every in (None, 10, 1):
        seconds = timed_fit(models.MLP(784, HIDDEN, 10), class_il, ch08.make_method("er"), lr=0.1, optimizer="sgd",
                            eval_every=every)
        print(f"ER run, eval_every={every}: {seconds:.2f} s")
    ch08.gap_point(1, 0.5)  # first replay ratio: one training run
    print(f"gap widget point, new replay ratio: {timed(ch08.gap_point, 1, 0.25):.2f} s; "
          f"new interval, cached run: {timed(ch08.gap_point, 10, 0.25):.3f} s")


if __name__ == "__main__":
    main()
