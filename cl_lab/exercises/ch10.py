"""Chapter 10's exercises: TIES's trim, elect and merge, and DARE's drop and rescale, on state dicts.

- ``ties``: the merged task vector of Yadav et al. (2023, arXiv 2306.01708, Algorithm 1), checked against
  ``merging.ties_merge`` and against hand-made cases that separate a global trim from a per-tensor one and a
  disjoint mean from a plain one.
- ``dare``: drop each entry with probability p and rescale the survivors by 1/(1 − p) (Yu et al. 2024, arXiv
  2311.03099, eq. 2–3), checked by its properties: each entry dropped or rescaled, the dropped share about p,
  the mean over many draws about τ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.methods import merging

State = dict[str, Tensor]

# ---------------------------------------------------------------- 10.1 · TIES: trim, elect, disjoint mean


def ties_stub(taus: list[State], density: float) -> State:
    """taus: K task vectors {name: tensor}, all with the same keys and shapes. Returns the TIES-merged task
    vector: trim each τ_k to its ``density`` share of largest-magnitude entries over the *whole* vector, elect
    one sign per entry (the sign of the summed trimmed values), and average only the trimmed entries that
    agree with it (zero where none does)."""
    raise NotImplementedError


def ties_solution(taus: list[State], density: float) -> State:
    trimmed = []
    for tau in taus:
        flat = torch.cat([v.reshape(-1) for v in tau.values()])  # [P]: one vector over every tensor
        k = int(density * flat.numel())
        threshold = flat.abs().topk(k).values.min() if k else math.inf
        trimmed.append({name: v * (v.abs() >= threshold) for name, v in tau.items()})
    merged = {}
    for name in taus[0]:
        values = torch.stack([t[name] for t in trimmed])  # [K, *shape]
        sign = torch.sign(values.sum(0))  # the elected sign, per entry
        agree = (torch.sign(values) == sign) & (values != 0)  # [K, *shape]
        merged[name] = (values * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged


def _ties_plain_mean(taus: list[State], density: float) -> State:
    trimmed = [merging.ties_trim(t, density) for t in taus]
    return {name: torch.stack([t[name] for t in trimmed]).mean(0) for name in taus[0]}


def _ties_per_tensor(taus: list[State], density: float) -> State:
    return merging.ties_merge({k: torch.zeros_like(v) for k, v in taus[0].items()}, taus, density, 1.0,
                              per_tensor=True)


def _random_taus(seed: int) -> list[State]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layer.weight": (16, 12), "layer.bias": (16,), "head.weight": (4, 16)}
    # the bias carries larger values: a global trim keeps more of it than a per-tensor trim does
    scale = {"layer.weight": 1.0, "layer.bias": 5.0, "head.weight": 0.3}
    return [{k: scale[k] * torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]


@torch.no_grad()
def _ties_properties(fn) -> None:
    one = {"w": torch.tensor([3.0, -1.0, 0.5, -4.0])}
    got = fn([one], 0.5)
    expect(isinstance(got, dict) and set(got) == {"w"}, "returns a state dict with the task vectors' keys", "{'w'}",
           sorted(got) if isinstance(got, dict) else type(got).__name__)
    expect(torch.allclose(got["w"], torch.tensor([3.0, 0.0, 0.0, -4.0])),
           "trim: one vector at density 0.5 keeps its two largest magnitudes", "[3, 0, 0, −4]", got["w"].tolist())
    a, b, c = ({"w": torch.tensor(v)} for v in ([2.0, 1.0], [4.0, -3.0], [-1.0, -2.5]))
    got = fn([a, b, c], 1.0)["w"]
    expect(torch.allclose(got, torch.tensor([3.0, -2.75])),
           "elect and disjoint mean: entry 0 sums to +5 (mean of 2 and 4), entry 1 to −4.5 (mean of −3 and −2.5)",
           "[3, −2.75]", [round(v, 4) for v in got.tolist()])
    taus = _random_taus(0)
    reference = merging.ties_merge({k: torch.zeros_like(v) for k, v in taus[0].items()}, taus, 0.2, 1.0)
    got = fn([{k: v.clone() for k, v in t.items()} for t in taus], 0.2)
    gap = max((got[k] - reference[k]).abs().max().item() for k in reference)
    expect(gap <= 1e-6, "random vectors at density 0.2 (trimmed over the whole vector) equal merging.ties_merge",
           "max |Δ| ≤ 1e-6", f"{gap:.2e}")


check_ties = register(Exercise(
    name="ties", chapter="10", title="TIES: trim, elect a sign, disjoint mean", difficulty=3, minutes=25,
    stub=ties_stub, solution=ties_solution, properties=_ties_properties,
    wrong_answers={"a plain mean (no sign election)": _ties_plain_mean, "trimmed tensor by tensor": _ties_per_tensor}))


# ---------------------------------------------------------------- 10.2 · DARE: drop and rescale


def dare_stub(tau: State, p: float, generator: torch.Generator) -> State:
    """tau: a task vector {name: tensor}; p: the drop rate in [0, 1); generator: a CPU torch.Generator for the
    random mask. Returns DARE_p(τ): each entry set to zero with probability p, every survivor divided by 1 − p."""
    raise NotImplementedError


def dare_solution(tau: State, p: float, generator: torch.Generator) -> State:
    out = {}
    for name, v in tau.items():
        keep = torch.rand(v.shape, generator=generator) >= p  # each entry survives with probability 1 − p
        out[name] = v * keep / (1 - p)  # so that E[DARE_p(τ)] = τ
    return out


def _dare_no_rescale(tau: State, p: float, generator: torch.Generator) -> State:
    return {name: v * (torch.rand(v.shape, generator=generator) >= p) for name, v in tau.items()}


def _dare_keeps_p(tau: State, p: float, generator: torch.Generator) -> State:
    return {name: v * (torch.rand(v.shape, generator=generator) < p) / (1 - p) for name, v in tau.items()}


@torch.no_grad()
def _dare_properties(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    tau = {"a.weight": torch.randn(100, 200, generator=gen), "a.bias": torch.randn(200, generator=gen)}
    p = 0.9
    out = fn({k: v.clone() for k, v in tau.items()}, p, torch.Generator().manual_seed(1))
    expect(isinstance(out, dict) and set(out) == set(tau), "returns a state dict with τ's keys", sorted(tau),
           sorted(out) if isinstance(out, dict) else type(out).__name__)
    values, original = torch.cat([out[k].reshape(-1) for k in tau]), torch.cat([tau[k].reshape(-1) for k in tau])
    kept = values != 0
    rescaled = torch.allclose(values[kept], original[kept] / (1 - p), rtol=1e-5)
    expect(rescaled, "every survivor is τ's entry divided by 1 − p (the rescale)", "τ/(1 − p) = 10·τ at p = 0.9",
           f"survivor/τ ratios from {(values[kept] / original[kept]).min().item():.3g}"
           f" to {(values[kept] / original[kept]).max().item():.3g}")
    n, dropped = len(values), 1 - kept.double().mean().item()
    sd = math.sqrt(p * (1 - p) / n)
    expect(abs(dropped - p) <= 5 * sd, "each entry is dropped with probability p",
           f"a dropped share of {p} ± {5 * sd:.3f}", f"{dropped:.3f}")
    draws = torch.stack([fn({"w": torch.ones(2000)}, 0.5, torch.Generator().manual_seed(10 + i))["w"]
                         for i in range(200)])  # [200, 2000]
    mean = draws.mean().item()
    expect(abs(mean - 1) <= 0.02, "unbiased: over many draws the mean of DARE_p(τ) is τ", "1.00 ± 0.02 for τ = 1",
           f"{mean:.3f}")
    same = fn({k: v.clone() for k, v in tau.items()}, 0.0, torch.Generator().manual_seed(2))
    expect(all(torch.equal(same[k], tau[k]) for k in tau), "p = 0 returns τ unchanged")


check_dare = register(Exercise(
    name="dare", chapter="10", title="DARE: drop, then rescale", difficulty=1, minutes=10,
    stub=dare_stub, solution=dare_solution, properties=_dare_properties,
    wrong_answers={"without the rescale": _dare_no_rescale, "keeps each entry with probability p": _dare_keeps_p}))
