"""Chapter 01's exercises: BWT and forgetting from the accuracy matrix, and the gradient-interference cosine."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cl_lab import metrics
from cl_lab.exercises._core import Exercise, expect, register, seeded_mlp, unsolved

# ---- Exercise 1.1 · BWT and forgetting from R ---------------------------------------------------------------

def bwt_and_forgetting(R):
    """R: accuracy matrix [T, T] (row i: after training task i; column j: accuracy on task j), T ≥ 2.

    Returns (bwt, forgetting) as two floats:
      bwt        = mean over j < T−1 of R[T−1, j] − R[j, j]                  (Lopez-Paz & Ranzato 2017)
      forgetting = mean over j < T−1 of max_{l < T−1} R[l, j] − R[T−1, j]   (Chaudhry et al. 2018)
    """
    R = np.asarray(R, dtype=float)
    last = len(R) - 1
    bwt = np.mean([R[last, j] - R[j, j] for j in range(last)])
    forgetting = np.mean([R[:last, j].max() - R[last, j] for j in range(last)])
    return float(bwt), float(forgetting)


def _random_accuracy_matrix(T: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible R [T, T]: near chance before a task is trained, high on the diagonal, anything after."""
    R = rng.uniform(0.0, 0.2, size=(T, T))  # upper triangle: not trained yet
    R[np.diag_indices(T)] = rng.uniform(0.85, 1.0, size=T)
    below = np.tril_indices(T, -1)
    R[below] = rng.uniform(0.3, 1.0, size=len(below[0]))  # later tasks may hurt or help
    return R


def _bwt_and_forgetting_properties(fn) -> None:
    rng = np.random.default_rng(0)
    R = _random_accuracy_matrix(4, rng)
    out = fn(R.copy())
    expect(isinstance(out, tuple) and len(out) == 2, "returns a pair (bwt, forgetting)", "a tuple of 2",
           type(out).__name__)
    bwt, fgt = (float(v) for v in out)
    flat = np.array([[0.9, 0.1, 0.1], [0.9, 0.95, 0.1], [0.9, 0.95, 0.97]])  # nothing ever drops
    expect(np.allclose(fn(flat), (0.0, 0.0)), "a matrix whose columns never drop has BWT 0 and forgetting 0",
           (0.0, 0.0), fn(flat))
    helped = np.array([[0.90, 0.10, 0.10], [0.95, 0.92, 0.10], [0.80, 0.90, 0.93]])  # the chapter's pitfall 8
    expect(np.isclose(fn(helped)[0], -0.06), "BWT is signed and averages the T−1 older tasks (hand-made R: −0.06)",
           -0.06, round(float(fn(helped)[0]), 4))
    expect(np.isclose(fn(helped)[1], 0.085),
           "forgetting starts from a task's best earlier accuracy, not the one just after learning it "
           "(hand-made R: 0.085)", 0.085, round(float(fn(helped)[1]), 4))
    for T in (2, 5, 7):
        R = _random_accuracy_matrix(T, rng)
        got, want = fn(R.copy()), (metrics.backward_transfer(R), metrics.forgetting(R))
        expect(np.isclose(got[0], want[0]), f"BWT equals cl_lab.metrics.backward_transfer on a random {T}×{T} R",
               round(want[0], 4), round(float(got[0]), 4))
        expect(np.isclose(got[1], want[1]), f"forgetting equals cl_lab.metrics.forgetting on a random {T}×{T} R",
               round(want[1], 4), round(float(got[1]), 4))
    expect(fgt >= -bwt - 1e-12, "forgetting ≥ −BWT (a best accuracy is at least the one just after learning)",
           f"≥ {-bwt:.4f}", round(fgt, 4))


def _bwt_over_all_tasks(R):
    R = np.asarray(R, dtype=float)
    return float(np.mean(R[-1] - np.diag(R))), bwt_and_forgetting(R)[1]


def _bwt_sign_flipped(R):
    bwt, fgt = bwt_and_forgetting(R)
    return -bwt, fgt


def _forgetting_as_minus_bwt(R):
    bwt, _ = bwt_and_forgetting(R)
    return bwt, -bwt


check_bwt_and_forgetting = register(Exercise(
    name="bwt_and_forgetting", chapter="01", title="BWT and forgetting from the accuracy matrix", difficulty=1,
    minutes=10, stub=unsolved(bwt_and_forgetting), solution=bwt_and_forgetting,
    properties=_bwt_and_forgetting_properties,
    wrong_answers={"BWT averaged over all T tasks (the last one adds a zero)": _bwt_over_all_tasks,
                   "BWT with the sign flipped (just learned − final)": _bwt_sign_flipped,
                   "forgetting taken as −BWT (drop from the accuracy just after learning)": _forgetting_as_minus_bwt}))


