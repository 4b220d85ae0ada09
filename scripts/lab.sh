#!/usr/bin/env bash
# Install everything (pinned) into .venv and open the workbook in JupyterLab.
source "$(dirname "$0")/_env.sh" lab
cd "$ROOT"
unset MPLBACKEND
as_root=()
[ "$(id -u)" = 0 ] && as_root=(--allow-root)  # containers and cloud VMs often run as root; Jupyter refuses without it
exec jupyter lab "${as_root[@]}" "$@" notebooks/
