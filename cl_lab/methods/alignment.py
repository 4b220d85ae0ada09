"""Post-training losses for a toy alignment chain (chapter 12): SFT, DPO, REINFORCE with a KL penalty, the KL
itself and its quadratic (Fisher) approximation, and a minimal per-stage low-rank adapter.

Everything acts on a classifier's logits [B, C], so "a response" is one class and every expectation over
responses is an exact sum over the C classes (an LLM must sample sequences instead).

- DPO, Rafailov et al. 2023 (arXiv:2305.18290), eq. 7:
  L = −log σ(β[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]).
- KL-penalised policy gradient, Ziegler et al. 2019 (arXiv:1909.08593) eq. 2, Ouyang et al. 2022
  (arXiv:2203.02155) eq. 2: maximise E[r(x, y)] − β KL(π_θ(·|x) ‖ π_ref(·|x)).
- LoRA, Hu et al. 2021 (arXiv:2106.09685), eq. 3: h = W₀x + B A x with W₀ frozen, B zero at the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from cl_lab import _validate

STAGES = ("sft", "dpo", "rl")


def check_stage(stage: str) -> str:
    """The stage name, or a ValueError naming the allowed ones."""
    return _validate.one_of("stage", stage, STAGES)


def check_beta(beta: float, name: str = "beta") -> float:
    """β (a KL or DPO strength) must be a number ≥ 0."""
    return _validate.non_negative(name, beta)


def check_fraction(name: str, value: float) -> float:
    """A share such as the replay fraction must lie in [0, 1]."""
    return _validate.in_range(name, value, 0.0, 1.0)


def sft_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy of the demonstrated answers y [B] under logits [B, C]."""
    return F.cross_entropy(logits, y)


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_logp_chosen: torch.Tensor,
             ref_logp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), mean over pairs. Inputs are log-probabilities [B] of the chosen and
    rejected answers under the policy and the frozen reference; β > 0 sets how far the implicit reward
    β·log(π_θ/π_ref) may move before the loss saturates."""
    beta = _validate.positive("beta", beta)
    margin = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)  # [B]
    return -F.logsigmoid(beta * margin).mean()


def dpo_loss_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, chosen: torch.Tensor,
                         rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO on classifier outputs: logits and ref_logits [B, C], chosen and rejected answer ids [B]."""
    logp, ref_logp = F.log_softmax(logits, 1), F.log_softmax(ref_logits, 1)  # [B, C]
    pick = lambda lp, ids: lp.gather(1, ids[:, None]).squeeze(1)  # noqa: E731  [B]
    return dpo_loss(pick(logp, chosen), pick(logp, rejected), pick(ref_logp, chosen), pick(ref_logp, rejected),
                    beta)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str = "policy||ref"
                    ) -> torch.Tensor:
    """Mean over inputs of the exact KL between the policy and the reference answer distributions, summed over
    all C answers. ``"policy||ref"`` is RLHF's KL(π_θ ‖ π_ref) (Ouyang et al. 2022, eq. 2); ``"ref||policy"``
    is KL(π_ref ‖ π_θ), the distillation direction. Both are 0, with zero gradient, at π_θ = π_ref."""
    _validate.one_of("direction", direction, ("policy||ref", "ref||policy"))
    logp, ref_logp = F.log_softmax(logits, 1), F.log_softmax(ref_logits.detach(), 1)  # [B, C]
    if direction == "policy||ref":
        return (logp.exp() * (logp - ref_logp)).sum(1).mean()
    return (ref_logp.exp() * (ref_logp - logp)).sum(1).mean()


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE (Williams 1992) with the batch-mean reward as baseline: −mean((r − r̄)·log π(a|x)).
    logits [B, C], sampled actions [B], rewards [B]."""
    advantage = (rewards - rewards.mean()).detach()  # [B]
    logp = F.log_softmax(logits, 1).gather(1, actions[:, None]).squeeze(1)  # [B]
    return -(advantage * logp).mean()


def rl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            beta: float) -> torch.Tensor:
    """KL-penalised REINFORCE (Ziegler et al. 2019, eq. 2): reward term plus β·KL(π_θ ‖ π_ref) on the same inputs."""
    beta = check_beta(beta)
    return reinforce_loss(logits, actions, rewards) + beta * kl_to_reference(logits, ref_logits)


# ------------------------------------------------------------------ the KL as a quadratic: implicit full-matrix EWC

def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def kl_along(model: nn.Module, delta: dict[str, torch.Tensor], x: torch.Tensor, scale: float = 1.0,
             direction: str = "ref||policy") -> float:
    """Exact mean KL over inputs x [N, D] between the model at θ (the reference) and at θ + scale·Δθ."""
    theta = _params(model)
    moved = {n: theta[n] + scale * delta[n] for n in theta}
    with torch.no_grad():
        ref_logits = functional_call(model, theta, (x,))
        logits = functional_call(model, moved, (x,))
        return kl_to_reference(logits, ref_logits, direction).item()


def fisher_quadratic(model: nn.Module, delta: dict[str, torch.Tensor], x: torch.Tensor, scale: float = 1.0) -> float:
    """½ Δθᵀ F Δθ with F the exact (full) Fisher of the model's softmax at θ, averaged over inputs x [N, D],
    without forming F: with u = J Δθ the logits' directional derivative [N, C] (one forward-mode pass),
    Δθᵀ F Δθ = E_x[Σ_c p_c u_c² − (Σ_c p_c u_c)²], the variance of u under p."""
    theta = _params(model)
    tangent = {n: scale * delta[n] for n in theta}
    logits, u = jvp(lambda params: functional_call(model, params, (x,)), (theta,), (tangent,))  # [N, C] each
    p = logits.softmax(1)
    variance = (p * u.pow(2)).sum(1) - (p * u).sum(1).pow(2)  # [N]
    return 0.5 * variance.mean().item()


def diagonal_quadratic(fisher_diag: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                       scale: float = 1.0) -> float:
    """EWC's penalty without λ: ½ Σ_i F_ii Δθ_i² (Kirkpatrick et al. 2017, eq. 3), for comparison."""
    return 0.5 * sum((fisher_diag[n] * (scale * delta[n]).pow(2)).sum().item() for n in fisher_diag)


