#!/usr/bin/env bash
# For instructors before a workshop: execute every chapter headlessly and print
# chapter | seconds | claims checked/passed. Pass --smoke for the quick variant, or chapter numbers.
source "$(dirname "$0")/_env.sh" test
cd "$ROOT"
exec python -m cl_lab.preflight "$@"
