"""Generative replay for a language model: replay the model's own samples instead of the pretraining text.

- ``sample_texts``: ancestral sampling from ``<bos>`` alone, seeded, special tokens other than ``<eos>`` never drawn.
- ``SelfReplay``: LAMOL's choice (Sun et al. 2020, ICLR, "LAMOL: LAnguage MOdeling for Lifelong Language
  Learning", section 3): at the start of every task the model *being trained* writes the pseudo-data that is
  replayed during that task. Replaying samples of a *frozen* copy of the pretrained model instead is
  ``TextReplay(lab, share, texts=sample_texts(lab.model, ...))``: the same sampler, a generator that never moves.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.lab import Lab
from cl_lab.lm.methods import TextReplay, _classifier
from cl_lab.lm.tokenizer import BOS, EOS, PAD, UNK
from cl_lab.methods.base import Context


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, n: int, *, max_tokens: int = 16,
                 temperature: float = 1.0, seed: int = 0) -> list[str]:
    """``n`` texts sampled from ``model`` (a causal LM of the lab's word-level tokenizer), each from ``<bos>`` until
    ``<eos>`` or ``max_tokens`` words: x_{i+1} ~ softmax(logits_i / temperature), with a seeded generator."""
    _validate.positive_int("n", n)
    _validate.positive_int("max_tokens", max_tokens)
    _validate.positive("temperature", temperature)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), BOS, dtype=torch.long, device=device)  # [n, 1]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    nxt, past = ids, None
    for _ in range(max_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float().cpu() / temperature  # [n, V]
        logits[:, [PAD, BOS, UNK]] = float("-inf")
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).to(device)  # [n, 1]
        nxt[done] = EOS
        ids = torch.cat([ids, nxt], 1)
        done |= nxt[:, 0] == EOS
        if done.all():
            break
    model.train(was_training)
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in ids]
    return [t for t in texts if t]


class SelfReplay(TextReplay):
    """Replay of the current model's own samples, regenerated at the start of every task (LAMOL, Sun et al. 2020):

        texts_k = sample_texts(θ at the start of task k, n_texts),   L = (Σ CE(object) + Σ_replay CE(next token)) / B,

    the loss and the token share of ``TextReplay``. Task k's samples are drawn with seed ``seed + k``, so the first
    task replays exactly what a frozen copy sampled with ``seed`` would. ``samples[k]`` keeps each task's texts.
    """

    name = "self_replay"

    def __init__(self, lab: Lab, token_share: float = 0.05, *, n_texts: int = 1000, temperature: float = 1.0,
                 seed: int = 0) -> None:
        self.lab, self.n_texts, self.temperature = lab, _validate.positive_int("n_texts", n_texts), temperature
        super().__init__(lab, token_share, texts=self._sample(lab.model, seed), seed=seed)
        self.samples: list[list[str]] = []

    def _sample(self, model: nn.Module, seed: int) -> list[str]:
        return sample_texts(model, self.lab.tokenizer, self.n_texts, temperature=self.temperature, seed=seed)

    def on_task_start(self, ctx: Context) -> None:
        texts = self._sample(_classifier(ctx, "SelfReplay").lm, self.seed + ctx.task_index)
        self.use_texts(self.lab, texts)
        self.samples.append(texts)

    def describe(self) -> dict:
        return {**super().describe(), "n_texts": self.n_texts, "temperature": self.temperature}
