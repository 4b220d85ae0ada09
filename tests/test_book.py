"""The rendered book: check.report()'s claims table, and one chapter built and opened in headless Chromium."""

import pytest

from cl_lab import check


@pytest.fixture
def fresh_records():
    check.clear_records()
    check.use_defaults(True)
    yield
    check.clear_records()
    check.use_defaults(True)


def test_report_lists_every_claim_with_measured_bound_and_result(fresh_records):
    check.at_least(0.93, 0.90, "EWC keeps task 1 above 90 %")
    check.use_defaults(False)
    check.at_most(0.5, 0.1, "a lesson claim off the defaults")
    check.close(1.0, 1.0, "an identity", always=True)
    rows = check.report().rows
    assert [(r.claim, r.measured, r.bound, r.status) for r in rows] == [
        ("EWC keeps task 1 above 90 %", "0.93", "≥ 0.9", "passed"),
        ("a lesson claim off the defaults", "0.5", "≤ 0.1", "skipped"),
        ("an identity", "1", "≈ 1 (rtol=1e-05, atol=0)", "passed")]
    assert "parameters differ" in rows[1].note
    html = check.report()._repr_html_()
    assert html.count("<tr class=") == 3 and 'class="cl-lab-claims"' in html
    assert "3 claims checked: 2 passed, 1 skipped, 0 failed" in repr(check.report())


def test_report_records_a_failed_claim_and_escapes_html(fresh_records):
    with pytest.raises(check.ClaimFailed):
        check.greater(0.1, 0.2, "<b>gap</b> beyond the null", margin=0.05)
    (row,) = check.report().rows
    assert (row.measured, row.bound, row.status) == ("0.1", "> 0.2 + 0.05", "FAILED")
    assert "&lt;b&gt;gap" in check.report()._repr_html_()


def test_rerunning_a_cell_replaces_its_rows_and_a_loop_keeps_each(fresh_records, monkeypatch):
    cell = {"n": 1}
    monkeypatch.setattr(check, "_execution_count", lambda: cell["n"])
    for value in (0.95, 0.96):
        check.at_least(value, 0.9, "each seed keeps task 1")
    cell["n"] = 2  # the same cell run again
    for value in (0.97, 0.98):
        check.at_least(value, 0.9, "each seed keeps task 1")
    assert [r.measured for r in check.report().rows] == ["0.97", "0.98"]
