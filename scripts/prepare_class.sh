#!/usr/bin/env bash
# Before class, once per machine: install the pinned set (as lab.sh does) and pretrain the tiny language model that
# chapters 09-13 share, at seed 0 (the chapters' default; about 2 min of one CPU core), into the one cache place
# every entry point reads: ~/.cache/cl_lab/lm/ (or $CL_LAB_CACHE/lm/). Other seeds: bash scripts/prepare_class.sh 0 1 2
source "$(dirname "$0")/_env.sh" lab
cd "$ROOT"
exec python - "$@" <<'PY'
import sys
import time

from cl_lab import lm

for seed in [int(s) for s in sys.argv[1:]] or [0]:
    start = time.perf_counter()
    lab = lm.tiny_lm(seed=seed)
    state = "pretrained" if lab.info["pretrained_now"] else "already there"
    print(f"tiny LM, seed {seed}: {state} ({time.perf_counter() - start:.0f} s), in {lab.info['cache']}")
PY
