#!/usr/bin/env bash
# Install what the tests need and run the whole suite: lint, unit tests, notebooks under papermill
# (SMOKE variant) and under nbval (default parameters, claims checked). Fails loudly on the first error.
source "$(dirname "$0")/_env.sh" test
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # two pytest workers on two cores: one thread each
echo "== ruff"
ruff check cl_lab tests scripts notebooks
# Two workers take whole files; the longest files go first, so neither worker waits alone on a long last one.
echo "== unit tests and papermill variants"
pytest -n 2 --dist loadfile -q tests/test_notebooks.py $(ls tests/test_*.py | grep -v '^tests/test_notebooks.py$')
echo "== notebooks at default parameters (nbval), longest first"
pytest -n 2 --dist loadfile -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-cell-timeout 900 $(python scripts/longest_first.py)
