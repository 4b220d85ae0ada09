"""Before a workshop: execute every chapter headlessly and print chapter, seconds, claims checked/passed.

    python -m cl_lab.preflight            # every chapter at its default parameters
    python -m cl_lab.preflight --smoke    # the quick SMOKE variant
    python -m cl_lab.preflight 01 04      # only some chapters
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


def run_chapter(path: Path, smoke: bool, timeout: int = 1800) -> ChapterResult:
    import papermill as pm

    start = time.perf_counter()
    error = ""
    out_path = Path(path.parent.parent / ".ci-work" / "preflight" / path.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = out_path.with_suffix(".log")
    try:
        with stderr_to(log):
            nb = pm.execute_notebook(str(path), str(out_path), parameters={"SMOKE": smoke}, kernel_name="python3",
                                     progress_bar=False, execution_timeout=timeout, cwd=str(path.parent))
    except Exception as exc:  # a failing claim or cell: report it in the table, keep going
        error = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        error += f" (executed notebook and kernel log: {out_path.parent})"
        import nbformat

        nb = nbformat.read(str(out_path), as_version=4) if out_path.exists() else nbformat.v4.new_notebook()
    passed, failed, skipped = count_claims(nb)
    return ChapterResult(path.stem, time.perf_counter() - start, passed, failed, skipped, error)


def format_table(results: list[ChapterResult]) -> str:
    lines = [f"{'chapter':<28} {'seconds':>8} {'claims passed/checked':>22}  status",
             "-" * 72]
    for r in results:
        checked = r.passed + r.failed
        status = "ok" if r.ok else f"FAILED: {r.error}"
        skipped = f" ({r.skipped} skipped)" if r.skipped else ""
        lines.append(f"{r.chapter:<28} {r.seconds:>8.1f} {f'{r.passed}/{checked}':>22}  {status}{skipped}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers such as 01 04 (default: all)")
    parser.add_argument("--smoke", action="store_true", help="run the quick SMOKE variant")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.chapters:
        paths = [p for p in paths if p.name[:2] in args.chapters]
    if not paths:
        parser.error(f"no chapter notebooks match {args.chapters or 'notebooks/NN_*.ipynb'}")
    results = []
    for path in paths:
        print(f"running {path.name} …", flush=True)
        results.append(run_chapter(path, args.smoke))
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
