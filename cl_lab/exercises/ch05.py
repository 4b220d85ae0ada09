"""Chapter 05 exercises: A-GEM's closed-form projection, and GEM's projection for two old tasks without a solver.

Both checkers work in float64 on small seeded random vectors and compare with ``cl_lab.methods.projection``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.methods.projection import agem_project as library_agem
from cl_lab.methods.projection import gem_project as library_gem

TOL = 1e-9


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _call(fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """Call ``fn`` on clones, check that it returned a tensor shaped like the first argument and left its inputs
    alone."""
    copies = [a.clone() for a in args]
    out = fn(*copies)
    expect(isinstance(out, torch.Tensor), "returns a torch.Tensor", "a tensor", type(out).__name__)
    expect(out.shape == args[0].shape, "returns a vector shaped like g [P]", tuple(args[0].shape), tuple(out.shape))
    expect(out.dtype == args[0].dtype, "keeps g's dtype", args[0].dtype, out.dtype)
    untouched = all(torch.equal(a, c) for a, c in zip(args, copies, strict=True))
    expect(untouched, "leaves its inputs unchanged (no in-place edits)", "inputs untouched", "an input was modified")
    return out


# --- Exercise 5.1 · A-GEM's projection ------------------------------------------------------------------------------

def _agem_stub(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """g, g_ref: [P]. Returns g̃ [P]: g itself if ⟨g, g_ref⟩ ≥ 0, else g minus its component along g_ref."""
    raise NotImplementedError


def _agem_solution(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """g, g_ref: [P]. Returns g̃ [P]: g itself if ⟨g, g_ref⟩ ≥ 0, else g minus its component along g_ref."""
    dot = g @ g_ref
    if dot >= 0:
        return g  # no conflict: A-GEM leaves the step alone
    return g - dot / (g_ref @ g_ref) * g_ref  # eq. 11: drop the component along g_ref


def _agem_always_projects(g, g_ref):
    return g - (g @ g_ref) / (g_ref @ g_ref) * g_ref


def _agem_unsquared_norm(g, g_ref):
    dot = g @ g_ref
    return g if dot >= 0 else g - dot / g_ref.norm() * g_ref


def _agem_wrong_sign(g, g_ref):
    dot = g @ g_ref
    return g if dot >= 0 else g + dot / (g_ref @ g_ref) * g_ref


def _agem_properties(fn: Callable) -> None:
    for seed, p in ((0, 2), (1, 7), (2, 50)):
        gen = _gen(seed)
        g, g_ref = _randn(gen, p), _randn(gen, p) * 3.0
        if g @ g_ref >= 0:
            g = -g  # a conflicting pair: the new step would raise the memory's loss
        helpful = -g  # ⟨−g, g_ref⟩ > 0: no conflict
        kept = _call(fn, helpful, g_ref)
        expect(torch.allclose(kept, helpful, rtol=0, atol=TOL), "with no conflict (⟨g, g_ref⟩ ≥ 0) g comes back "
               "unchanged", helpful[:3].tolist(), kept[:3].tolist())
        out = _call(fn, g, g_ref)
        scale = float(g.norm() * g_ref.norm())
        dot = float(out @ g_ref)
        expect(dot >= -TOL * scale, "after the projection ⟨g̃, g_ref⟩ ≥ 0 (no angle above 90° is left)", "≥ 0",
               f"{dot:.4g}")
        expect(abs(dot) <= TOL * scale, "a conflicting g lands on the boundary: ⟨g̃, g_ref⟩ = 0", 0.0, f"{dot:.4g}")
        removed = g - out  # must be a multiple of g_ref: the smallest change that satisfies the constraint
        residual = (removed - (removed @ g_ref) / (g_ref @ g_ref) * g_ref).norm()
        expect(residual <= TOL * float(g.norm()), "the change g − g̃ points along g_ref (the smallest change)", 0.0,
               f"{float(residual):.4g}")
        again = _call(fn, out, g_ref)
        expect(torch.allclose(again, out, rtol=0, atol=1e-7 * float(g.norm())), "projecting twice changes nothing "
               "(idempotent)", out[:3].tolist(), again[:3].tolist())
        expected = library_agem(g, g_ref)
        expect(torch.allclose(out, expected, rtol=1e-9, atol=TOL), "equals cl_lab's agem_project",
               expected[:3].tolist(), out[:3].tolist())


check_agem_projection = register(Exercise(
    name="agem_projection", chapter="05", title="A-GEM's projection", difficulty=1, minutes=10,
    stub=_agem_stub, solution=_agem_solution, properties=_agem_properties,
    wrong_answers={"projects even without a conflict": _agem_always_projects,
                   "divides by ‖g_ref‖, not ‖g_ref‖²": _agem_unsquared_norm,
                   "adds the component instead of removing it": _agem_wrong_sign},
))


# --- Exercise 5.2 · GEM's projection for two old tasks --------------------------------------------------------------

def _gem_stub(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """g: [P] the new gradient; G: [2, P] two old tasks' memory gradients. Returns g̃ [P], the vector closest
    to g with ⟨g̃, G[0]⟩ ≥ 0 and ⟨g̃, G[1]⟩ ≥ 0 (GEM with margin 0), without a QP solver."""
    raise NotImplementedError


def _gem_solution(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """g: [P] the new gradient; G: [2, P] two old tasks' memory gradients. Returns g̃ [P], the vector closest
    to g with ⟨g̃, G[0]⟩ ≥ 0 and ⟨g̃, G[1]⟩ ≥ 0 (GEM with margin 0), without a QP solver."""
    if (G @ g >= 0).all():
        return g  # already in the cone
    # The answer lies on the boundary planes of its active constraints: one, the other, or both.
    candidates = [g - (g @ gk) / (gk @ gk) * gk for gk in G]  # one plane ⟨v, g_k⟩ = 0
    lam = torch.linalg.solve(G @ G.T, G @ g)  # both planes: v = g − Gᵀλ with G v = 0
    candidates.append(g - G.T @ lam)
    tol = 1e-9 * float(g.norm() * G.norm())
    feasible = [v for v in candidates if bool((G @ v >= -tol).all())]
    return min(feasible, key=lambda v: float((v - g).norm()))  # the closest feasible candidate


def _gem_agem_on_the_mean(g, G):
    return _agem_solution(g, G.mean(0))


def _gem_one_after_the_other(g, G):
    for gk in G:
        dot = g @ gk
        if dot < 0:
            g = g - dot / (gk @ gk) * gk
    return g


def _gem_both_planes_always(g, G):
    if (G @ g >= 0).all():
        return g
    return g - G.T @ torch.linalg.solve(G @ G.T, G @ g)


def _gem_cases(seed: int, p: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, g, G) cases: already feasible, one active constraint, both active, and one whose single-plane
    projection breaks the other constraint."""
    gen = _gen(seed)
    g1, g2 = _randn(gen, p), _randn(gen, p)
    if g1 @ g2 < 0:
        g2 = -g2
    G = torch.stack([g1, g2])
    noise = 0.1 * _randn(gen, p)
    return [("a feasible g", g1 + g2 + noise, G),
            ("g against both old tasks", -(g1 + g2) + noise, G)]


