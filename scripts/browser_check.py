"""Check a chapter's playground in a real browser: JupyterLab, Run All, move a slider, see a new figure.

nbval and papermill execute the notebooks but never render a widget; this script is the one check that the
sliders a reader drags actually redraw the figure in JupyterLab, and how long that takes end to end.
It needs chromium, playwright and JupyterLab (``bash scripts/install_browser.sh``; never ``playwright install``):

    .venv/bin/python scripts/browser_check.py 01 --slider steps          # moves it one notch right
    .venv/bin/pytest -m browser tests/test_browser.py                     # the same check as an opt-in test

The notebook runs from a temporary copy (its SMOKE parameter set to True unless ``--full``), so
JupyterLab's autosave never writes outputs into the committed file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:
    raise SystemExit("browser_check needs playwright and chromium: bash scripts/install_browser.sh") from None

ROOT = Path(__file__).resolve().parents[1]


class BrowserCheckFailed(RuntimeError):
    """The playground did not do in the browser what a reader expects."""


@dataclass
class PlaygroundResult:
    notebook: str
    run_all_s: float  # Run All until every cell ran and the playground's figure was drawn
    slider: str
    old_value: str
    new_value: str
    redraw_s: float  # one notch of the slider until a new figure replaced the old one
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared_copy(chapter: str, folder: Path, smoke: bool) -> str:
    """Copy the chapter into ``folder``, with SMOKE = True in its parameters cell when ``smoke``."""
    matches = sorted((ROOT / "notebooks").glob(f"{chapter}_*.ipynb"))
    if len(matches) != 1:
        raise BrowserCheckFailed(f"chapter must name one notebook (e.g. 01), got {chapter!r}")
    nb = json.loads(matches[0].read_text())
    if smoke:
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        cell["source"] = [line.replace("SMOKE = False", "SMOKE = True") for line in cell["source"]]
    (folder / matches[0].name).write_text(json.dumps(nb))
    return matches[0].name


def start_lab(folder: Path, port: int) -> subprocess.Popen:
    """JupyterLab on ``folder``, with notebook windowing off so that off-screen cells stay in the page."""
    settings = folder / ".lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    # The kernel inherits the environment: a headless MPLBACKEND=Agg (the test scripts set it) would draw no figures.
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    lab = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip", "127.0.0.1",
           f"--port={port}", "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={folder}"]
    return subprocess.Popen(lab, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_for_server(port: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise BrowserCheckFailed(f"JupyterLab did not listen on port {port} within {seconds:.0f} s")


def widget_image(page):
    return page.locator(".widget-interact img").last


def accept_kernel_dialog(page) -> None:
    """JupyterLab sometimes asks which kernel to start although the notebook names one: take its choice."""
    select = page.locator(".jp-Dialog button", has_text="Select")
    try:
        select.wait_for(timeout=5_000)
    except PlaywrightTimeout:
        return
    select.click()


def wait_until_all_ran(page, timeout_s: float) -> None:
    """Until no cell is queued or running ("[*]"), so a slider's callback does not wait behind them."""
    page.wait_for_function("() => [...document.querySelectorAll('.jp-InputPrompt')]"
                           ".every(p => !p.innerText.includes('*'))", timeout=timeout_s * 1000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=timeout_s * 1000)


def report_failure(page, screenshot: Path) -> None:
    """Print what the page shows instead of the figure: errors, the interact widget, the kernel state."""
    for error in page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all():
        print("stderr output:", error.inner_text()[:800])
    status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
    interact = page.locator(".widget-interact")
    print(f"kernel {status}; interact widgets: {interact.count()}")
    if interact.count():
        print(interact.first.inner_text()[:800])
    page.screenshot(path=str(screenshot), full_page=True)


def move_slider(chapter: str, slider: str, smoke: bool = True, timeout_s: float = 300,
                failure_screenshot: Path = Path("browser_check_failure.png")) -> PlaygroundResult:
    """JupyterLab on a copy of the chapter, Run All, move ``slider`` one notch right, wait for the new figure."""
    with tempfile.TemporaryDirectory() as tmp:
        name = prepared_copy(chapter, Path(tmp), smoke)
        port = free_port()
        lab = start_lab(Path(tmp), port)
        try:
            wait_for_server(port)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
                try:
                    return _drive(browser.new_page(viewport={"width": 1400, "height": 1000}), port, name, slider,
                                  timeout_s, failure_screenshot)
                finally:
                    browser.close()
        finally:
            lab.terminate()
            lab.wait(timeout=30)


def _drive(page, port: int, name: str, slider: str, timeout_s: float, failure_screenshot: Path) -> PlaygroundResult:
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}")
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    accept_kernel_dialog(page)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)
    start = time.perf_counter()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("[data-command='runmenu:run-all']").click()
    try:
        widget_image(page).wait_for(timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        report_failure(page, failure_screenshot)
        raise
    wait_until_all_ran(page, timeout_s)
    run_all_s = time.perf_counter() - start
    before = widget_image(page).get_attribute("src")
    label = page.locator(".widget-label", has_text=re.compile(f"^{re.escape(slider)}$"))
    row = page.locator(".widget-interact .widget-slider", has=label).first
    readout = row.locator(".widget-readout")
    old_value = readout.inner_text().strip()
    row.locator(".noUi-handle").first.focus()
    start = time.perf_counter()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("([sel, old]) => { const i = [...document.querySelectorAll(sel)].pop();"
                           " return i && i.src !== old; }", arg=[".widget-interact img", before],
                           timeout=timeout_s * 1000)
    redraw_s = time.perf_counter() - start
    new_value = readout.inner_text().strip()
    if new_value == old_value:
        raise BrowserCheckFailed(f"the slider {slider!r} still reads {old_value!r} after ArrowRight")
    return PlaygroundResult(name, run_all_s, slider, old_value, new_value, redraw_s)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapter", help="chapter number, e.g. 01")
    parser.add_argument("--slider", required=True, help="the slider's description, e.g. steps; moved one notch right")
    parser.add_argument("--full", action="store_true", help="run at default parameters instead of SMOKE")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each figure")
    args = parser.parse_args()
    try:
        r = move_slider(args.chapter, args.slider, not args.full, args.timeout)
    except BrowserCheckFailed as exc:
        raise SystemExit(str(exc)) from None
    print(f"{r.notebook}: Run All, every cell done and the playground drawn: {r.run_all_s:.1f} s")
    print(f"{r.notebook}: slider {r.slider!r} {r.old_value} → {r.new_value}: new figure after {r.redraw_s:.2f} s")
