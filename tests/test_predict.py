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
