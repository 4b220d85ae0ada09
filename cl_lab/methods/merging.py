"""Model merging as plain functions on state dicts and task vectors (chapter 10).

A *state dict* here is any mapping from parameter name to tensor (``model.state_dict()``); a *task vector*
is the same mapping holding ``θ_k − θ_0`` (Ilharco et al. 2023). Every function returns a new dict and
leaves its inputs untouched, checks that all inputs share the same keys and shapes (naming the first key
that differs), and works on any device (tensors stay where they are).

Nothing here trains: these are the few lines each paper adds on top of fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from cl_lab import _validate

StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------- argument checks


def _check_state(name: str, state: StateDict) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a mapping of parameter name -> tensor (a state dict), "
                        f"got {type(state).__name__}")
    if not state:
        raise ValueError(f"{name} must hold at least one tensor, got an empty mapping")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")


def _check_compatible(names_and_states: Sequence[tuple[str, StateDict]]) -> None:
    """All states share the first one's keys and shapes; the error names the argument and the key."""
    for name, state in names_and_states:
        _check_state(name, state)
    ref_name, ref = names_and_states[0]
    for name, state in names_and_states[1:]:
        missing, extra = set(ref) - set(state), set(state) - set(ref)
        if missing or extra:
            raise ValueError(f"{name} must have the same keys as {ref_name}: missing {sorted(missing)}, "
                             f"extra {sorted(extra)}")
        for key in ref:
            if state[key].shape != ref[key].shape:
                raise ValueError(f"{name}[{key!r}] must have shape {tuple(ref[key].shape)} like {ref_name}, "
                                 f"got {tuple(state[key].shape)}")


def _check_list(name: str, states: Sequence[StateDict]) -> list[StateDict]:
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(f"{name} must be a list of state dicts, got {type(states).__name__}")
    if len(states) == 0:
        raise ValueError(f"{name} must hold at least one state dict, got an empty list")
    return list(states)


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


# ---------------------------------------------------------------- task vectors