def full_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exact full Fisher [P, P] (parameters flattened in named_parameters order), from per-sample Jacobians;
    only for tiny models (tests)."""
    theta = _params(model)
    names = list(theta)

    def logits_of(flat: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:  # [C]
        params, start = {}, 0
        for n in names:
            params[n] = flat[start:start + theta[n].numel()].reshape(theta[n].shape)
            start += theta[n].numel()
        return functional_call(model, params, (xb[None],))[0]

    flat = torch.cat([theta[n].reshape(-1) for n in names])
    total = torch.zeros(len(flat), len(flat), dtype=flat.dtype)
    for xb in x:
        jac = torch.autograd.functional.jacobian(lambda f, xb=xb: logits_of(f, xb), flat)  # [C, P]
        p = logits_of(flat, xb).softmax(0).detach()  # [C]
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total / len(x)


# ------------------------------------------------------------------ a separate low-rank adapter per stage

class StageLoRALinear(nn.Module):
    """A frozen nn.Linear plus one rank-r adapter ΔW_s = B_s A_s per stage s (Hu et al. 2021, eq. 3).
    ``active`` names the stages whose adapters are added to the output."""

    def __init__(self, base: nn.Linear, stages: Sequence[str], rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        _validate.positive_int("rank", rank)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = _validate.positive("alpha", alpha) / rank
        self.A = nn.ParameterDict({s: nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
                                   for s in stages})  # [r, in]
        self.B = nn.ParameterDict({s: nn.Parameter(torch.zeros(base.out_features, rank)) for s in stages})  # [out, r]
        self.active: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] -> [N, out]
        out = self.base(x)
        for s in self.active:
            out = out + self.scaling * (x @ self.A[s].T) @ self.B[s].T
        return out


class StageAdapters(nn.Module):
    """A frozen backbone whose every Linear carries one adapter per stage. ``train_stage(s)`` makes only stage
    s's adapter trainable and switches on that adapter alone (each stage learns on the untouched backbone);
    ``use(stages)`` picks the adapters for inference (several are summed); ``use([])`` is the bare backbone."""

    def __init__(self, backbone: nn.Module, stages: Sequence[str] = STAGES, rank: int = 4) -> None:
        super().__init__()
        for s in stages:
            check_stage(s)
        self.stages = tuple(stages)
        self.backbone = backbone
        self.layers: list[StageLoRALinear] = []
        for parent in list(backbone.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    wrapped = StageLoRALinear(child, self.stages, rank)
                    setattr(parent, name, wrapped)
                    self.layers.append(wrapped)

    def use(self, stages: Sequence[str]) -> StageAdapters:
        for s in stages:
            if s not in self.stages:
                raise ValueError(f"stages must be among {self.stages}, got {s!r}")
        for layer in self.layers:
            layer.active = list(stages)
        return self

    def train_stage(self, stage: str) -> list[nn.Parameter]:
        """Freeze everything but ``stage``'s adapter and switch it on alone; returns its parameters."""
        if stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages}, got {stage!r}")
        self.use([stage])
        trainable = []
        for layer in self.layers:
            for s in self.stages:
                for p in (layer.A[s], layer.B[s]):
                    p.requires_grad_(s == stage)
            trainable += [layer.A[stage], layer.B[stage]]
        return trainable

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The frozen weights W₀ (copies), to prove they never change."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if ".base." in n}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
