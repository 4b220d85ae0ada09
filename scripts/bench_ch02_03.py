"""Benchmarks for chapters 02–03: Fisher speed and exactness, method step costs, widget point latency.

Run: python scripts/bench_ch02_03.py [--threads N]. Prints the measured numbers. Every timing is the best of
interleaved repeats (``cl_lab.timing.best_times``); on a shared machine read the ratios (method step ÷ naive step,
loop ÷ batched) rather than the absolute times. Every sample is a seeded random draw (``Task.sample``).
"""

from __future__ import annotations

import argparse
import time

import torch

from cl_lab import fisher, models, timing, train
from cl_lab.chapters import ch02, ch03


def best_of(fn, repeats: int = 3) -> float:
    return timing.best_times({"fn": fn}, repeats=repeats, warmup=0)["fn"]


def bench_fisher(hidden: tuple[int, ...], n: int = 1000) -> None:
    stream = ch02.two_task_stream("domain")
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    first = ch03.first_task_only(stream)
    train.fit(model, first, steps=150, device="cpu", progress=False)
    x, y, _ = stream.tasks[0].sample(n, seed=0)
    for estimate in ("empirical", "exact"):
        batched = fisher.flatten(fisher.fisher_diagonal(model, x, y, estimate=estimate))
        start = time.perf_counter()
        loop = fisher.flatten(fisher.fisher_diagonal_loop(model, x, y, estimate=estimate))
        t_loop = time.perf_counter() - start  # one run: the loop takes seconds
        t_batched = best_of(lambda est=estimate: fisher.fisher_diagonal(model, x, y, estimate=est))
        err = ((batched - loop).abs().max() / loop.abs().max()).item()
        print(f"Fisher {estimate:>9} | MLP {hidden} | {n} samples | batched {t_batched:.4f} s | per-sample loop "
              f"{t_loop:.2f} s | speed-up {t_loop / t_batched:.0f}× | max rel. error {err:.1e}")


def vmap_empirical_fisher(model, x, y) -> torch.Tensor:
    """The empirical Fisher with torch.func per-sample gradients (the alternative to hooks)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def log_lik(p, xb, yb):
        logits = functional_call(model, p, (xb[None],))
        return torch.log_softmax(logits, dim=1)[0].gather(0, yb[None])[0]

    grads = vmap(grad(log_lik), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.pow(2).mean(0).reshape(-1) for g in grads.values()])


def bench_vmap(hidden: tuple[int, ...], n: int = 1000) -> None:
    stream = ch02.two_task_stream("domain")
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, hidden, stream.n_out)
    x, y, _ = stream.tasks[0].sample(n, seed=0)
    hooks = fisher.flatten(fisher.fisher_diagonal(model, x, y, estimate="empirical"))
    seconds = timing.best_times({"hooks": lambda: fisher.fisher_diagonal(model, x, y, estimate="empirical"),
                                 "vmap": lambda: vmap_empirical_fisher(model, x, y)}, repeats=3)
    t_hooks, t_vmap = seconds["hooks"], seconds["vmap"]
    err = ((vmap_empirical_fisher(model, x, y) - hooks).abs().max() / hooks.abs().max()).item()
    print(f"per-sample machinery | MLP {hidden} | hooks {t_hooks:.4f} s | torch.func vmap {t_vmap:.4f} s | "
          f"vmap ÷ hooks {t_vmap / t_hooks:.1f} | max rel. difference {err:.1e}")


def bench_steps(steps: int = 300) -> None:
    costs = ch03.step_costs(steps=steps, repeats=3)
    for name, seconds in costs.items():
        print(f"step {name:>5}: {seconds * 1e3:.2f} ms | ÷ naive {seconds / costs['naive']:.2f}")
    print("budgets: EWC ≤ 1.3×, SI ≤ 1.5×")
    print(ch03.consolidation_costs().round(2).to_string())


def bench_widgets() -> None:
    ch02.lambda_point(1e4, "exact")  # warm: first task trained, Fisher cached
    ch03.c_point(10.0)
    new_lam = best_of(lambda: ch02.lambda_point.__wrapped__(3e4, "exact"), repeats=1)
    new_c = best_of(lambda: ch03.c_point.__wrapped__(30.0), repeats=1)
    cached = best_of(lambda: ch02.lambda_point(1e4, "exact"), repeats=1)
    print(f"widget: new λ point {new_lam:.2f} s | new c point {new_c:.2f} s | cached point {cached * 1e3:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_fisher((100, 100))
    bench_fisher((400, 400))
    bench_vmap((100, 100))
    bench_vmap((400, 400))
    bench_steps()
    bench_widgets()
