"""One lookup for the modules that tracing, patching and editing code addresses, on GPT-2 and Llama alike.

| what          | GPT-2 (``GPT2LMHeadModel``)  | Llama / SmolLM2 (``LlamaForCausalLM``) |
|---------------|------------------------------|----------------------------------------|
| block l       | ``transformer.h.{l}``        | ``model.layers.{l}``                   |
| MLP           | ``transformer.h.{l}.mlp``    | ``model.layers.{l}.mlp``               |
| MLP input     | ``….mlp.c_fc``               | ``….mlp.up_proj`` (gated by gate_proj) |
| MLP output    | ``….mlp.c_proj``             | ``….mlp.down_proj``                    |
| attention     | ``….attn``                   | ``….self_attn``                        |
| attention out | ``….attn.c_proj``            | ``….self_attn.o_proj``                 |
| embeddings    | ``transformer.wte``          | ``model.embed_tokens``                 |
| final norm    | ``transformer.ln_f``         | ``model.norm``                         |

GPT-2's projections are ``transformers`` ``Conv1D`` layers whose weight is stored [in, out] (y = x W + b);
Llama's are ``nn.Linear`` with weight [out, in]. ``weight_out_in`` returns a [out, in] *view* of either, so
an in-place edit (ROME's rank-one update) is written the same way on both. ROME's key at layer l is the
input of the MLP output projection, its value that projection's output.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cl_lab import _validate

PARTS = ("block", "mlp", "mlp_in", "mlp_out", "attn", "attn_out")


class Layout:
    """Module paths of one model family (see the module docstring's table): ``family`` ('gpt2' or 'llama'),
    ``blocks``, ``parts`` (part → path inside a block), ``embed``, ``final_norm``."""

    def __init__(self, model: nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers
        base = getattr(base, "lm", base)  # an LMClassifier
        if hasattr(base, "transformer") and hasattr(base.transformer, "h"):
            self.family, self.blocks = "gpt2", "transformer.h"
            self.embed, self.final_norm = "transformer.wte", "transformer.ln_f"
            self.parts = {"mlp": "mlp", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj", "attn": "attn",
                          "attn_out": "attn.c_proj"}
        elif hasattr(base, "model") and hasattr(base.model, "layers"):
            self.family, self.blocks = "llama", "model.layers"
            self.embed, self.final_norm = "model.embed_tokens", "model.norm"
            self.parts = {"mlp": "mlp", "mlp_in": "mlp.up_proj", "mlp_out": "mlp.down_proj", "attn": "self_attn",
                          "attn_out": "self_attn.o_proj"}
        else:
            raise TypeError(f"model must be a GPT-2 or Llama-style causal LM (transformer.h or model.layers), "
                            f"got {type(base).__name__}")
        self.model = base

    @property
    def n_layers(self) -> int:
        return len(self.model.get_submodule(self.blocks))

    def path(self, part: str, layer: int) -> str:
        """The dotted path of ``part`` (one of ``PARTS``) in block ``layer``, e.g. 'transformer.h.3.mlp.c_proj'."""
        _validate.one_of("part", part, PARTS)
        _validate.non_negative_int("layer", layer)
        if layer >= self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer}")
        block = f"{self.blocks}.{layer}"
        return block if part == "block" else f"{block}.{self.parts[part]}"

    def module(self, part: str, layer: int) -> nn.Module:
        """The module of ``part`` in block ``layer`` (of the unwrapped model: PEFT's wrappers included)."""
        return self.model.get_submodule(self.path(part, layer))

    def block(self, layer: int) -> nn.Module:
        return self.module("block", layer)

    def mlp(self, layer: int) -> nn.Module:
        return self.module("mlp", layer)

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module("mlp_out", layer)

    def attn(self, layer: int) -> nn.Module:
        return self.module("attn", layer)

    def attn_out(self, layer: int) -> nn.Module:
        return self.module("attn_out", layer)

    def embedding(self) -> nn.Embedding:
        return self.model.get_submodule(self.embed)


def layout(model: nn.Module) -> Layout:
    """The module lookup of a GPT-2 or Llama causal LM (or its ``LMClassifier``, or a PEFT model around it)."""
    return Layout(model)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as a [out, in] view (a transpose for ``Conv1D``): edits write through."""
    module = getattr(module, "base_layer", module)  # a PEFT LoRA layer: its frozen base
    if isinstance(module, Conv1D):
        return module.weight.T  # stored [in, out]
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"module must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