def _gem_fixed_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    f64 = torch.float64
    section_1 = (torch.tensor([-1.6, -0.4], dtype=f64), torch.tensor([[1.0, 0.3], [-0.3, 1.0]], dtype=f64))
    # only ⟨g, g_2⟩ < 0, but g's projection on g_2's plane has ⟨·, g_1⟩ < 0: the answer is the apex (both active)
    crossing = (torch.tensor([1.0, -2.0, 0.5], dtype=f64),
                torch.tensor([[-1.0, -1.0, 0.0], [0.0, 1.0, 0.0]], dtype=f64))
    return [("section 1's picture (only g_1 violated)", *section_1),
            ("a g whose projection on g_2's plane breaks g_1's constraint", *crossing)]


def _gem_properties(fn: Callable) -> None:
    cases = _gem_cases(0, 6) + _gem_fixed_cases() + _gem_cases(1, 40)
    for what, g, G in cases:
        out = _call(fn, g, G)
        if bool((G @ g >= 0).all()):
            expect(torch.allclose(out, g, rtol=0, atol=TOL), f"{what}: a g that conflicts with no old task comes "
                   "back unchanged", g[:3].tolist(), out[:3].tolist())
            continue
        scale = float(g.norm() * G.norm())
        dots = (G @ out).tolist()
        expect(min(dots) >= -1e-7 * scale, f"{what}: ⟨g̃, g_k⟩ ≥ 0 for EVERY old task k", "both ≥ 0",
               [round(d, 4) for d in dots])
        expected = library_gem(g, G, margin=0.0, eps=0.0)
        gap = float((out - g).norm() - (expected - g).norm())
        expect(gap <= 1e-7 * float(g.norm()), f"{what}: no feasible vector is closer to g (g̃ is the projection)",
               f"‖g̃ − g‖ = {float((expected - g).norm()):.4f}", f"{float((out - g).norm()):.4f}")
        expect(torch.allclose(out, expected, rtol=1e-6, atol=1e-7), f"{what}: equals cl_lab's gem_project "
               "(margin 0)", expected[:3].tolist(), out[:3].tolist())


check_gem_two_constraints = register(Exercise(
    name="gem_two_constraints", chapter="05", title="GEM's projection for two old tasks, without a solver",
    difficulty=3, minutes=25, stub=_gem_stub, solution=_gem_solution, properties=_gem_properties,
    wrong_answers={"A-GEM on the mean of the two": _gem_agem_on_the_mean,
                   "one constraint after the other": _gem_one_after_the_other,
                   "both planes whenever there is a conflict": _gem_both_planes_always},
))
