"""scripts/longest_first.py: the notebooks in the order CI's nbval phase runs them, longest first by the README."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("longest_first", ROOT / "scripts" / "longest_first.py")
longest_first = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(longest_first)


def test_every_chapter_row_of_the_readme_is_timed():
    seconds = longest_first.seconds_by_chapter((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(seconds) == {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}


def test_longest_first_and_untimed_before_all():
    paths = [Path("notebooks/01_a.ipynb"), Path("notebooks/02_b.ipynb"), Path("notebooks/03_c.ipynb")]
    got = longest_first.longest_first(paths, {"01_a": 30.0, "02_b": 90.0})
    assert [p.stem for p in got] == ["03_c", "02_b", "01_a"]


def test_rows_read_approximate_and_annotated_times():
    readme = ("| [09_x](notebooks/09_x.ipynb) | badge | text | 146 s (120 s at two threads) | ready |\n"
              "| [10_y](notebooks/10_y.ipynb) | badge | text | ≈ 105 s | ready |\n")
    assert longest_first.seconds_by_chapter(readme) == {"09_x": 146.0, "10_y": 105.0}
