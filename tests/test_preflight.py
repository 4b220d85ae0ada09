import os

import nbformat

from cl_lab import preflight


def _executed(*lines):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("...")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="\n".join(lines))]
    nb.cells = [cell]
    return nb


def test_counts_passed_failed_and_skipped_claims():
    nb = _executed("✓ claim: a [1 ≥ 0]", "✓ claim: b [1 ≥ 0]", "✗ claim: c [0 ≥ 1]",
                   "↷ claim skipped: d (parameters differ)")
    assert preflight.count_claims(nb) == (2, 1, 1)


def test_table_shows_seconds_claims_and_failures():
    ok = preflight.ChapterResult("01_forgetting", 61.5, 24, 0, 0)
    bad = preflight.ChapterResult("02_ewc_fisher", 80.0, 3, 1, 0, error="ClaimFailed: EWC keeps task 1")
    table = preflight.format_table([ok, bad])
    assert "01_forgetting" in table and "61.5" in table and "24/24" in table and "ok" in table
    assert "3/4" in table and "FAILED: ClaimFailed" in table
    assert ok.ok and not bad.ok


def test_kernel_stderr_goes_to_the_log_and_comes_back(tmp_path, capfd):
    log = tmp_path / "chapter.log"
    with preflight.stderr_to(log):
        os.write(2, b"Kernel is running over TCP without encryption\n")
    os.write(2, b"after\n")
    assert "without encryption" in log.read_text()
    assert capfd.readouterr().err == "after\n"


def test_seeded_table_has_a_row_per_chapter_and_seed():
    rows = [preflight.ChapterResult("04_replay", 50.0, 23, 0, 0, seed=s) for s in (0, 1)]
    rows.append(preflight.ChapterResult("04_replay", 51.0, 22, 1, 0, error="ClaimFailed: x", seed=2))
    lines = preflight.format_table(rows).splitlines()
    assert "seed" in lines[0]
    assert [line.split()[1] for line in lines[2:]] == ["0", "1", "2"]
    assert "22/23" in lines[-1] and "FAILED" in lines[-1]
