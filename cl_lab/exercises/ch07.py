"""Chapter 07 exercises: Weight Aligning of a Class-IL head, and BiC's bias layer on the newest classes' logits.

The checkers compare with ``cl_lab.methods.head_bias`` (``align_weights``, ``BiC.logits``) on small seeded heads.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.methods.head_bias import BiC, align_weights

# --- Exercise 7.1 · Weight Aligning ---------------------------------------------------------------------------------


def _wa_stub(weight: torch.Tensor, bias: torch.Tensor, old: list[int], new: list[int]):
    """weight: [C, H] head rows; bias: [C]; old, new: class indices. Returns (weight', bias', gamma): copies in
    which the new rows and their biases are multiplied by gamma = mean_old ‖w_c‖ / mean_new ‖w_c‖ (a float)."""
    raise NotImplementedError


def _wa_solution(weight: torch.Tensor, bias: torch.Tensor, old: list[int], new: list[int]):
    """weight: [C, H] head rows; bias: [C]; old, new: class indices. Returns (weight', bias', gamma): copies in
    which the new rows and their biases are multiplied by gamma = mean_old ‖w_c‖ / mean_new ‖w_c‖ (a float)."""
    norms = weight.norm(dim=1)  # [C]: one norm per class row
    gamma = (norms[old].mean() / norms[new].mean()).item()
    weight, bias = weight.clone(), bias.clone()
    weight[new] *= gamma  # only the new rows: the old ones set the scale
    bias[new] *= gamma  # so every new-class logit is scaled by gamma
    return weight, bias, gamma


def _wa_scales_old_rows(weight, bias, old, new):
    norms = weight.norm(dim=1)
    gamma = (norms[new].mean() / norms[old].mean()).item()
    weight, bias = weight.clone(), bias.clone()
    weight[old] *= gamma
    bias[old] *= gamma
    return weight, bias, gamma


def _wa_forgets_bias(weight, bias, old, new):
    weight, _, gamma = _wa_solution(weight, bias, old, new)
    return weight, bias.clone(), gamma


def _wa_each_row_to_the_old_mean(weight, bias, old, new):
    norms = weight.norm(dim=1)
    target = norms[old].mean()
    weight, bias = weight.clone(), bias.clone()
    scale = target / norms[new]  # one factor per row: equal norms, but the rows' proportions are lost
    weight[new] *= scale[:, None]
    bias[new] *= scale
    return weight, bias, (target / norms[new].mean()).item()


def _wa_case(seed: int, n_classes: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_classes, hidden, generator=gen, dtype=torch.float64)
    weight[-2:] *= 1.5  # the last classes' rows are longer, as after training on them
    return weight, torch.randn(n_classes, generator=gen, dtype=torch.float64)


def _wa_properties(fn: Callable) -> None:
    cases = ((0, 10, 6, list(range(6)), [6, 7]), (1, 6, 4, [0, 1, 3, 4], [2, 5]), (2, 10, 8, list(range(8)), [8, 9]))
    for seed, n_classes, hidden, old, new in cases:
        weight, bias = _wa_case(seed, n_classes, hidden)
        w_in, b_in = weight.clone(), bias.clone()
        out = fn(w_in, b_in, list(old), list(new))
        expect(isinstance(out, tuple) and len(out) == 3, "returns (weight, bias, gamma)", "a 3-tuple",
               type(out).__name__)
        w, b, gamma = out
        expect(w.shape == weight.shape and b.shape == bias.shape, "keeps the head's shapes",
               (tuple(weight.shape), tuple(bias.shape)), (tuple(w.shape), tuple(b.shape)))
        expect(torch.equal(w_in, weight) and torch.equal(b_in, bias), "leaves the input head unchanged (returns "
               "copies)", "inputs untouched", "an input was modified")
        untouched = [c for c in range(n_classes) if c not in new]
        expect(torch.equal(w[untouched], weight[untouched]) and torch.equal(b[untouched], bias[untouched]),
               f"old rows {old} (and rows of classes not seen yet) stay exactly as they were", "unchanged",
               "changed")
        old_mean, new_mean = w[old].norm(dim=1).mean().item(), w[new].norm(dim=1).mean().item()
        expect(abs(old_mean - new_mean) <= 1e-9 * old_mean, "afterwards the new rows' mean norm equals the old rows'",
               f"{old_mean:.4f}", f"{new_mean:.4f}")
        ratios = (w[new].norm(dim=1) / weight[new].norm(dim=1)).tolist()
        expect(max(ratios) - min(ratios) <= 1e-9, "one γ for every new row: their directions and relative norms are "
               "kept", "equal scale factors", [round(r, 4) for r in ratios])
        expect(torch.allclose(b[new], bias[new] * ratios[0], rtol=1e-9, atol=0), "the new biases are scaled by the "
               "same γ (so every new logit is)", (bias[new] * ratios[0]).tolist(), b[new].tolist())
        head = nn.Linear(hidden, n_classes).double()
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        expected_gamma = align_weights(head, list(old), list(new))
        expect(abs(float(gamma) - expected_gamma) <= 1e-9, "the returned γ equals cl_lab's align_weights",
               f"{expected_gamma:.5f}", f"{float(gamma):.5f}")
        expect(torch.allclose(w, head.weight.detach()) and torch.allclose(b, head.bias.detach()),
               "the aligned head equals cl_lab's align_weights", "the same rows", "different rows")


check_weight_align = register(Exercise(
    name="weight_align", chapter="07", title="Weight Aligning of the head", difficulty=2, minutes=15,
    stub=_wa_stub, solution=_wa_solution, properties=_wa_properties,
    wrong_answers={"rescales the old rows instead of the new ones": _wa_scales_old_rows,
                   "leaves the new biases alone": _wa_forgets_bias,
                   "scales each new row to the old mean norm": _wa_each_row_to_the_old_mean},
))


# --- Exercise 7.2 · BiC's bias layer --------------------------------------------------------------------------------

def _bic_stub(logits: torch.Tensor, new: list[int], alpha: float, beta: float) -> torch.Tensor:
    """logits: [N, C]; new: the newest task's classes. Returns a new tensor [N, C]: alpha·o + beta in the new
    classes' columns, every other column unchanged."""
    raise NotImplementedError


