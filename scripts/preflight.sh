#!/usr/bin/env bash
# For instructors before a workshop: execute every chapter headlessly and print
# chapter | seconds | claims checked/passed. Pass --smoke for the quick variant, or chapter numbers.
# --seeds 0 1 2 (or 0-9) runs each chapter at each seed; --ledger records every claim per seed in ledger/
# and regenerates docs/ledger.md (resumable; --jobs N kernels side by side, one thread each).
source "$(dirname "$0")/_env.sh" test
cd "$ROOT"
exec python -m cl_lab.preflight "$@"
