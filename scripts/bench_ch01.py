"""Chapter 01 budgets: notebook wall time at defaults, kernel peak memory, widget point latency.

    python scripts/bench_ch01.py            # everything
    python scripts/bench_ch01.py --widget   # only the widget latency

Budgets (issue 2): notebook ≤ 90 s on 2 CPU cores, widget new point ≤ 3 s, cached point instant,
kernel peak memory ≤ 2 GB. Run on a quiet machine: other processes inflate the wall-clock times. The kernel's
CPU time is printed beside the wall time: with one thread (CL_LAB_THREADS=1) it approximates the wall time on a
quiet machine, and load from other processes inflates it far less than the wall time.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def widget_latency() -> None:
    from cl_lab import widgets
    from cl_lab.chapters import ch01

    cache = widgets.ResultCache()
    fixed = {"seed": 0, "device": "cpu"}
    ch01.first_task_model(**fixed)  # the notebook has trained task 1 before the widget appears
    for lr, steps in [(1e-3, 300), (3e-3, 300), (1e-4, 100)]:
        start = time.perf_counter()
        cache.get(ch01.second_task_point, {"lr": lr, "steps": steps, **fixed})
        new = time.perf_counter() - start
        start = time.perf_counter()
        cache.get(ch01.second_task_point, {"lr": lr, "steps": steps, **fixed})
        cached = time.perf_counter() - start
        print(f"widget point lr={lr:g} steps={steps}: new {new:.2f} s, cached {cached * 1e3:.3f} ms")


def notebook() -> None:
    import papermill as pm

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pm.execute_notebook(str(ROOT / "notebooks/01_forgetting.ipynb"), f"{tmp}/out.ipynb", kernel_name="python3",
                            progress_bar=False, cwd=str(ROOT / "notebooks"))
        seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"notebook 01 at defaults: {seconds:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s kernel CPU; "
          f"kernel peak memory {usage.ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widget", action="store_true", help="only the widget latency")
    args = parser.parse_args()
    widget_latency()
    if not args.widget:
        notebook()
