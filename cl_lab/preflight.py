"""Before a workshop: execute every chapter headlessly and print chapter, seconds, claims checked/passed.

    python -m cl_lab.preflight            # every chapter at its default parameters
    python -m cl_lab.preflight --smoke    # the quick SMOKE variant
    python -m cl_lab.preflight 01 04      # only some chapters
    python -m cl_lab.preflight --seeds 0 1 2   # every chapter at each seed (or a range: --seeds 0-9)
    python -m cl_lab.preflight --ledger        # the claims ledger: every claim at seeds 0-9, into ledger/

With ``--seeds`` the table has one row per chapter and seed, and is also written to
``.ci-work/preflight/seeds.md`` with the date, so the README can quote the last run.

With ``--ledger`` (see ``cl_lab.ledger``) a failed claim is recorded and the chapter goes on, so every later
claim is measured too; each finished run goes into ``ledger/NN_<stem>.csv`` at once, and docs/ledger.md is
regenerated at the end. A (chapter, seed) the ledger already holds for the notebook's current code cells is
skipped, so a stopped run resumes where it stopped; a chapter whose code changed is measured again. After a change
in ``cl_lab`` that moves the numbers, delete the chapter's ledger file to measure it again. ``--jobs N`` runs N
kernels side by side (default 2 with ``--ledger``), each kept to one CPU thread (OMP_NUM_THREADS and
CL_LAB_THREADS, which ``cl_lab.pick_device`` applies), so they do not fight for the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from cl_lab import ledger
from cl_lab.check import FAIL_MARK, PASS_MARK, SKIP_MARK

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass
class ChapterResult:
    chapter: str
    seconds: float
    passed: int
    failed: int
    skipped: int
    error: str = ""
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed


def count_claims(nb) -> tuple[int, int, int]:
    """(passed, failed, skipped) claim lines in an executed notebook's outputs."""
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    return text.count(PASS_MARK), text.count(FAIL_MARK), text.count(SKIP_MARK)


@contextlib.contextmanager
def stderr_to(log: Path) -> Iterator[None]:
    """Send file descriptor 2, which the kernel inherits, to ``log``: its warnings stay out of the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CL_LAB_THREADS": "1"}


@contextlib.contextmanager
def kernel_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables that the kernel papermill starts inherits; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_chapter(path: Path, smoke: bool, timeout: int = 1800, seed: int | None = None,
                ledger_out: Path | None = None, one_thread: bool = False) -> ChapterResult:
    """Execute one chapter with papermill. With ``ledger_out`` its claims record failures without raising and
    write every measurement to that JSON file; with ``one_thread`` the kernel keeps to one CPU thread."""
    import papermill as pm

    start = time.perf_counter()
    error = ""
    parameters = {"SMOKE": smoke} if seed is None else {"SMOKE": smoke, "SEED": seed}
    suffix = "" if seed is None else f"-seed{seed}"
    out_path = Path(path.parent.parent / ".ci-work" / "preflight" / f"{path.stem}{suffix}.ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = out_path.with_suffix(".log")
    env = dict(ONE_THREAD) if one_thread else {}
    if ledger_out is not None:
        ledger_out.unlink(missing_ok=True)
        env.update(CL_LAB_CLAIMS="record", CL_LAB_LEDGER_OUT=str(ledger_out))
    try:
        with stderr_to(log), kernel_env(env):
            nb = pm.execute_notebook(str(path), str(out_path), parameters=parameters, kernel_name="python3",
                                     progress_bar=False, execution_timeout=timeout, cwd=str(path.parent))
    except Exception as exc:  # a failing claim or cell: report it in the table, keep going
        error = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        error += f" (executed notebook and kernel log: {out_path.parent})"
        import nbformat

        nb = nbformat.read(str(out_path), as_version=4) if out_path.exists() else nbformat.v4.new_notebook()
    passed, failed, skipped = count_claims(nb)
    return ChapterResult(path.stem, time.perf_counter() - start, passed, failed, skipped, error, seed)


@dataclass(frozen=True)
class Job:
    """One chapter at one seed (or at its default seed), as ``run_chapter`` takes it."""

    path: Path
    smoke: bool
    seed: int | None = None
    ledger_out: Path | None = None
    one_thread: bool = False
    timeout: int = 1800

    def run(self) -> ChapterResult:
        return run_chapter(self.path, self.smoke, self.timeout, self.seed, self.ledger_out, self.one_thread)


def run_jobs(jobs: list[Job], workers: int, done: Callable[[Job, ChapterResult], None]) -> list[ChapterResult]:
    """Run ``jobs`` with ``workers`` kernels side by side (separate processes, so each has its own stderr and
    environment); call ``done`` in this process as each finishes; return the results in the jobs' order."""
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(job.run())
            done(job, results[-1])
        return results
    results: dict[Job, ChapterResult] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(job.run): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results[job] = future.result()
            done(job, results[job])
    return [results[job] for job in jobs]


