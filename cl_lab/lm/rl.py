"""RL after DPO (chapter 14): GRPO from scratch with a verifiable reward, on the tiny LM's question format.

GRPO is Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300), eq. 3 with the KL estimator of eq. 4. For each prompt
q the policy samples a group of G completions o_1 … o_G; a verifier scores each (here: is the answer's first token
the right object?), and each completion's advantage is its reward against its own group's,
Â_i = (r_i − mean(r)) / (std(r) + ε) (§4.1.2, outcome supervision), shared by all of its tokens. The objective,
maximised, is

    J = 1/G Σ_i 1/|o_i| Σ_t { min( ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 − ε_clip, 1 + ε_clip) Â_i ) − β D_{i,t} },

with the importance ratio ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θ_old(o_{i,t} | q, o_{i,<t}) against the policy
that sampled the group, and D_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1 per token: Schulman's k3 estimator of
KL(π_θ ‖ π_ref) on the policy's own samples (``cl_lab.lm.kl_estimators``), never negative.

``grpo_loss`` is −J. ``loss_type="grpo"`` normalises as the paper does (each completion's tokens averaged, then
the completions); ``loss_type="dapo"`` averages over every completion token of the batch (Yu et al. 2025, DAPO,
arXiv:2503.14476), the default of TRL 1.16's ``GRPOTrainer``. Both equal that trainer's ``_compute_loss`` on the
same per-token log-probabilities, advantages and masks (``tests/test_lm_rl.py``; TRL's KL bias correction off,
its advantages from ``scale_rewards="group"``, whose ε is 1e-4 and whose std is the sample std).

Sampling (``sample_completions``) runs on right-padded sequences without a cache: the completions are a few
tokens long ("Paris . <eos>"), so each new token costs one forward pass of the whole batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.tokenizer import encode
from cl_lab.lm.world import Fact

LOSS_TYPES = ("grpo", "dapo")


# ------------------------------------------------------------------ sampling and per-token log-probabilities

def _distinct(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ids [B, L] [D, L], and each row's index among them [B]: the G completions of a prompt
    often coincide, and the model need not read one sequence twice."""
    return torch.unique(ids, dim=0, return_inverse=True)


def next_token_logits(model: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Logits [B, V] of the token after each right-padded row of ids [B, L] (after its last real token)."""
    device = next(model.parameters()).device
    real = ids != pad_id  # [B, L]
    width = int(real.sum(1).max())
    logits = model(input_ids=ids[:, :width].to(device), attention_mask=real[:, :width].long().to(device)).logits
    return logits[torch.arange(len(ids), device=device), (real.sum(1) - 1).to(device)].float().cpu()


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: torch.Tensor, pad_id: int, eos_id: int, *, group_size: int,
                       max_new_tokens: int, generator: torch.Generator, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``group_size`` completions of each right-padded prompt [N, Lp] from ``model``.

    Returns ids [N·G, Lp + max_new_tokens] (each prompt's G rows consecutive: prompt, completion, then padding)
    and mask [N·G, same], True on the completion's tokens up to and including the first end token. Each step
    reads only the distinct sequences so far (identical prefixes share one forward pass)."""
    _validate.positive_int("group_size", group_size)
    _validate.positive_int("max_new_tokens", max_new_tokens)
    _validate.positive("temperature", temperature)
    was_training = model.training
    model.eval()
    ids = prompts.repeat_interleave(group_size, 0)  # [B, Lp], B = N·G
    ids = torch.cat([ids, torch.full((len(ids), max_new_tokens), pad_id, dtype=ids.dtype)], 1)  # [B, L]
    mask = torch.zeros_like(ids, dtype=torch.bool)  # [B, L]
    lengths = (ids != pad_id).sum(1)  # [B]: the next token's position
    active = torch.ones(len(ids), dtype=torch.bool)  # [B]: no end token yet
    rows = torch.arange(len(ids))
    for _ in range(max_new_tokens):
        distinct, inverse = _distinct(ids)
        logits = next_token_logits(model, distinct, pad_id)[inverse] / temperature  # [B, V]
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)  # [B]
        at = rows[active]
        ids[at, lengths[at]] = token[at]
        mask[at, lengths[at]] = True
        lengths[at] += 1
        active &= token != eos_id
        if not active.any():
            break
    model.train(was_training)
    return ids, mask