def _bic_solution(logits: torch.Tensor, new: list[int], alpha: float, beta: float) -> torch.Tensor:
    """logits: [N, C]; new: the newest task's classes. Returns a new tensor [N, C]: alpha·o + beta in the new
    classes' columns, every other column unchanged."""
    out = logits.clone()  # never edit the caller's logits
    out[:, new] = alpha * logits[:, new] + beta  # BiC eq. 5: only the newest classes are corrected
    return out


def _bic_every_class(logits, new, alpha, beta):
    return alpha * logits + beta


def _bic_old_classes(logits, new, alpha, beta):
    out = logits.clone()
    old = [c for c in range(logits.shape[1]) if c not in new]
    out[:, old] = alpha * logits[:, old] + beta
    return out


def _bic_in_place(logits, new, alpha, beta):
    logits[:, new] = alpha * logits[:, new] + beta
    return logits


def _library_bic(logits: torch.Tensor, new: list[int], alpha: float, beta: float) -> torch.Tensor:
    bic = BiC(buffer_size=1)
    bic.alpha, bic.beta, bic.corrected = alpha, beta, list(new)
    identity_stream = SimpleNamespace(mask_logits=lambda out, t: out)
    return bic.logits(nn.Identity(), identity_stream, logits, None)


def _bic_properties(fn: Callable) -> None:
    gen = torch.Generator().manual_seed(0)
    for n_classes, new, alpha, beta in ((10, [8, 9], 0.7, -1.5), (6, [1, 4], 1.3, 0.4), (4, [3], 0.5, -2.0)):
        logits = 3 * torch.randn(16, n_classes, generator=gen)
        given = logits.clone()
        out = fn(given, list(new), alpha, beta)
        expect(isinstance(out, torch.Tensor) and out.shape == logits.shape, "returns logits shaped [N, C]",
               tuple(logits.shape), getattr(out, "shape", type(out).__name__))
        expect(torch.equal(given, logits), "leaves the input logits unchanged (returns a new tensor)",
               "inputs untouched", "the input was modified")
        old = [c for c in range(n_classes) if c not in new]
        expect(torch.equal(out[:, old], logits[:, old]), f"columns of the old classes {old} are unchanged",
               "unchanged", "changed")
        expect(torch.allclose(out[:, new], alpha * logits[:, new] + beta, atol=1e-6), f"columns of the new classes "
               f"{new} become α·o + β", "α·o + β", "something else")
        expect(torch.equal(fn(logits.clone(), list(new), 1.0, 0.0), logits), "α = 1, β = 0 changes nothing",
               "unchanged", "changed")
        expected = _library_bic(logits, new, alpha, beta)
        expect(torch.allclose(out, expected, atol=1e-6), "equals cl_lab's BiC prediction", "the same logits",
               "different logits")


check_bic_correction = register(Exercise(
    name="bic_correction", chapter="07", title="BiC's bias layer", difficulty=1, minutes=10,
    stub=_bic_stub, solution=_bic_solution, properties=_bic_properties,
    wrong_answers={"corrects every class": _bic_every_class,
                   "corrects the old classes": _bic_old_classes,
                   "edits the logits in place": _bic_in_place},
))
