"""Timing claims that survive a busy machine: repeat, alternate the sides, keep each side's best.

Load from another process only ever adds time, so the fastest of many interleaved runs is the quantity a
claim can rest on. Alternating the sides (A, B, A, B, …) exposes both to the same bursts of load; a ratio
of two best times is then stable where one wall-clock ratio is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cl_lab import _validate


def best_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Fastest wall-clock seconds of each zero-argument callable over ``repeats`` interleaved rounds."""
    if not fns:
        raise ValueError("fns must name at least one callable, got an empty mapping")
    _validate.positive_int("repeats", repeats)
    _validate.non_negative_int("warmup", warmup)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def speedup(slow: Callable[[], object], fast: Callable[[], object], repeats: int = 5) -> float:
    """best(slow) / best(fast), measured interleaved."""
    t = best_times({"slow": slow, "fast": fast}, repeats)
    return t["slow"] / t["fast"]