def completion_logprobs(model: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """logp [B, L]: logp[:, t] = log π(ids[:, t] | ids[:, :t]) for t ≥ 1 (0 at t = 0), on right-padded ids
    [B, L]; read it where the completion mask is True. Each distinct row is read once; gradients flow unless
    called under ``no_grad``."""
    distinct, inverse = _distinct(ids)
    device = next(model.parameters()).device
    x = distinct.to(device)
    logits = model(input_ids=x, attention_mask=(x != pad_id).long()).logits[:, :-1].float()  # [D, L-1, V]
    token_logp = logits.log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # [D, L-1]
    token_logp = torch.cat([torch.zeros_like(token_logp[:, :1]), token_logp], 1).cpu()  # [D, L]
    return token_logp[inverse]  # [B, L]


def first_answer(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first completion token of each row [B] (the answer's first word), from ids and mask [B, L]."""
    return ids.gather(1, mask.long().argmax(1, keepdim=True)).squeeze(1)


def answer_reward(ids: torch.Tensor, mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The verifiable reward [B]: 1.0 where the completion's first token is one its row accepts (allowed [B, V],
    True for an accepted token), else 0."""
    first = first_answer(ids, mask)  # [B]
    return allowed[torch.arange(len(first)), first].float()


# ------------------------------------------------------------------ the GRPO objective

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Â [B] = (r − the group's mean) / (the group's sample std + eps), for rewards [B] whose groups of
    ``group_size`` are consecutive (GRPO's outcome supervision, Shao et al. 2024, §4.1.2). A group whose
    completions all scored the same has Â = 0: it teaches nothing."""
    _validate.positive_int("group_size", group_size)
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group's std needs two rewards), got {group_size}")
    if rewards.dim() != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards must be one flat tensor of whole groups of {group_size}, got shape "
                         f"{tuple(rewards.shape)}")
    _validate.non_negative("eps", eps)
    groups = rewards.float().view(-1, group_size)  # [N, G]
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return advantages.view(-1)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token KL (eq. 4): π_ref/π_θ − log(π_ref/π_θ) − 1, elementwise, never negative."""
    log_r = ref_logps - logps
    return torch.exp(log_r) - log_r - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              loss_type: str = "grpo") -> torch.Tensor:
    """−J of GRPO (Shao et al. 2024, eq. 3; see the module docstring), a scalar.

    logps, old_logps, ref_logps, mask: [B, L] per-token log-probabilities under the policy (with gradients),
    the policy that sampled (no gradients), the reference, and the completion mask; advantages [B]. ``beta`` > 0
    needs ``ref_logps``. ``loss_type``: "grpo" (mean over each completion's tokens, then over completions) or
    "dapo" (mean over all completion tokens of the batch)."""
    _validate.non_negative("beta", beta)
    _validate.positive("epsilon", epsilon)
    _validate.one_of("loss_type", loss_type, LOSS_TYPES)
    if beta and ref_logps is None:
        raise ValueError("ref_logps must be given when beta > 0, got None")
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)  # [B, L]
    advantages = advantages[:, None]  # [B, 1]: every token of a completion shares it
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)  # [B, L]
    per_token = -surrogate + (beta * k3(logps, ref_logps) if beta else 0.0)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------ the training loop

@dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run: ``steps`` batches of ``prompts_per_step`` prompts, ``group_size`` completions each (at
    ``temperature``, at most ``max_new_tokens`` tokens), ``iterations`` gradient steps per batch (μ; the ratio
    and the clip act from the second), AdamW at ``lr`` (no weight decay, gradients clipped at norm 1), the KL
    coefficient ``beta`` to the reference, the clip range ``epsilon`` and the normalisation ``loss_type``."""

    steps: int = 60
    lr: float = 1e-4
    prompts_per_step: int = 16
    group_size: int = 8
    beta: float = 0.0
    epsilon: float = 0.2
    iterations: int = 1
    max_new_tokens: int = 3
    temperature: float = 1.0
    loss_type: str = "grpo"
    seed: int = 0
    probe_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "iterations", "max_new_tokens"):
            _validate.positive_int(name, getattr(self, name))
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2, got {self.group_size}")
        _validate.positive("lr", self.lr)
        _validate.non_negative("beta", self.beta)
        _validate.positive("epsilon", self.epsilon)
        _validate.positive("temperature", self.temperature)
        _validate.one_of("loss_type", self.loss_type, LOSS_TYPES)
        _validate.non_negative_int("seed", self.seed)
        _validate.non_negative_int("probe_every", self.probe_every)


def _step(params: list[nn.Parameter], opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless seeded epochs of index batches (each epoch a fresh permutation; a short last batch dropped)."""
    if batch_size > n:
        raise ValueError(f"batch size must be at most the {n} prompts, got {batch_size}")
    while True:
        order = torch.randperm(n, generator=gen)
        yield from order[:n - n % batch_size].split(batch_size)


def grpo(start: nn.Module, prompts: torch.Tensor, allowed: torch.Tensor, config: GRPOConfig, *, pad_id: int,
         eos_id: int, reference: nn.Module | None = None, probe: Callable[[nn.Module], dict] | None = None
         ) -> tuple[nn.Module, pd.DataFrame]:
    """GRPO of a copy of ``start`` on right-padded prompts [N, Lp], rewarded where the answer's first token is one
    its prompt accepts (allowed [N, V], ``answer_reward``), with the KL to ``reference`` (default: ``start``)
    when ``config.beta`` > 0.

    Returns the trained model (eval mode, frozen) and the trajectory: per probe (step 0 and every
    ``config.probe_every`` steps) the mean reward of the last sampled batch and ``probe``'s row."""
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    if prompts.dim() != 2 or allowed.dim() != 2 or len(allowed) != len(prompts):
        raise ValueError(f"allowed must hold one row [V] per prompt, got shapes {tuple(prompts.shape)} and "
                         f"{tuple(allowed.shape)}")
    gen = torch.Generator().manual_seed(config.seed)
    policy = copy.deepcopy(start).requires_grad_(True).train()
    if config.beta:
        reference = copy.deepcopy(start if reference is None else reference).eval().requires_grad_(False)
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    batches = _batches(len(prompts), config.prompts_per_step, gen)
    trajectory, reward = [], float("nan")

    def record(step: int) -> None:
        row = {"step": step, "reward": reward}
        if probe is not None:
            row.update(probe(policy))
        trajectory.append(row)

    record(0)
    for step in range(1, config.steps + 1):
        rows = next(batches)
        ids, mask = sample_completions(policy, prompts[rows], pad_id, eos_id, group_size=config.group_size,
                                       max_new_tokens=config.max_new_tokens, generator=gen,
                                       temperature=config.temperature)
        rewards = answer_reward(ids, mask, allowed[rows].repeat_interleave(config.group_size, 0))  # [B]
        reward = rewards.mean().item()
        advantages = group_advantages(rewards, config.group_size)  # [B]
        with torch.no_grad():
            ref_logps = completion_logprobs(reference, ids, pad_id) if config.beta else None
        old_logps = None
        for _ in range(config.iterations):
            logps = completion_logprobs(policy, ids, pad_id)  # [B, L]
            old_logps = logps.detach() if old_logps is None else old_logps  # π_θ_old: the policy that sampled
            loss = grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=config.beta,
                             epsilon=config.epsilon, loss_type=config.loss_type)
            _step(params, opt, loss)
        if config.probe_every and step % config.probe_every == 0:
            record(step)
    return policy.eval().requires_grad_(False), pd.DataFrame(trajectory)


def question_task(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                  answers: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts [N, Lp] (right-padded question prompts of ``facts``) and allowed [N, V] for ``grpo``: the one
    accepted first word of each answer, the fact's object, or the first word of ``answers[i]`` where given (e.g.
    a refusal's, for a question that must not be answered)."""
    facts = list(facts)
    if not facts:
        raise ValueError("facts must hold at least one question, got none")
    words = [f.object for f in facts] if answers is None else [a.split()[0] for a in answers]
    if len(words) != len(facts):
        raise ValueError(f"answers must match facts one to one, got {len(words)} for {len(facts)}")
    vocab = tokenizer.get_vocab()
    missing = [w for w in words if w not in vocab]
    if missing:
        raise ValueError(f"answers must start with a word of the vocabulary, got {missing[:5]}")
    allowed = torch.zeros(len(facts), len(vocab), dtype=torch.bool)  # [N, V]
    allowed[torch.arange(len(facts)), torch.tensor([vocab[w] for w in words])] = True
    return encode(tokenizer, [f.prompt for f in facts]), allowed