# ---- Exercise 1.2 · The gradient-interference cosine --------------------------------------------------------

def gradient_cosine(model, x_old, y_old, x_new, y_new):
    """model: nn.Module, inputs [N, D] → logits [N, C]; x_old [N, D], y_old [N]; x_new [M, D], y_new [M].

    Returns the cosine (a float in [−1, 1]) between the gradients of the mean cross-entropy on the old batch
    and on the new batch, each flattened over all trainable parameters into one vector [P]. The model's
    parameters and their .grad are left as they were.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(x, y):  # [P]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        return torch.cat([g.reshape(-1) for g in grads])

    return F.cosine_similarity(flat_grad(x_old, y_old), flat_grad(x_new, y_new), dim=0).item()


def _cosine_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = seeded_mlp(seed, 6, (8, 8), 3)
    x_old, x_new = torch.randn(20, 6, generator=gen), torch.randn(16, 6, generator=gen) + 0.5
    y_old, y_new = torch.randint(3, (20,), generator=gen), torch.randint(3, (16,), generator=gen)
    return model, (x_old, y_old, x_new, y_new)


def _reference_cosine(model, x_old, y_old, x_new, y_new) -> float:
    params = list(model.parameters())
    g_old = torch.autograd.grad(F.cross_entropy(model(x_old), y_old), params)
    g_new = torch.autograd.grad(F.cross_entropy(model(x_new), y_new), params)
    flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in (g_old, g_new)]
    return float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))


def _gradient_cosine_properties(fn) -> None:
    model, batches = _cosine_case(0)
    before = [p.detach().clone() for p in model.parameters()]
    got = fn(model, *batches)
    expect(isinstance(got, (float, int)) or (torch.is_tensor(got) and got.numel() == 1), "returns one number",
           "a float", type(got).__name__)
    got = float(got)
    expect(-1 - 1e-6 <= got <= 1 + 1e-6, "the cosine lies in [−1, 1]", "[−1, 1]", round(got, 4))
    x_old, y_old, _, _ = batches
    same = float(fn(model, x_old, y_old, x_old, y_old))
    expect(abs(same - 1) < 1e-5, "a batch against itself gives cosine 1", 1.0, round(same, 6))
    expect(all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)),
           "the model's parameters are left as they were", "unchanged", "changed")
    expect(all(p.grad is None for p in model.parameters()), "the model's .grad is left as it was (None here)",
           "None", "a gradient")
    for seed in (0, 1, 2):
        model, batches = _cosine_case(seed)
        want, got = _reference_cosine(model, *batches), float(fn(model, *batches))
        expect(abs(got - want) < 1e-4, "equals the cosine of the two flattened gradients over all parameters "
               f"(seed {seed})", round(want, 4), round(got, 4))
    swapped = float(fn(model, batches[2], batches[3], batches[0], batches[1]))
    expect(abs(swapped - got) < 1e-5, "swapping old and new gives the same cosine", round(got, 4), round(swapped, 4))


def _cosine_with_accumulated_grads(model, x_old, y_old, x_new, y_new):
    F.cross_entropy(model(x_old), y_old).backward()
    g_old = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    F.cross_entropy(model(x_new), y_new).backward()  # no zero_grad: this is g_old + g_new
    g_new = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return F.cosine_similarity(g_old, g_new, dim=0).item()


def _mean_of_per_layer_cosines(model, x_old, y_old, x_new, y_new):
    params = list(model.parameters())
    g_old = torch.autograd.grad(F.cross_entropy(model(x_old), y_old), params)
    g_new = torch.autograd.grad(F.cross_entropy(model(x_new), y_new), params)
    return float(np.mean([F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).item()
                          for a, b in zip(g_old, g_new, strict=True)]))


def _dot_product(model, x_old, y_old, x_new, y_new):
    params = list(model.parameters())
    g_old = torch.autograd.grad(F.cross_entropy(model(x_old), y_old), params)
    g_new = torch.autograd.grad(F.cross_entropy(model(x_new), y_new), params)
    return float(sum((a * b).sum() for a, b in zip(g_old, g_new, strict=True)))


check_gradient_cosine = register(Exercise(
    name="gradient_cosine", chapter="01", title="The gradient-interference cosine", difficulty=2, minutes=15,
    stub=unsolved(gradient_cosine), solution=gradient_cosine, properties=_gradient_cosine_properties,
    wrong_answers={"two .backward() calls without zeroing (the second gradient is g_old + g_new)":
                   _cosine_with_accumulated_grads,
                   "the mean of per-layer cosines": _mean_of_per_layer_cosines,
                   "the dot product, not normalised": _dot_product}))
