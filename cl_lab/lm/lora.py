"""LoRA on the language model: which projections to adapt, the adapted classifier, and PEFT's twin of it.

GPT-2's projections are ``transformers`` ``Conv1D`` layers (weight [in, out], y = x W + b); cl_lab's
``LoRALinear`` adapts them as it adapts an ``nn.Linear`` (the adapter path x Aᵀ Bᵀ · α/r does not care how the
frozen weight is stored), which is what PEFT does with ``fan_in_fan_out=True``.

| where        | GPT-2 (``GPT2LMHeadModel``)     | Llama / SmolLM2                                  |
|--------------|---------------------------------|--------------------------------------------------|
| attention    | ``c_attn``, ``attn.c_proj``     | ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``   |
| mlp          | ``c_fc``, ``mlp.c_proj``        | ``gate_proj``, ``up_proj``, ``down_proj``        |
| all          | both                            | both                                             |

Target names are PEFT's: a module is adapted when its name is the target or ends with ``"." + target``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from cl_lab import _validate
from cl_lab.lm.lab import Lab, LMClassifier
from cl_lab.lm.layout import layout
from cl_lab.methods.base import Context, Method
from cl_lab.methods.lora import LoRALinear, LoRAModel

WHERE = ("all", "attention", "mlp")
_TARGETS = {"gpt2": {"attention": ("c_attn", "attn.c_proj"), "mlp": ("c_fc", "mlp.c_proj")},
            "llama": {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
                      "mlp": ("gate_proj", "up_proj", "down_proj")}}


def lora_targets(model: nn.Module, where: str = "all") -> tuple[str, ...]:
    """PEFT-style target names of the attention projections, the MLP projections, or both (``where``)."""
    _validate.one_of("where", where, WHERE)
    names = _TARGETS[layout(model).family]
    return names["attention"] + names["mlp"] if where == "all" else names[where]


def lora_lm(lab: Lab, rank: int = 8, alpha: float = 16.0, *, where: str = "all",
            targets: Sequence[str] | None = None, seed: int = 0) -> LoRAModel:
    """The lab's LM as a classifier (prompts [B, L] → next-token logits [B, V]) with one LoRA adapter of rank
    ``rank`` and scale α/r on the projections ``where`` names (or on explicit ``targets``); the LM is copied,
    frozen, and left unchanged. Train it with ``train.fit`` and ``SharedLoRA`` / ``PerTaskLoRA``; measure it
    with ``lm.evaluate(model.net, …)`` (``model.net`` is the adapted ``LMClassifier``)."""
    if not isinstance(lab, Lab):
        raise TypeError(f"lab must be a cl_lab.lm Lab, got {type(lab).__name__}")
    targets = lora_targets(lab.model, where) if targets is None else targets
    return LoRAModel(lab.as_classifier(), rank, alpha, seed, targets=targets)


def _require_lm_lora(model: LoRAModel) -> LMClassifier:
    if not isinstance(model, LoRAModel) or not isinstance(model.net, LMClassifier):
        raise TypeError(f"model must be a LoRAModel around an LM classifier (cl_lab.lm.lora_lm), "
                        f"got {type(model).__name__}")
    if model.targets is None:
        raise ValueError("model must have been built with explicit targets (lora_lm does so), got targets=None")
    return model.net


def peft_twin(model: LoRAModel, adapter: int = 0) -> nn.Module:
    """PEFT's LoRA of the same base LM, targets, rank and α (``fan_in_fan_out=True`` for GPT-2's Conv1D,
    ``init_lora_weights=True``, no dropout), holding a copy of ``adapter``'s A and B: a ``PeftModel``
    whose forward(input_ids, attention_mask) must equal ``model.net.lm``'s with that adapter active."""
    from peft import LoraConfig, get_peft_model

    clf = _require_lm_lora(model)
    model.check_adapter(adapter)
    layers = {name: m for name, m in clf.lm.named_modules() if isinstance(m, LoRALinear)}
    first = next(iter(layers.values()))
    rank, scale = first.A[adapter].shape[0], first.scales[adapter]
    base = model.merged().lm  # the frozen LM with no adapter folded in: the original weights
    config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=list(model.targets), lora_dropout=0.0,
                        fan_in_fan_out=first.fan_in_fan_out, init_lora_weights=True, bias="none")
    with warnings.catch_warnings():  # transformers' own deprecation notice, raised inside PEFT
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        twin = get_peft_model(copy.deepcopy(base), config)
    inner = twin.get_base_model()
    peft_layers = {name for name, m in inner.named_modules() if hasattr(m, "lora_A")}
    if peft_layers != set(layers):
        raise RuntimeError(f"PEFT adapted {sorted(peft_layers)}, cl_lab {sorted(layers)}")
    with torch.no_grad():
        for name, layer in layers.items():
            target = inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.A[adapter])  # [r, d_in]
            target.lora_B["default"].weight.copy_(layer.B[adapter])  # [d_out, r]
    return twin


def adapter_pairs(model: LoRAModel, twin: nn.Module, adapter: int = 0) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(cl_lab parameter, PEFT parameter) pairs, A then B per adapted layer, in model order."""
    clf = _require_lm_lora(model)
    inner = twin.get_base_model()
    pairs = []
    for name, layer in clf.lm.named_modules():
        if isinstance(layer, LoRALinear):
            target = inner.get_submodule(name)
            pairs += [(layer.A[adapter], target.lora_A["default"].weight),
                      (layer.B[adapter], target.lora_B["default"].weight)]
    return pairs


class ThroughAdapters(Method):
    """An LM method written for the plain classifier view (``lm.TextReplay``, ``lm.KLToBase``) used on a
    ``LoRAModel``: its loss term is computed on the adapted classifier inside (``model.net``), so replay and
    the KL term pass through the adapters. Put it beside ``SharedLoRA`` or ``PerTaskLoRA`` in ``train.fit``."""

    def __init__(self, method: Method) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a cl_lab Method, got {type(method).__name__}")
        self.method = method
        self.name = method.name

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        model = ctx.model.net if isinstance(ctx.model, LoRAModel) else ctx.model
        return self.method.extra_loss(dataclasses.replace(ctx, model=model), x, y, t, logits)

    def describe(self) -> dict:
        return {**self.method.describe(), "through": "adapters"}
