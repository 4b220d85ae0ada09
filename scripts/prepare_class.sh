#!/usr/bin/env bash
# Before class, once per machine: install the pinned set (as lab.sh does) and check the tiny language model that
# chapters 09-14 share. Seed 0 (the chapters' default) ships with the package and only loads; every other seed you
# name pretrains once (about 2 min of one CPU core) into the one cache place every entry point reads:
# ~/.cache/cl_lab/lm/ (or $CL_LAB_CACHE/lm/). Example: bash scripts/prepare_class.sh 0 1 2
source "$(dirname "$0")/_env.sh" lab
cd "$ROOT"
exec python - "$@" <<'PY'
import sys
import time

from cl_lab import lm

for seed in [int(s) for s in sys.argv[1:]] or [0]:
    start = time.perf_counter()
    lab = lm.tiny_lm(seed=seed)
    state = "shipped" if lab.info.get("shipped") else "pretrained" if lab.info["pretrained_now"] else "already there"
    print(f"tiny LM, seed {seed}: {state} ({time.perf_counter() - start:.0f} s), in {lab.info['cache']}")
PY
