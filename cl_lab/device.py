"""Device choice and seeding: one call each, and the workbook says what it picked and why.

Thread policy, the same for every chapter: on the CPU, torch uses every core (its default, or
``OMP_NUM_THREADS``), which is fastest for one notebook on a quiet machine (2 threads: about 2× on the
chapters' MLPs, 1.4× on the tiny GPT-2). Several notebooks at once oversubscribe the cores and each slows
several-fold: set ``CL_LAB_THREADS=1`` (CI sets ``OMP_NUM_THREADS=1``) so each kernel keeps to one.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from cl_lab import _validate

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str | torch.device = "auto", *, verbose: bool = True) -> torch.device:
    """Return a torch.device; ``"auto"`` prefers cuda, then mps, then cpu, and prints which and why."""
    if isinstance(device, torch.device):
        return device
    _validate.one_of("device", device, DEVICES)
    if device != "auto":
        chosen, why = torch.device(device), "asked for"
    elif torch.cuda.is_available():
        chosen, why = torch.device("cuda"), f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        chosen, why = torch.device("mps"), "Apple MPS found"
    else:
        chosen, why = torch.device("cpu"), "no CUDA or MPS device found"
    if chosen.type == "cpu":
        why += f", {apply_thread_policy()} CPU threads"
    if verbose and device == "auto":
        print(f"cl_lab: using {chosen.type} ({why})")
    return chosen


def apply_thread_policy() -> int:
    """Set torch's CPU threads from ``CL_LAB_THREADS`` when given (else keep torch's default); return the count."""
    wanted = os.environ.get("CL_LAB_THREADS", "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"CL_LAB_THREADS must be a positive integer, got {wanted!r}")
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way for data order."""
    _validate.non_negative_int("seed", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
