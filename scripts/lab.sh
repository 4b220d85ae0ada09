#!/usr/bin/env bash
# Install everything (pinned) into .venv and open the workbook in JupyterLab.
source "$(dirname "$0")/_env.sh" lab
cd "$ROOT"
unset MPLBACKEND
exec jupyter lab "$@" notebooks/
