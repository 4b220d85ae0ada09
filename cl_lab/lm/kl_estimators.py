"""Sampled estimators of KL(π_θ ‖ π_ref) against the exact KL (chapter 12), on a vocabulary small enough to sum.

Schulman, "Approximating KL divergence" (2020): with tokens x ~ π_θ and r = π_ref(x)/π_θ(x),
k1 = −log r (unbiased, can be negative), k2 = ½(log r)² (biased, exact to second order),
k3 = (r − 1) − log r (unbiased because E[r] = 1, never negative). RLHF penalties estimate the KL this way from
the policy's own samples; here the exact sum over the vocabulary is the yardstick.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from cl_lab import _validate


@torch.no_grad()
def next_token_logits(model: nn.Module, ids: torch.Tensor, pad_id: int, *, last_only: bool = False) -> torch.Tensor:
    """Next-token logits [M, V] at every real position of right-padded ids [B, L] (M = their count), or only
    at each row's last real token (M = B)."""
    real = ids != pad_id  # [B, L]
    width = int(real.sum(1).max())
    device = next(model.parameters()).device
    logits = model.eval()(input_ids=ids[:, :width].to(device), attention_mask=real[:, :width].long().to(device)
                          ).logits.float().cpu()  # [B, L, V]
    if last_only:
        return logits[torch.arange(len(ids)), real.sum(1) - 1]
    return logits[real[:, :width]]


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimates(policy_logits: torch.Tensor, reference_logits: torch.Tensor, n_samples: int, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Schulman's sampled estimators of KL(π_θ ‖ π_ref) ("Approximating KL divergence", 2020) at each of M
    contexts, from ``n_samples`` tokens x ~ π_θ per context, with log r = log π_ref(x) − log π_θ(x):
    k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r. Returns each [M, S], and "exact" [M]: the KL summed
    over the whole vocabulary."""
    _validate.positive_int("n_samples", n_samples)
    if policy_logits.shape != reference_logits.shape or policy_logits.dim() != 2:
        raise ValueError(f"reference_logits must match policy_logits' [M, V] shape, got "
                         f"{tuple(reference_logits.shape)} and {tuple(policy_logits.shape)}")
    log_q, log_p = policy_logits.double().log_softmax(-1), reference_logits.double().log_softmax(-1)  # [M, V]
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(log_q.exp(), n_samples, replacement=True, generator=gen)  # [M, S]
    log_r = log_p.gather(1, x) - log_q.gather(1, x)  # [M, S]
    return {"exact": (log_q.exp() * (log_q - log_p)).sum(-1), "k1": -log_r, "k2": 0.5 * log_r ** 2,
            "k3": torch.expm1(log_r) - log_r}  # expm1: r − 1 without cancellation when r ≈ 1 (k3 stays ≥ 0)


def estimator_table(estimates: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Bias and spread of each estimator over every draw: ``bias`` = mean(k) − mean exact KL with its standard
    error; ``std`` = the spread of a one-sample estimate around its context's KL (root-mean over contexts);
    ``relative std`` = std / mean exact KL; ``negative`` = share of draws below zero."""
    exact = estimates["exact"]  # [M]
    kl = exact.mean().item()
    rows = {}
    for name in KL_ESTIMATORS:
        k = estimates[name]  # [M, S]
        deviation = k - exact[:, None]
        std = k.var(1).mean().sqrt().item()
        rows[name] = {"mean": k.mean().item(), "exact KL": kl, "bias": deviation.mean().item(),
                      "bias s.e.": deviation.std().item() / math.sqrt(k.numel()), "std": std,
                      "relative std": std / kl if kl > 0 else math.nan,
                      "negative": (k < 0).double().mean().item()}
    return pd.DataFrame(rows).T