def parse_seeds(tokens: list[str]) -> list[int]:
    """["0-9"] or ["0", "1", "2"] or ["0-2", "5"] → the seeds, in order, each once."""
    seeds: list[int] = []
    for token in tokens:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", token.strip())
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"--seeds takes non-negative integers or ranges such as 0-9, got {token!r}")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return seeds


def format_table(results: list[ChapterResult]) -> str:
    seeded = any(r.seed is not None for r in results)
    seed_head = f" {'seed':>4}" if seeded else ""
    lines = [f"{'chapter':<28}{seed_head} {'seconds':>8} {'claims passed/checked':>22}  status",
             "-" * (77 if seeded else 72)]
    for r in results:
        checked = r.passed + r.failed
        status = "ok" if r.ok else f"FAILED: {r.error}"
        skipped = f" ({r.skipped} skipped)" if r.skipped else ""
        seed = f" {r.seed:>4}" if seeded else ""
        lines.append(f"{r.chapter:<28}{seed} {r.seconds:>8.1f} {f'{r.passed}/{checked}':>22}  {status}{skipped}")
    return "\n".join(lines)


def ledger_jobs(paths: list[Path], seeds: list[int], timeout: int) -> tuple[list[Job], list[str]]:
    """The (chapter, seed) runs the ledger still needs, and a line for each it already holds for this notebook."""
    jobs, skipped = [], []
    work = NOTEBOOKS.parent / ".ci-work" / "preflight" / "ledger"
    work.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fingerprint = ledger.notebook_hash(path)
        for seed in seeds:
            if ledger.has_run(ledger.LEDGER_DIR / f"{path.stem}.csv", seed, fingerprint):
                skipped.append(f"{path.stem} seed {seed}")
            else:
                jobs.append(Job(path, False, seed, work / f"{path.stem}-seed{seed}.json", True, timeout))
    return jobs, skipped


def record_in_ledger(job: Job, result: ChapterResult) -> None:
    """Store one finished run's claims in ledger/<chapter>.csv; a run that stopped on an error is not stored."""
    if result.error or job.ledger_out is None or not job.ledger_out.exists():
        print(f"  {result.chapter} seed {result.seed}: not stored in the ledger ({result.error or 'no claims'})")
        return
    rows = ledger.rows_from_records(job.ledger_out, job.seed, ledger.notebook_hash(job.path))
    ledger.store(ledger.LEDGER_DIR / f"{job.path.stem}.csv", job.seed, rows)


def report_progress(job: Job, result: ChapterResult) -> None:
    seed = "" if result.seed is None else f" seed {result.seed}"
    status = "ok" if result.ok else (f"FAILED: {result.error}" if result.error else f"{result.failed} failed")
    print(f"{result.chapter}{seed}: {result.seconds:.1f} s, {result.passed}/{result.passed + result.failed} "
          f"claims passed, {status}", flush=True)
    if job.ledger_out is not None:
        record_in_ledger(job, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers such as 01 04 (default: all)")
    parser.add_argument("--smoke", action="store_true", help="run the quick SMOKE variant")
    parser.add_argument("--seeds", nargs="+", metavar="SEED",
                        help="run every chapter once per seed (papermill -p SEED): 0 1 2, or a range 0-9")
    parser.add_argument("--ledger", action="store_true",
                        help="record every claim per seed in ledger/ (seeds 0-9 unless --seeds), then docs/ledger.md")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="kernels side by side, one CPU thread each (default 2 with --ledger, else 1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else (list(ledger.DEFAULT_SEEDS) if args.ledger else None)
    except ValueError as exc:
        parser.error(str(exc))
    if args.ledger and args.smoke:
        parser.error("--ledger measures the claims at the defaults; it cannot be combined with --smoke")
    workers = args.jobs or (2 if args.ledger else 1)
    if workers < 1:
        parser.error(f"--jobs must be at least 1, got {workers}")
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.chapters:
        paths = [p for p in paths if p.name[:2] in args.chapters]
    if not paths:
        parser.error(f"no chapter notebooks match {args.chapters or 'notebooks/NN_*.ipynb'}")
    if args.ledger:
        jobs, already = ledger_jobs(paths, seeds, args.timeout)
        if already:
            print(f"already in the ledger for the current notebooks, skipped: {', '.join(already)}")
    else:
        jobs = [Job(p, args.smoke, s, None, workers > 1, args.timeout) for p in paths for s in seeds or [None]]
    print(f"{len(jobs)} runs, {workers} side by side" + (", one thread each" if workers > 1 or args.ledger else ""),
          flush=True)
    start = time.perf_counter()
    results = run_jobs(jobs, workers, report_progress)
    table = format_table(results)
    print(table)
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s")
    if seeds and not args.ledger:
        record = NOTEBOOKS.parent / ".ci-work" / "preflight" / "seeds.md"
        record.write_text(f"preflight --seeds {' '.join(map(str, seeds))}, {time.strftime('%Y-%m-%d')}\n\n"
                          f"```\n{table}\n```\n")
        print(f"written to {record}")
    if args.ledger:
        ledger.PAGE.write_text(ledger.page(), encoding="utf-8")
        print(f"the ledger's page: {ledger.PAGE}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
