"""Chapter 11's exercises: ROME's rank-one update, and the indirect effect of one restored hidden state."""

from __future__ import annotations

import functools

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.lm import tracing
from cl_lab.methods.editing import rome_update


def _unsolved(solution):
    """The learner's starting point: ``solution``'s name, signature and docstring, and no body."""

    @functools.wraps(solution)
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{solution.__name__} is not written yet")

    return stub


# ---- Exercise 11.1 · ROME's rank-one update -----------------------------------------------------------------

def rome_rank_one(W, C, k_star, v_star):
    """W [d_v, d_k]: the layer's weight (value = W key); C [d_k, d_k]: the key covariance (symmetric positive
    definite); k_star [d_k]: the edited key; v_star [d_v]: the value it must retrieve. All float64.

    Returns Δ [d_v, d_k], the change of least tr(Δ C Δᵀ) with (W + Δ) k* = v* (Meng et al. 2022, eq. 2):
        Δ = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)
    """
    u = torch.linalg.solve(C, k_star)  # C⁻¹k* [d_k]
    return torch.outer(v_star - W @ k_star, u) / (u @ k_star)


def _rome_case(seed: int) -> tuple[torch.Tensor, ...]:
    """W [6, 8], an anisotropic C [8, 8] from 40 keys of very different scales, k* [8], v* [6] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(40, 8, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 8, dtype=torch.float64)
    C = keys.T @ keys / len(keys) + 1e-3 * torch.eye(8, dtype=torch.float64)
    W = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    return W, C, torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)


def _c_norm(delta: torch.Tensor, C: torch.Tensor) -> float:
    return torch.trace(delta @ C @ delta.T).item()  # tr(Δ C Δᵀ): the mean squared change of the stored values


def _rome_rank_one_properties(fn) -> None:
    W, C, k, v = _rome_case(0)
    delta = fn(W.clone(), C.clone(), k.clone(), v.clone())
    expect(torch.is_tensor(delta) and delta.shape == W.shape, "returns a tensor shaped like W [d_v, d_k]",
           tuple(W.shape), tuple(delta.shape) if torch.is_tensor(delta) else type(delta).__name__)
    delta = delta.double()
    miss = ((W + delta) @ k - v).abs().max().item()
    expect(miss < 1e-8, "the edited layer maps k* to v*: (W + Δ) k* = v*", "≤ 1e-8", f"{miss:.2e}")
    rank = torch.linalg.matrix_rank(delta, rtol=1e-8).item()
    expect(rank == 1, "Δ has rank one", 1, rank)
    raw = torch.outer(v - W @ k, k) / (k @ k)  # the same constraint met along the raw key (C = I)
    expect(_c_norm(delta, C) <= _c_norm(raw, C) * (1 + 1e-9),
           "Δ disturbs the stored keys (tr(Δ C Δᵀ)) no more than the raw-key change r k*ᵀ / (k*ᵀ k*)",
           f"≤ {_c_norm(raw, C):.4g}", f"{_c_norm(delta, C):.4g}")
    u = torch.linalg.solve(C, k)
    other = torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    other -= (u @ other) / (u @ k) * k  # a key with (C⁻¹k*)ᵀ k = 0
    kept = (delta @ other).abs().max().item()
    expect(kept < 1e-8, "a key with (C⁻¹k*)ᵀ k = 0 keeps its value exactly", "≤ 1e-8", f"{kept:.2e}")
    for seed in (1, 2, 3):
        W, C, k, v = _rome_case(seed)
        want, got = rome_update(W, C, k, v), fn(W, C, k, v).double()
        gap = (got - want).abs().max().item()
        expect(gap < 1e-8, f"equals cl_lab.methods.editing.rome_update (random case {seed})", "≤ 1e-8",
               f"{gap:.2e}")


def _raw_key_direction(W, C, k_star, v_star):
    return torch.outer(v_star - W @ k_star, k_star) / (k_star @ k_star)


def _without_the_normaliser(W, C, k_star, v_star):
    return torch.outer(v_star - W @ k_star, torch.linalg.solve(C, k_star))


def _c_instead_of_its_inverse(W, C, k_star, v_star):
    u = C @ k_star
    return torch.outer(v_star - W @ k_star, u) / (u @ k_star)


check_rome_rank_one = register(Exercise(
    name="rome_rank_one", chapter="11", title="ROME's rank-one update", difficulty=2, minutes=15,
    stub=_unsolved(rome_rank_one), solution=rome_rank_one, properties=_rome_rank_one_properties,
    wrong_answers={"the raw key as the row direction (C = I)": _raw_key_direction,
                   "no normaliser (C⁻¹k*)ᵀ k*": _without_the_normaliser,
                   "C k* instead of C⁻¹ k*": _c_instead_of_its_inverse}))


# ---- Exercise 11.2 · The indirect effect of one hidden state ------------------------------------------------

def indirect_effect(model, ids, span, target, noise, layer, position):
    """model: a GPT-2 (``transformers.GPT2LMHeadModel``) in eval mode; ids [1, T]: a prompt's token ids;
    span = (start, end): the subject's tokens are ids[0, start:end]; target: the answer's token id;
    noise [end − start, d]: added to the subject's token embeddings in the corrupted runs; layer, position:
    the hidden state to restore, the output of block ``layer`` at token ``position``.

    Returns IE = P_restored(target) − P_corrupted(target), a float: P of the target after the last token, in the
    corrupted run with the clean run's hidden state (layer, position) put back, minus without it.
    """
    start, end = span
    name = tracing.hook_name("hidden", layer)  # 'blocks.{layer}.hook_resid_post'
    cache = {}

    def keep(x):  # [1, T, d]
        cache["clean"] = x.detach().clone()
        return x

    def corrupt(x):  # embeddings [1, T, d]
        x = x.clone()
        x[:, start:end] += noise
        return x

    def restore(x):
        x = x.clone()
        x[:, position] = cache["clean"][:, position]
        return x

    def p_target(patches):
        with torch.no_grad(), tracing.hooked(model, patches):
            return torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target].item()

    p_target({name: keep})
    return p_target({tracing.EMBED: corrupt, name: restore}) - p_target({tracing.EMBED: corrupt})


def _trace_case(seed: int) -> tuple:
    """A random 3-block GPT-2 (peaked outputs), a prompt of 8 tokens with the subject at [2, 4), noise [2, 16]."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=40, n_positions=16, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(40, (1, 8), generator=gen)
    target = int(torch.randint(40, (1,), generator=gen))
    return model, ids, (2, 4), target, 1.5 * torch.randn(2, 16, generator=gen)


