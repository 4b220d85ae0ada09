"""Predict, then run: the learner's guess beside the measurement.

Before a headline experiment a chapter asks one question and leaves a variable for the guess
(``PREDICT_BWT = None``); after it, ``reveal`` shows the guess beside what was measured and what the gap
means. With no guess (CI, the book) it shows only the measurement.
"""

from __future__ import annotations

from cl_lab import _validate
from cl_lab.check import GREEN, GREY, RESET


def reveal(guess: float | None, measured: float, what: str, *, lesson: str = "", tolerance: float = 0.0) -> str:
    """Print (and return) ``what``: the measured value, the guess beside it and the gap, then ``lesson``.

    ``tolerance``: a guess within it of the measurement counts as right. ``lesson`` says what the gap
    means (printed whether or not a guess was made, so the book reads the same)."""
    _validate.non_negative("tolerance", tolerance)
    if guess is not None and not isinstance(guess, (int, float)):
        raise TypeError(f"guess must be a number or None, got {type(guess).__name__}")
    lines = [f"{what}: measured {measured:.3g}"]
    if guess is None:
        lines[0] += f" {GREY}(no prediction written: set the variable above and re-run to compare){RESET}"
    else:
        gap = measured - guess
        verdict = f"{GREEN}close{RESET}" if abs(gap) <= tolerance else f"off by {gap:+.3g}"
        lines.append(f"your guess {guess:.3g}: {verdict}")
    if lesson:
        lines.append(lesson)
    text = "\n".join(lines)
    print(text)
    return text
