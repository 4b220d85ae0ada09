"""Before a workshop: execute every chapter headlessly and print chapter, seconds, claims checked/passed.

    python -m cl_lab.preflight            # every chapter at its default parameters
    python -m cl_lab.preflight --smoke    # the quick SMOKE variant
    python -m cl_lab.preflight 01 04      # only some chapters
    python -m cl_lab.preflight --seeds 0 1 2   # every chapter at each seed: the ranges the prose states

With ``--seeds`` the table has one row per chapter and seed, and is also written to
``.ci-work/preflight/seeds.md`` with the date, so the README can quote the last run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def run_chapter(path: Path, smoke: bool, timeout: int = 1800, seed: int | None = None) -> ChapterResult:
    import papermill as pm

    start = time.perf_counter()
    error = ""
    parameters = {"SMOKE": smoke} if seed is None else {"SMOKE": smoke, "SEED": seed}
    suffix = "" if seed is None else f"-seed{seed}"
    out_path = Path(path.parent.parent / ".ci-work" / "preflight" / f"{path.stem}{suffix}.ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = out_path.with_suffix(".log")
    try:
        with stderr_to(log):
            nb = pm.execute_notebook(str(path), str(out_path), parameters=parameters, kernel_name="python3",
                                     progress_bar=False, execution_timeout=timeout, cwd=str(path.parent))
    except Exception as exc:  # a failing claim or cell: report it in the table, keep going
        error = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        error += f" (executed notebook and kernel log: {out_path.parent})"
        import nbformat

        nb = nbformat.read(str(out_path), as_version=4) if out_path.exists() else nbformat.v4.new_notebook()
    passed, failed, skipped = count_claims(nb)
    return ChapterResult(path.stem, time.perf_counter() - start, passed, failed, skipped, error, seed)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers such as 01 04 (default: all)")
    parser.add_argument("--smoke", action="store_true", help="run the quick SMOKE variant")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="run every chapter once per seed (papermill -p SEED) and report claims per seed")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.chapters:
        paths = [p for p in paths if p.name[:2] in args.chapters]
    if not paths:
        parser.error(f"no chapter notebooks match {args.chapters or 'notebooks/NN_*.ipynb'}")
    results = []
    for path in paths:
        for seed in args.seeds or [None]:
            print(f"running {path.name}" + ("" if seed is None else f" at seed {seed}") + " …", flush=True)
            results.append(run_chapter(path, args.smoke, seed=seed))
    table = format_table(results)
    print(table)
    if args.seeds:
        record = NOTEBOOKS.parent / ".ci-work" / "preflight" / "seeds.md"
        record.write_text(f"preflight --seeds {' '.join(map(str, args.seeds))}, {time.strftime('%Y-%m-%d')}\n\n"
                          f"```\n{table}\n```\n")
        print(f"written to {record}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
