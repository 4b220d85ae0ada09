import re
from pathlib import Path

import nbformat
import pytest

from cl_lab.predict import reveal


def test_without_a_guess_only_the_measurement_shows():
    text = reveal(None, -0.42, "BWT")
    assert "measured -0.42" in text and "your guess" not in text


def test_a_guess_is_shown_beside_the_measurement_with_its_gap():
    text = reveal(-0.1, -0.4, "BWT", lesson="Forgetting is larger than most expect.")
    assert "your guess -0.1" in text and "-0.3" in text and "larger than most" in text


def test_a_guess_within_tolerance_counts_as_close():
    assert "close" in reveal(0.5, 0.52, "accuracy", tolerance=0.05)


def test_a_guess_that_is_not_a_number_is_a_clear_error():
    with pytest.raises(TypeError, match="guess must be a number"):
        reveal("high", 0.5, "accuracy")


CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem[:2])
def test_every_chapter_asks_for_a_prediction_and_reveals_it(notebook):
    """Each chapter leaves a PREDICT_* = None guess before its headline run and reveals it after."""
    code = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    guesses = re.findall(r"^(PREDICT_\w+) = None$", "\n".join(code), flags=re.MULTILINE)
    assert guesses, f"{notebook.name} has no PREDICT_… = None cell"
    for name in guesses:
        asked = next(i for i, source in enumerate(code) if re.search(rf"^{name} = None$", source, re.MULTILINE))
        assert any(f"predict.reveal({name}" in source for source in code[asked + 1:]), f"{name} is never revealed"
