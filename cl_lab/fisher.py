"""Diagonal Fisher estimates, computed exactly from per-sample gradients in one batched pass.

For a classifier p(c|x) = softmax(f_θ(x))_c the diagonal Fisher of parameter i is

    F_i = E_x Σ_c p(c|x) (∂ log p(c|x) / ∂θ_i)²            ("exact", the "true" Fisher)

Everything else in the wild is an estimate of it, or not even that:

| estimate          | per-sample term                                  | is it a Fisher?                        |
|-------------------|--------------------------------------------------|----------------------------------------|
| ``exact``         | Σ_c p(c|x) (∇ log p(c|x))²                       | yes, the definition                    |
| ``sampled``       | (∇ log p(ŷ|x))², ŷ ~ p(·|x)                      | unbiased Monte Carlo estimate of it    |
| ``empirical``     | (∇ log p(y|x))², y the dataset label              | equals it only when p(·|x) ≈ one-hot(y)|
| ``predicted``     | (∇ log p(argmax p|x))²                            | biased: the most likely class only     |
| ``batch_squared`` | (1/B Σ_b ∇ log p(y_b|x_b))², per minibatch        | no: a squared mean gradient, ≈ F / B   |

Per-sample squared gradients come from one forward and one backward per label choice: a forward hook
keeps every Linear/Conv2d layer's input a [B, …] and output z; ``autograd.grad`` of the summed per-sample
log-probs with respect to the outputs gives g = ∂ log p_b / ∂z_b (samples do not interact), and the
per-sample weight gradient is g_b a_bᵀ, so Σ_b (g_b a_bᵀ)² = (g²)ᵀ(a²) for a Linear layer on flat inputs.
Models must not mix samples (no BatchNorm in training mode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate

ESTIMATES = ("exact", "sampled", "empirical", "predicted", "batch_squared")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, D], t [B]) -> logits [B, C]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by name; a model without any is an error."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model must have trainable parameters, got none with requires_grad=True")
    return params


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers holding trainable parameters; every trainable parameter must live in a supported layer."""
    params = trainable(model)
    layers, covered = [], set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            raise TypeError(f"model must keep its trainable parameters in {[c.__name__ for c in SUPPORTED_LAYERS]} "
                            f"layers for per-sample gradients, got {type(module).__name__} at {name!r}")
        layers.append((name, module))
        covered |= {id(p) for p in own}
    assert covered == {id(p) for p in params.values()}
    return layers


class LayerCapture:
    """Forward hooks that keep each supported layer's input and output for one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = _layers(model)
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._keep) for _, m in self.layers]

    def _keep(self, module, inputs, output) -> None:
        self.inputs.append(inputs[0].detach())
        self.outputs.append(output)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _per_sample_weight_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients [B, *weight.shape] for layers whose per-sample term is not separable."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, Cin*k*k, L]
        grads = torch.einsum("bol,bil->boi", g.flatten(2), cols)  # [B, Cout, Cin*k*k]
        return grads.reshape(len(a), *module.weight.shape)
    return torch.einsum("bli,blo->boi", a.reshape(len(a), -1, a.shape[-1]), g.reshape(len(g), -1, g.shape[-1]))


def _accumulate(sums: dict[str, torch.Tensor], layers, inputs, grads, power: int) -> None:
    """Add Σ_b |per-sample grad|^power of every layer's weight and bias to ``sums``."""
    for (name, module), a, g in zip(layers, inputs, grads, strict=True):
        if isinstance(module, nn.Linear) and a.dim() == 2:
            weight = g.abs().pow(power).T @ a.abs().pow(power)  # [out, in]
        else:
            weight = _per_sample_weight_grads(module, a, g).abs().pow(power).sum(0)
        if module.weight.requires_grad:
            sums[f"{name}.weight" if name else "weight"] += weight
        if module.bias is not None and module.bias.requires_grad:
            conv = isinstance(module, nn.Conv2d)
            per_position = g.flatten(2).transpose(1, 2) if conv else g.reshape(len(g), -1, g.shape[-1])  # [B, L, out]
            bias_grad = per_position.sum(1)  # [B, out]
            sums[f"{name}.bias" if name else "bias"] += bias_grad.abs().pow(power).sum(0)


def _zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainable(model).items()}


def per_sample_sum(model: nn.Module, x: torch.Tensor, objectives: Callable[[torch.Tensor], list[torch.Tensor]],
                   *, forward: Callable[[torch.Tensor], torch.Tensor] | None = None, power: int = 2
                   ) -> dict[str, torch.Tensor]:
    """Σ over samples b and objectives k of |∂ s_kb / ∂θ|^power, with s_k = objectives(outputs)[k] [B].

    One forward; one backward (to the layer outputs only) per objective. Exact, not an approximation,
    as long as each s_kb depends on sample b alone.
    """
    forward = forward or model
    sums = _zeros(model)
    capture = LayerCapture(model)
    try:
        out = forward(x)
        scores = objectives(out)
        for k, s in enumerate(scores):
            grads = torch.autograd.grad(s.sum(), capture.outputs, retain_graph=k + 1 < len(scores),
                                        allow_unused=True)
            grads = [torch.zeros_like(o) if gr is None else gr for o, gr in zip(capture.outputs, grads, strict=True)]
            _accumulate(sums, capture.layers, capture.inputs, grads, power)
    finally:
        capture.close()
    return sums