def _p_target(model, ids, target, noise=None, span=(0, 0)) -> float:
    patches = {}
    if noise is not None:
        def corrupt(x):
            x = x.clone()
            x[:, span[0]:span[1]] += noise
            return x
        patches[tracing.EMBED] = corrupt
    with torch.no_grad(), tracing.hooked(model, patches):
        return torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target].item()


def _indirect_effect_properties(fn) -> None:
    model, ids, span, target, noise = _trace_case(0)
    got = fn(model, ids, span, target, noise, 1, 3)
    expect(isinstance(got, (float, int)) or (torch.is_tensor(got) and got.numel() == 1), "returns one number",
           "a float", type(got).__name__)
    zero = float(fn(model, ids, span, target, torch.zeros_like(noise), 1, 3))
    expect(abs(zero) < 1e-6, "without noise nothing is corrupted: IE = 0", 0.0, f"{zero:.2e}")
    before = float(fn(model, ids, span, target, noise, 0, 1))
    expect(abs(before) < 1e-6, "a token before the subject never sees the noise (causal attention): IE = 0", 0.0,
           f"{before:.2e}")
    p_clean = _p_target(model, ids, target)
    p_corrupt = _p_target(model, ids, target, noise, span)
    top = float(fn(model, ids, span, target, noise, 2, 7))
    expect(abs(top - (p_clean - p_corrupt)) < 1e-6,
           "the last block's output at the last token carries everything: IE = P_clean − P_corrupted",
           f"{p_clean - p_corrupt:.6f}", f"{top:.6f}")
    for seed, (layer, position) in zip((1, 2, 3), ((0, 3), (1, 2), (1, 5))):
        case = _trace_case(seed)
        want, got = indirect_effect(*case, layer, position), float(fn(*case, layer, position))
        expect(abs(got - want) < 1e-6, f"equals the reference on a random model (seed {seed}, layer {layer}, token "
               f"{position})", f"{want:.6f}", f"{got:.6f}")


def _minus_the_clean_probability(model, ids, span, target, noise, layer, position):
    p_clean = _p_target(model, ids, target)
    return indirect_effect(model, ids, span, target, noise, layer, position) + _p_target(
        model, ids, target, noise, span) - p_clean


def _noise_on_every_token(model, ids, span, target, noise, layer, position):
    spread = noise.mean(0).expand(ids.shape[1], -1)  # [T, d] the noise on the whole prompt
    return indirect_effect(model, ids, (0, ids.shape[1]), target, spread, layer, position)


def _restores_the_block_input(model, ids, span, target, noise, layer, position):
    return indirect_effect(model, ids, span, target, noise, layer - 1, position) if layer else 0.0


check_indirect_effect = register(Exercise(
    name="indirect_effect", chapter="11", title="The indirect effect of one hidden state", difficulty=2, minutes=20,
    stub=_unsolved(indirect_effect), solution=indirect_effect, properties=_indirect_effect_properties,
    wrong_answers={"P_restored − P_clean instead of − P_corrupted": _minus_the_clean_probability,
                   "noise on every token of the prompt, not only the subject": _noise_on_every_token,
                   "restores the block's input (the previous block's output)": _restores_the_block_input}))
