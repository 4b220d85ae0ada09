"""Opt-in: one chapter's playground in a real JupyterLab, in headless Chromium — Run All, move a slider one notch,
wait for the redrawn figure. Deselected by default (marker ``browser``); run it with

    pytest -m browser tests/test_browser.py

It needs chromium, playwright and JupyterLab (bash scripts/install_browser.sh) and skips without chromium."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER, SLIDER = "05", "memories"  # any chapter's playground: python scripts/browser_check.py NN --slider NAME

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="chromium is absent: bash scripts/install_browser.sh")]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_playground_slider_redraws_the_figure_in_jupyterlab():
    pytest.importorskip("jupyterlab", reason="JupyterLab is absent: bash scripts/install_browser.sh")
    browser_check = _load("browser_check")
    shot = ROOT / ".ci-work" / f"browser-{CHAPTER}-failure.png"
    shot.parent.mkdir(exist_ok=True)
    result = browser_check.move_slider(CHAPTER, SLIDER, smoke=True, timeout_s=300, failure_screenshot=shot)
    print(f"{result.notebook}: Run All {result.run_all_s:.1f} s; {SLIDER} {result.old_value} → {result.new_value}, "
          f"new figure after {result.redraw_s:.2f} s")
    assert result.new_value != result.old_value
    assert result.redraw_s < 60, "one slider notch should redraw in seconds"
