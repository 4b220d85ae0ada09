#!/usr/bin/env bash
# Chromium (Debian package) and playwright + JupyterLab (pinned, into the project's venv) for the book's browser
# test and the opt-in playground test. Idempotent: installs only what is missing. Never runs `playwright install`
# (that downloads a browser build, which fails offline); playwright drives the system chromium instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CL_LAB_VENV:-$ROOT/.venv}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v chromium >/dev/null 2>&1; then
  echo "cl-lab: chromium present ($(command -v chromium))"
elif command -v apt-get >/dev/null 2>&1; then
  echo "cl-lab: installing chromium (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
else
  echo "cl-lab: no chromium and no apt-get: install Chromium with your package manager; the browser tests skip until then" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  # A fresh clone: scripts/test.sh makes the venv and installs playwright with the test extra.
  echo "cl-lab: no virtual environment at $VENV yet: playwright comes with scripts/test.sh (the test extra);"
  echo "cl-lab: run this script again afterwards for JupyterLab (the opt-in test: pytest -m browser)"
elif "$VENV/bin/python" -c "import playwright, jupyterlab" 2>/dev/null; then
  echo "cl-lab: playwright and jupyterlab present in $VENV"
else
  echo "cl-lab: installing playwright and jupyterlab (pinned) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ROOT/requirements/constraints.txt" \
    playwright jupyterlab 2> >(grep -v "^WARNING: Location" >&2)
fi