def task_vector(finetuned: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """τ = θ_ft − θ_0 (Ilharco et al. 2023, arXiv 2212.04089, §2: "task vectors")."""
    _check_compatible([("base", base), ("finetuned", finetuned)])
    return {k: (finetuned[k] - base[k]) if _is_float(base[k]) else torch.zeros_like(base[k]) for k in base}


def negate(tau: StateDict) -> dict[str, torch.Tensor]:
    """−τ: subtracting a task vector to forget its task (Ilharco et al. 2023, §3, "forgetting via negation")."""
    _check_state("tau", tau)
    return {k: -v if _is_float(v) else v.clone() for k, v in tau.items()}


def add_task_vector(base: StateDict, tau: StateDict, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """θ_0 + λ·τ for one task vector."""
    return task_arithmetic(base, [tau], lam)


def flatten(state: StateDict) -> torch.Tensor:
    """Every floating-point tensor of a state dict (or task vector) as one vector [P], in key order."""
    _check_state("state", state)
    return torch.cat([v.detach().reshape(-1) for v in state.values() if _is_float(v)])


def cosine_similarity(tau_a: StateDict, tau_b: StateDict) -> float:
    """cos(τ_a, τ_b) over all parameters (Ilharco et al. 2023, §7 and Fig. 9 measure it between tasks)."""
    _check_compatible([("tau_a", tau_a), ("tau_b", tau_b)])
    a, b = flatten(tau_a), flatten(tau_b)
    if a.norm() == 0 or b.norm() == 0:
        raise ValueError("tau_a and tau_b must be non-zero task vectors for a cosine similarity")
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ---------------------------------------------------------------- merges


def average(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Uniform (or weighted) weight average θ = Σ_k w_k θ_k with Σ w_k = 1: the "uniform soup" of
    Wortsman et al. 2022 (Model soups, arXiv 2203.05482, §2, θ_S = (1/k) Σ_i θ_i). Non-float buffers
    (counters) are taken from the first state."""
    states = _check_list("states", states)
    _check_compatible([(f"states[{i}]", s) for i, s in enumerate(states)])
    if weights is None:
        weights = [1.0 / len(states)] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"weights must hold one weight per state ({len(states)}), got {len(weights)}")
    weights = [_validate.non_negative(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"weights must sum to 1, got {sum(weights):.6g}")
    ref = states[0]
    return {k: sum(w * s[k] for w, s in zip(weights, states)) if _is_float(ref[k]) else ref[k].clone()
            for k in ref}


def interpolate(state_a: StateDict, state_b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·θ_a + α·θ_b: a point on the straight line between two networks (α in [0, 1]), the path along
    which Frankle et al. 2020 (arXiv 1912.05671, §2) measure the error barrier."""
    _validate.in_range("alpha", alpha, 0.0, 1.0)
    _check_compatible([("state_a", state_a), ("state_b", state_b)])
    return {k: torch.lerp(state_a[k], state_b[k], alpha) if _is_float(state_a[k]) else state_a[k].clone()
            for k in state_a}


def wise_ft(base: StateDict, finetuned: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: θ_α = (1 − α)·θ_0 + α·θ_ft (Wortsman et al. 2022, Robust fine-tuning of zero-shot models,
    arXiv 2109.01903, eq. 1). α = 0 is the pretrained model, α = 1 the fine-tuned one."""
    _validate.in_range("alpha", alpha, 0.0, 1.0)
    return interpolate(base, finetuned, alpha)


def task_arithmetic(base: StateDict, task_vectors: Sequence[StateDict], lam: float = 1.0) -> dict[str, torch.Tensor]:
    """θ = θ_0 + λ·Σ_k τ_k (Ilharco et al. 2023, Editing models with task arithmetic, arXiv 2212.04089,
    §2: "adding task vectors" with one scaling coefficient λ). Pass ``negate(τ)`` to forget a task.
    λ = 1/K with K fine-tunes equals the uniform soup of those fine-tunes."""
    task_vectors = _check_list("task_vectors", task_vectors)
    lam = _validate.finite("lam", lam)
    _check_compatible([("base", base)] + [(f"task_vectors[{i}]", t) for i, t in enumerate(task_vectors)])
    return {k: base[k] + lam * sum(t[k] for t in task_vectors) if _is_float(base[k]) else base[k].clone()
            for k in base}


def _density(density: float) -> float:
    density = _validate.number("density", density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the share of entries kept), got {density}")
    return density


def _top_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask [*shape] of the k = ⌊density·n⌋ entries of ``values`` with the largest magnitude (exactly k:
    ``torch.topk`` picks among equal magnitudes), PEFT's count in ``magnitude_based_pruning``."""
    flat = values.reshape(-1).abs()  # [n]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    mask[torch.topk(flat, int(density * flat.numel())).indices] = True
    return mask.reshape(values.shape)


def ties_trim(tau: StateDict, density: float, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """TIES step 1, trim: keep the ``density`` share of τ's entries with the largest magnitude, zero the rest
    (Yadav et al. 2023, arXiv 2306.01708, §3 "Trim", top-k %). By default the share is taken over the whole
    vector, as the paper's code flattens every parameter into one; ``per_tensor=True`` trims each tensor on
    its own, as ``peft.utils.merge_utils.ties`` does on the one tensor it is given. Either way exactly
    ⌊density·n⌋ entries survive (n: entries of the vector, or of the tensor)."""
    density = _density(density)
    _check_state("tau", tau)
    floats = [k for k, v in tau.items() if _is_float(v)]
    if per_tensor:
        masks = {k: _top_mask(tau[k], density) for k in floats}
    else:
        flat = torch.cat([tau[k].reshape(-1) for k in floats])  # [P]
        pieces = _top_mask(flat, density).split([tau[k].numel() for k in floats])
        masks = {k: m.reshape(tau[k].shape) for k, m in zip(floats, pieces)}
    return {k: v * masks[k] if k in masks else v.clone() for k, v in tau.items()}


def elect_sign(trimmed: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """TIES step 2, elect: per parameter, the sign of the summed trimmed values, γ = sgn(Σ_k τ̂_k) (Yadav et
    al. 2023, §3 "Elect", eq. for γ_m: the sign with the larger total mass). Entries: +1, −1 or 0."""
    trimmed = _check_list("trimmed", trimmed)
    _check_compatible([(f"trimmed[{i}]", t) for i, t in enumerate(trimmed)])
    return {k: torch.sign(sum(t[k] for t in trimmed)) for k in trimmed[0] if _is_float(trimmed[0][k])}


def disjoint_mean(trimmed: Sequence[StateDict], sign: StateDict) -> dict[str, torch.Tensor]:
    """TIES step 3, disjoint merge: per parameter, the mean over only the tasks whose trimmed value is non-zero
    and agrees with the elected sign, τ_m = (1/|A|) Σ_{k∈A} τ̂_k with A = {k : sgn(τ̂_k) = γ} (Yadav et al.
    2023, §3 "Disjoint Merge"). Zero where no task agrees."""
    trimmed = _check_list("trimmed", trimmed)
    _check_compatible([(f"trimmed[{i}]", t) for i, t in enumerate(trimmed)])
    out = {}
    for k, ref in trimmed[0].items():
        if not _is_float(ref):
            out[k] = ref.clone()
            continue
        if k not in sign or sign[k].shape != ref.shape:
            raise ValueError(f"sign must hold {k!r} with shape {tuple(ref.shape)} like trimmed")
        values = torch.stack([t[k] for t in trimmed])  # [K, *shape]
        agree = (torch.sign(values) == sign[k]) & (values != 0)  # [K, *shape]
        count = agree.sum(0)  # [*shape]
        out[k] = (values * agree).sum(0) / count.clamp(min=1)
    return out


def ties_merge(base: StateDict, task_vectors: Sequence[StateDict], density: float = 0.2,
               lam: float = 1.0, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """TIES-merging: θ = θ_0 + λ·τ_m, τ_m = disjoint_mean(trim(τ_k), elect_sign(trim(τ_k))) (Yadav et al.
    2023, arXiv 2306.01708, Algorithm 1; the paper keeps density 0.2 and tunes λ). With ``per_tensor=True``,
    θ − θ_0 equals ``peft.utils.merge_utils.ties`` applied to each tensor with weights λ (PEFT elects the sign
    + where non-zero trimmed values cancel exactly to 0, sgn(0) = 0 here; nowhere else do they differ)."""
    task_vectors = _check_list("task_vectors", task_vectors)
    density = _density(density)
    lam = _validate.finite("lam", lam)
    _check_compatible([("base", base)] + [(f"task_vectors[{i}]", t) for i, t in enumerate(task_vectors)])
    trimmed = [ties_trim(t, density, per_tensor) for t in task_vectors]
    merged = disjoint_mean(trimmed, elect_sign(trimmed))
    return task_arithmetic(base, [merged], lam)


def _drop(v: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """v with each entry zeroed with probability p, survivors divided by 1 − p [*shape]. The keep mask is
    ``bernoulli(1 − p)`` drawn on the CPU, as ``peft.utils.merge_utils.random_pruning`` draws it; p = 0 draws
    nothing (PEFT returns the tensor unpruned at density 1)."""
    if p == 0.0:
        return v.clone()
    keep = torch.bernoulli(torch.full(v.shape, 1.0 - p, dtype=v.dtype), generator=generator)  # [*shape]
    return (v * keep.to(v.device)) / (1.0 - p)


def dare(tau: StateDict, p: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """DARE, drop and rescale: each entry of τ is zeroed with probability p and the survivors are multiplied by
    1/(1 − p), so E[DARE(τ)] = τ (Yu et al. 2024, arXiv 2311.03099, eq. 2–3). ``generator`` (a CPU
    ``torch.Generator``) makes the drop mask reproducible on any device; tensors are drawn in key order."""
    p = _validate.in_range("p", p, 0.0, 1.0, high_open=True)
    _check_state("tau", tau)
    return {k: _drop(v, p, generator) if _is_float(v) else v.clone() for k, v in tau.items()}


def _dare_each(task_vectors: list[StateDict], p: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """DARE on every task vector, drawn tensor by tensor and, within a tensor, task by task: the order in which
    PEFT draws when its merge is applied to each tensor in turn after ``torch.manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(_validate.non_negative_int("seed", seed))
    out: list[dict[str, torch.Tensor]] = [{} for _ in task_vectors]
    for key in task_vectors[0]:
        for dropped, tau in zip(out, task_vectors):
            dropped[key] = _drop(tau[key], p, gen) if _is_float(tau[key]) else tau[key].clone()
    return out


def dare_merge(base: StateDict, task_vectors: Sequence[StateDict], p: float = 0.5, lam: float = 1.0,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE on every task vector, then task arithmetic: θ = θ_0 + λ·Σ_k DARE_p(τ_k) (Yu et al. 2024, §4.1,
    eq. 4). θ − θ_0 equals ``peft.utils.merge_utils.dare_linear`` with density 1 − p and weights λ, applied to
    each tensor in turn after ``torch.manual_seed(seed)``."""
    task_vectors = _check_list("task_vectors", task_vectors)
    p = _validate.in_range("p", p, 0.0, 1.0, high_open=True)
    lam = _validate.finite("lam", lam)
    _check_compatible([("base", base)] + [(f"task_vectors[{i}]", t) for i, t in enumerate(task_vectors)])
    return task_arithmetic(base, _dare_each(task_vectors, p, seed), lam)


def dare_ties_merge(base: StateDict, task_vectors: Sequence[StateDict], p: float = 0.5, lam: float = 1.0,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE-TIES: DARE replaces TIES's magnitude trim, then TIES's sign election and disjoint mean (Yu et al.
    2024, §4.1: DARE as a plug-in before TIES): θ = θ_0 + λ·disjoint_mean(D_k, elect_sign(D_k)), D_k =
    DARE_p(τ_k). θ − θ_0 equals ``peft.utils.merge_utils.dare_ties`` (density 1 − p, weights λ) tensor by
    tensor after ``torch.manual_seed(seed)`` (up to the sign PEFT elects where values cancel exactly)."""
    task_vectors = _check_list("task_vectors", task_vectors)
    p = _validate.in_range("p", p, 0.0, 1.0, high_open=True)
    lam = _validate.finite("lam", lam)
    _check_compatible([("base", base)] + [(f"task_vectors[{i}]", t) for i, t in enumerate(task_vectors)])
    dropped = _dare_each(task_vectors, p, seed)
    return task_arithmetic(base, [disjoint_mean(dropped, elect_sign(dropped))], lam)