def targets(estimate: str, log_probs: torch.Tensor, y: torch.Tensor | None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The label each sample's gradient is taken at, for the single-label estimates [B]."""
    if estimate == "sampled":
        return torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).squeeze(1).to(log_probs.device)
    if estimate == "predicted":
        return log_probs.detach().argmax(1)
    if y is None:
        raise ValueError(f"y must be given for estimate={estimate!r} (it uses the dataset labels)")
    return y


def _log_prob_objectives(estimate: str, y: torch.Tensor | None, generator) -> Callable:
    def objectives(logits: torch.Tensor) -> list[torch.Tensor]:
        log_probs = F.log_softmax(logits, dim=1)  # [B, C]
        if estimate == "exact":  # p_c (∇ log p_c)² = (∇ [√p_c·log p_c])² with √p_c held constant
            weights = log_probs.detach().exp().sqrt()  # [B, C]
            live = (weights > 0).any(0).nonzero().flatten().tolist()  # classes no sample can pick are skipped
            return [weights[:, c] * log_probs[:, c] for c in live]
        label = targets(estimate, log_probs, y, generator)
        return [log_probs.gather(1, label[:, None]).squeeze(1)]
    return objectives


def fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                    t: torch.Tensor | None = None, *, estimate: str = "exact", forward: Forward | None = None,
                    batch_size: int = 64, chunk_size: int = 1000, generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
    """The diagonal Fisher estimate ``estimate`` (see module doc) over inputs x [N, D], labels y [N].

    ``forward(x, t)`` gives the logits (default ``model(x)``; pass a stream's masked forward for Task-IL).
    ``batch_size`` is only used by ``batch_squared``; ``chunk_size`` bounds memory for the others.
    Returns {parameter name: F} averaged over the N samples, in float32.
    """
    _validate.one_of("estimate", estimate, ESTIMATES)
    _validate.positive_int("batch_size", batch_size)
    _validate.positive_int("chunk_size", chunk_size)
    if len(x) == 0:
        raise ValueError("x must hold at least one sample, got 0")
    t = torch.zeros(len(x), dtype=torch.long, device=x.device) if t is None else t
    call = forward or (lambda xb, tb: model(xb))
    was_training = model.training
    model.eval()
    try:
        if estimate == "batch_squared":
            return _batch_squared(model, x, y, t, call, batch_size)
        total = _zeros(model)
        for s in range(0, len(x), chunk_size):
            yb = None if y is None else y[s:s + chunk_size]
            part = per_sample_sum(model, x[s:s + chunk_size], _log_prob_objectives(estimate, yb, generator),
                                  forward=lambda xb, tb=t[s:s + chunk_size]: call(xb, tb))
            for n in total:
                total[n] += part[n]
        return {n: v / len(x) for n, v in total.items()}
    finally:
        model.train(was_training)


def _batch_squared(model, x, y, t, call, batch_size) -> dict[str, torch.Tensor]:
    """Mean over minibatches of (minibatch-mean gradient of log p(y|x))²: what many EWC codes compute."""
    if y is None:
        raise ValueError("y must be given for estimate='batch_squared' (it uses the dataset labels)")
    params = trainable(model)
    total = _zeros(model)
    n_batches = 0
    for s in range(0, len(x), batch_size):
        log_probs = F.log_softmax(call(x[s:s + batch_size], t[s:s + batch_size]), dim=1)
        mean_log_lik = log_probs.gather(1, y[s:s + batch_size, None]).mean()
        grads = torch.autograd.grad(mean_log_lik, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            total[n] += (torch.zeros_like(p) if g is None else g).pow(2)
        n_batches += 1
    return {n: v / n_batches for n, v in total.items()}


def fisher_diagonal_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                         t: torch.Tensor | None = None, *, estimate: str = "exact",
                         forward: Forward | None = None, generator: torch.Generator | None = None
                         ) -> dict[str, torch.Tensor]:
    """Reference: the same estimate with one backward per sample (and per class for ``exact``). Slow."""
    _validate.one_of("estimate", estimate, ESTIMATES[:4])
    t = torch.zeros(len(x), dtype=torch.long, device=x.device) if t is None else t
    call = forward or (lambda xb, tb: model(xb))
    params = trainable(model)
    total = _zeros(model)
    with torch.no_grad():  # draw every sample's label first, exactly as the batched version does
        all_log_probs = F.log_softmax(call(x, t), dim=1)
    labels = None if estimate == "exact" else targets(estimate, all_log_probs, y, generator)
    for b in range(len(x)):
        log_probs = F.log_softmax(call(x[b:b + 1], t[b:b + 1]), dim=1)[0]  # [C]
        pairs = ([(c, log_probs[c].exp().item()) for c in range(len(log_probs))] if labels is None
                 else [(labels[b].item(), 1.0)])
        for c, weight in pairs:
            if weight == 0:
                continue
            grads = torch.autograd.grad(log_probs[c], list(params.values()), retain_graph=True, allow_unused=True)
            for (n, p), g in zip(params.items(), grads, strict=True):
                total[n] += weight * (torch.zeros_like(p) if g is None else g).pow(2)
    return {n: v / len(x) for n, v in total.items()}


def flatten(importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """All entries of a {name: tensor} importance as one vector [P] (in insertion order)."""
    return torch.cat([v.reshape(-1) for v in importance.values()])
