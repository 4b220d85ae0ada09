import os

import nbformat
import pytest

from cl_lab import ledger, preflight


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


def test_seeds_take_a_list_or_a_range():
    assert preflight.parse_seeds(["0", "1", "2"]) == [0, 1, 2]
    assert preflight.parse_seeds(["0-9"]) == list(range(10))
    assert preflight.parse_seeds(["0-2", "5", "1"]) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="--seeds takes"):
        preflight.parse_seeds(["3-1"])


def test_kernel_env_is_set_for_the_run_and_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("CL_LAB_THREADS", raising=False)
    with preflight.kernel_env(preflight.ONE_THREAD):
        assert os.environ["OMP_NUM_THREADS"] == os.environ["CL_LAB_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "4" and "CL_LAB_THREADS" not in os.environ


# --- the ledger run, end to end on a tiny chapter executed by papermill --------------------------------------

FAKE_CHAPTER = [
    "SEED = 0\nSMOKE = False",
    "import os\nfrom cl_lab import check\ncheck.use_defaults(not SMOKE, chapter='98', seed=SEED)\n"
    "check.at_least(SEED * 0.1, 0.05, 'the effect grows with the seed')  # fails at seed 0",
    "for i in range(2):\n    check.greater(1.0 + i, 0.5, 'each run beats the null', margin=0.2)\n"
    "check.true(os.environ.get('OMP_NUM_THREADS') == '1', 'the kernel keeps to one thread', always=True)",
    "check.report()",
]


def _write_chapter(folder, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": ["parameters"]} if i == 0 else {})
                for i, src in enumerate(cells)]
    folder.mkdir(exist_ok=True)
    nbformat.write(nb, folder / "98_fake.ipynb")


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository of one chapter: notebooks/98_fake.ipynb, an empty ledger/ and docs/ledger.md."""
    _write_chapter(tmp_path / "notebooks", FAKE_CHAPTER)
    monkeypatch.setattr(preflight, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(ledger, "LEDGER_DIR", tmp_path / "ledger")
    monkeypatch.setattr(ledger, "NOTEBOOKS", tmp_path / "notebooks")
    monkeypatch.setattr(ledger, "PAGE", tmp_path / "ledger.md")
    return tmp_path


def test_ledger_run_records_every_claim_per_seed_resumes_and_reruns_a_changed_chapter(fake_repo, capsys):
    # seed 0 fails the first claim: recorded, the chapter goes on (exit 1 says a claim failed)
    assert preflight.main(["--ledger", "--seeds", "0", "1", "--jobs", "2"]) == 1
    rows = ledger.read("98")
    claims = [("the effect grows with the seed", 0), ("each run beats the null", 0), ("each run beats the null", 1),
              ("the kernel keeps to one thread", 0)]
    assert [(r["seed"], r["claim"], r["occurrence"]) for r in rows] == [(s, *c) for s in (0, 1) for c in claims]
    assert [r["status"] for r in rows] == ["FAILED"] + ["passed"] * 7
    assert rows[4]["value"] == pytest.approx(0.1) and rows[4]["low"] == 0.05
    assert (rows[2]["kind"], rows[2]["value"], rows[2]["margin"]) == ("greater", 1.5, pytest.approx(1.3))
    assert "the effect grows with the seed" in (fake_repo / "ledger.md").read_text()

    capsys.readouterr()
    assert preflight.main(["--ledger", "--seeds", "0-1"]) == 0  # nothing left to run
    assert "skipped: 98_fake seed 0, 98_fake seed 1" in capsys.readouterr().out

    _write_chapter(fake_repo / "notebooks", [*FAKE_CHAPTER[:-1], "check.at_most(SEED, 5, 'a new claim')",
                                             FAKE_CHAPTER[-1]])
    assert preflight.main(["--ledger", "--seeds", "1", "--jobs", "1"]) == 0  # the changed chapter runs again
    rows = ledger.read("98")
    assert {r["notebook_hash"] for r in rows if r["seed"] == 1} == {ledger.notebook_hash(
        fake_repo / "notebooks" / "98_fake.ipynb")}
    assert [r["claim"] for r in rows if r["seed"] == 1][-1] == "a new claim"
    assert len([r for r in rows if r["seed"] == 0]) == 4, "seed 0 keeps what it measured on the older notebook"


def test_the_ledger_measures_the_defaults_only(capsys):
    with pytest.raises(SystemExit):
        preflight.main(["--ledger", "--smoke"])
    assert "cannot be combined with --smoke" in capsys.readouterr().err
