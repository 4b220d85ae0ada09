"""Device choice and seeding: one call each, and the workbook says what it picked and why."""

from __future__ import annotations

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
        return torch.device(device)
    if torch.cuda.is_available():
        chosen, why = torch.device("cuda"), f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        chosen, why = torch.device("mps"), "Apple MPS found"
    else:
        chosen, why = torch.device("cpu"), "no CUDA or MPS device found"
    if verbose:
        print(f"cl_lab: using {chosen.type} ({why})")
    return chosen


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way for data order."""
    _validate.non_negative_int("seed", seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
