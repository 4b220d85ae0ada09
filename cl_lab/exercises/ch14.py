"""Chapter 14's exercises: GRPO's two new pieces, written from the paper (Shao et al. 2024, arXiv 2402.03300).

- ``group_advantages``: each completion's reward against its own group's, Â = (r − mean) / (std + ε) (§4.1.2),
  checked against ``cl_lab.lm.rl.group_advantages`` and on cases that separate the sample std from the
  population std, consecutive groups from strided ones, and a group that all scored alike (Â = 0, not NaN).
- ``clipped_surrogate``: the policy term of eq. 3, −1/G Σ_i 1/|o_i| Σ_t min(ρ Â, clip(ρ, 1 ± ε) Â), checked
  against ``cl_lab.lm.rl.grpo_loss`` and on hand-made ratios where the clip acts for either sign of Â.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cl_lab.exercises._core import Exercise, expect, register
from cl_lab.lm import rl

# ---------------------------------------------------------------- 14.1 · group-relative advantages


def group_advantages_stub(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """rewards [B]: the rewards of B = N·G completions, each prompt's G completions consecutive. Returns Â [B]:
    each reward minus its group's mean, divided by its group's sample standard deviation plus ``eps``."""
    raise NotImplementedError


def group_advantages_solution(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    groups = rewards.float().view(-1, group_size)  # [N, G]: one row per prompt
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + eps)).view(-1)  # std: the sample std (÷ (G − 1))


def _population_std(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    groups = rewards.float().view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + eps)).view(-1)


def _strided_groups(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    groups = rewards.float().view(group_size, -1)  # [G, N]: groups read across prompts
    return ((groups - groups.mean(0, keepdim=True)) / (groups.std(0, keepdim=True) + eps)).reshape(-1)


def _batch_baseline(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    r = rewards.float()
    return (r - r.mean()) / (r.std() + eps)


def _group_advantages_properties(fn) -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    got = fn(r.clone(), 4)
    expect(isinstance(got, Tensor) and got.shape == (4,), "returns one advantage per completion, shape [B]", "(4,)",
           tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__)
    expect(abs(got[0].item() - 1.5) < 1e-3, "uses the sample std (÷ (G − 1)): rewards [1, 0, 0, 0] give Â₀ = 1.5",
           1.5, round(got[0].item(), 4))
    same = fn(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3)
    expect(bool(torch.isfinite(same).all()) and same[:3].abs().max().item() == 0,
           "a group whose completions all scored alike gets Â = 0 (ε keeps it finite)", "[0, 0, 0, …]",
           [round(v, 3) for v in same.tolist()])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # groups of 2: [1, 0], [1, 1], [0, 0]
    got = fn(r.clone(), 2)
    expect(torch.allclose(got, torch.tensor([0.7071, -0.7071, 0, 0, 0, 0]), atol=1e-3),
           "groups are consecutive completions of one prompt: [1, 0 | 1, 1 | 0, 0] give [0.71, −0.71, 0, 0, 0, 0]",
           "[0.71, −0.71, 0, 0, 0, 0]", [round(v, 3) for v in got.tolist()])
    gen = torch.Generator().manual_seed(0)
    for g in (4, 8):
        rewards = torch.bernoulli(torch.full((6 * g,), 0.4), generator=gen)
        got = fn(rewards.clone(), g)
        expect(torch.allclose(got.view(-1, g).mean(1), torch.zeros(6), atol=1e-5),
               f"every group's advantages sum to zero (G = {g})", "0", got.view(-1, g).mean(1).abs().max().item())
        gap = (got - rl.group_advantages(rewards, g)).abs().max().item()
        expect(gap <= 1e-5, f"random 0/1 rewards, G = {g}: equal to cl_lab.lm.rl.group_advantages", "≤ 1e-5",
               f"{gap:.2e}")


check_group_advantages = register(Exercise(
    name="group_advantages", chapter="14", title="GRPO's group-relative advantages", difficulty=1, minutes=10,
    stub=group_advantages_stub, solution=group_advantages_solution, properties=_group_advantages_properties,
    wrong_answers={"the population std": _population_std, "groups read across prompts": _strided_groups,
                   "one baseline for the whole batch": _batch_baseline}))


# ---------------------------------------------------------------- 14.2 · the clipped surrogate


def clipped_surrogate_stub(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                           epsilon: float = 0.2) -> Tensor:
    """logps, old_logps: [B, L] per-token log-probabilities under the policy and under the policy that sampled;
    advantages [B]; mask [B, L] (True on completion tokens). Returns the scalar loss −1/B Σ_i 1/|o_i| Σ_t
    min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 − ε, 1 + ε) Â_i), with ρ = π_θ / π_old, over the masked tokens."""
    raise NotImplementedError


def clipped_surrogate_solution(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                               epsilon: float = 0.2) -> Tensor:
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)  # [B, L]
    a = advantages[:, None]  # [B, 1]: one advantage per completion, shared by its tokens
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)  # the pessimistic bound
    per_completion = (surrogate * mask).sum(1) / mask.sum(1)  # 1/|o_i| Σ_t
    return -per_completion.mean()


def _clip_only(logps, old_logps, advantages, mask, epsilon=0.2):
    mask = mask.float()
    ratio = torch.exp(logps - old_logps).clamp(1 - epsilon, 1 + epsilon)
    return -((ratio * advantages[:, None] * mask).sum(1) / mask.sum(1)).mean()


def _min_of_ratios(logps, old_logps, advantages, mask, epsilon=0.2):
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    ratio = torch.min(ratio, ratio.clamp(1 - epsilon, 1 + epsilon))  # min before multiplying by Â
    return -((ratio * advantages[:, None] * mask).sum(1) / mask.sum(1)).mean()


def _token_mean(logps, old_logps, advantages, mask, epsilon=0.2):
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    return -(surrogate * mask).sum() / mask.sum()


def _clipped_surrogate_properties(fn) -> None:
    ones = torch.ones(4, 1, dtype=torch.bool)
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    got = fn(logps, old, adv, ones, 0.2)
    expect(isinstance(got, Tensor) and got.dim() == 0, "returns a scalar", "shape ()",
           tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__)
    each = [fn(logps[i:i + 1], old[i:i + 1], adv[i:i + 1], ones[i:i + 1], 0.2).item() for i in range(4)]
    expect(abs(each[0] + 1.2) < 1e-5, "Â > 0 and ρ = 1.5: the gain is clipped at 1 + ε (loss −1.2)", -1.2,
           round(each[0], 4))
    expect(abs(each[1] + 0.5) < 1e-5, "Â > 0 and ρ = 0.5: the clip does not help, ρÂ counts (loss −0.5)", -0.5,
           round(each[1], 4))
    expect(abs(each[2] - 1.5) < 1e-5, "Â < 0 and ρ = 1.5: the full ρÂ counts, the pessimistic bound (loss 1.5)",
           1.5, round(each[2], 4))
    expect(abs(each[3] - 0.8) < 1e-5, "Â < 0 and ρ = 0.5: clipped at 1 − ε (loss 0.8)", 0.8, round(each[3], 4))
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logps2 = torch.tensor([[0.1, 0.1, 0.1], [-0.1, 0.0, 0.0]])
    got = fn(logps2, torch.zeros(2, 3), torch.tensor([1.0, 1.0]), mask, 0.2).item()
    want = -(torch.exp(torch.tensor(0.1)).item() + torch.exp(torch.tensor(-0.1)).item()) / 2
    expect(abs(got - want) < 1e-5, "each completion's tokens are averaged first, then the completions (1/|o_i|)",
           round(want, 4), round(got, 4))
    gen = torch.Generator().manual_seed(0)
    logps3 = 0.3 * torch.randn(6, 5, generator=gen)
    old3 = 0.3 * torch.randn(6, 5, generator=gen)
    mask3 = torch.rand(6, 5, generator=gen) < 0.7
    mask3[:, 0] = True
    adv3 = torch.randn(6, generator=gen)
    got = fn(logps3, old3, adv3, mask3, 0.2).item()
    want = rl.grpo_loss(logps3, old3, adv3, mask3, epsilon=0.2).item()
    expect(abs(got - want) < 1e-5, "random ratios and masks: equal to cl_lab.lm.rl.grpo_loss (β = 0)",
           round(want, 5), round(got, 5))


check_clipped_surrogate = register(Exercise(
    name="clipped_surrogate", chapter="14", title="GRPO's clipped surrogate", difficulty=2, minutes=15,
    stub=clipped_surrogate_stub, solution=clipped_surrogate_solution, properties=_clipped_surrogate_properties,
    wrong_answers={"the clipped term alone": _clip_only, "the min taken on the ratios": _min_of_ratios,
                   "one mean over every token": _token_mean}))
