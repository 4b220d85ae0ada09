"""The two remedies practitioners use when fine-tuning a language model, as cl_lab ``Method``s for the
classifier view (``lab.as_classifier()``): replay of pretraining text, and a KL term to the base model."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.lm.lab import Lab, LMClassifier, lm_loss
from cl_lab.lm.tokenizer import encode
from cl_lab.methods.base import Context, Method

KL_INPUTS = ("task", "text")
KL_DIRECTIONS = ("reverse", "forward")


def _classifier(ctx: Context, method: str) -> LMClassifier:
    if not isinstance(ctx.model, LMClassifier):
        raise TypeError(f"{method} needs the LM's classifier view as the model (lab.as_classifier()), "
                        f"got {type(ctx.model).__name__}")
    return ctx.model


def _texts(lab: Lab, texts: Sequence[str] | None) -> list[str]:
    if texts is None:
        if lab.world is None:
            raise ValueError("texts must be given for a lab without a world (a real model), got None")
        return lab.world.pretraining_texts()
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one text, got none")
    return texts


class TextReplay(Method):
    """Replay of pretraining text with the full next-token loss, its share counted in supervised tokens.

    Each fine-tuning prompt supervises one token (its object). Replay keeps, over the run, a share
    ``token_share`` of all supervised tokens coming from ``texts`` (default: the world's pretraining corpus):
    after each batch of B prompts it owes B·s/(1 − s) more replay tokens and draws whole sentences (seeded)
    until the debt is paid, carrying the remainder. The loss is the pooled token mean's numerator over B,

        L = (Σ_prompts CE(object) + Σ_replay tokens CE(next token)) / B,

    i.e. mixing the replay tokens into the batch, every supervised token weighted alike (the mixing of
    continual pretraining, as in Ibrahim et al. 2024, arXiv 2403.08763, counted in tokens).
    ``share`` reports the share actually replayed.
    """

    name = "text_replay"

    def __init__(self, lab: Lab, token_share: float = 0.05, *, texts: Sequence[str] | None = None,
                 seed: int = 0) -> None:
        self.token_share = _validate.in_range("token_share", token_share, 0.0, 1.0, high_open=True)
        self.seed = _validate.non_negative_int("seed", seed)
        self.pad_id = lab.tokenizer.pad_token_id
        self.use_texts(lab, _texts(lab, texts))
        self.generator = torch.Generator().manual_seed(seed)
        self.owed, self.task_tokens, self.replay_tokens = 0.0, 0, 0

    def use_texts(self, lab: Lab, texts: Sequence[str]) -> None:
        """Replay ``texts`` from now on (the debt and the token counts carry over)."""
        self.ids = encode(lab.tokenizer, texts, add_eos=True)  # [N, L]
        self.row_tokens = ((self.ids != self.pad_id).sum(1) - 1).tolist()  # supervised tokens per text

    @property
    def share(self) -> float:
        """Replayed tokens / all supervised tokens so far (nan before training)."""
        total = self.task_tokens + self.replay_tokens
        return self.replay_tokens / total if total else float("nan")

    def _draw(self) -> list[int]:
        rows = []
        while self.owed > 0:
            i = int(torch.randint(len(self.row_tokens), (1,), generator=self.generator))
            rows.append(i)
            self.owed -= self.row_tokens[i]
        return rows

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        clf = _classifier(ctx, "TextReplay")
        self.task_tokens += len(y)
        self.owed += len(y) * self.token_share / (1 - self.token_share)
        rows = self._draw()
        if not rows:
            return None
        self.replay_tokens += sum(self.row_tokens[i] for i in rows)
        ids = self.ids[rows].to(x.device)  # [R, L]
        return lm_loss(clf.lm, ids, self.pad_id, reduction="sum") / len(y)

    def describe(self) -> dict:
        return {"method": self.name, "token_share": self.token_share, "seed": self.seed}


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) for logits [..., V] → [...], exact over the vocabulary."""
    log_p, log_q = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class KLToBase(Method):
    """A KL term that keeps the fine-tuned LM's next-token distributions near a frozen copy of the base model:

        L = L_task + β · mean over positions of KL(p_θ ‖ p_base)        (direction="reverse")

    the KL-to-reference penalty of RLHF (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155);
    ``direction="forward"`` uses KL(p_base ‖ p_θ), distillation from the base (Hinton et al. 2015). Both are
    exact sums over the vocabulary. Where it is measured (``on``):

    - ``"task"``: at the position the task trains (each prompt's last token), on the task's own prompts —
      it pulls against the very change the task asks for;
    - ``"text"``: at every position of ``batch_size`` texts per step drawn from ``texts`` (default the
      world's pretraining corpus) — it guards general behaviour and leaves the task's positions free.

    ``reference`` (a ``Lab``, a causal LM or its ``LMClassifier``) is deep-copied and frozen at construction.
    """

    name = "kl_to_base"

    def __init__(self, reference: Lab | nn.Module, beta: float = 0.1, *, on: str = "task",
                 direction: str = "reverse", texts: Sequence[str] | None = None, batch_size: int = 16,
                 seed: int = 0) -> None:
        self.beta = _validate.non_negative("beta", beta)
        self.on = _validate.one_of("on", on, KL_INPUTS)
        self.direction = _validate.one_of("direction", direction, KL_DIRECTIONS)
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        self.seed = _validate.non_negative_int("seed", seed)
        model = reference.model if isinstance(reference, Lab) else reference
        model = model.lm if isinstance(model, LMClassifier) else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"reference must be a Lab or a causal LM module, got {type(reference).__name__}")
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.ids = None
        if on == "text":
            if not isinstance(reference, Lab):
                raise TypeError("reference must be a Lab for on='text' (its tokenizer encodes the texts)")
            self.ids = encode(reference.tokenizer, _texts(reference, texts), add_eos=True)  # [N, L]
            self.pad_id = reference.tokenizer.pad_token_id
            self.generator = torch.Generator().manual_seed(seed)

    def _kl(self, current: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return kl_divergence(current, base) if self.direction == "reverse" else kl_divergence(base, current)

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        clf = _classifier(ctx, "KLToBase")
        self.reference.to(x.device)
        if self.beta == 0:
            return None
        if self.on == "task":
            with torch.no_grad():
                base = LMClassifier(self.reference, clf.pad_id)(x)  # [B, V]
            return self.beta * self._kl(logits, base).mean()
        rows = torch.randint(len(self.ids), (self.batch_size,), generator=self.generator)
        ids = self.ids[rows]
        real = ids != self.pad_id  # [b, L]
        width = int(real.sum(1).max())
        ids, real = ids[:, :width].to(x.device), real[:, :width].to(x.device)
        current = clf.lm(input_ids=ids, attention_mask=real.long()).logits  # [b, L, V]
        with torch.no_grad():
            base = self.reference(input_ids=ids, attention_mask=real.long()).logits  # [b, L, V]
        return self.beta * self._kl(current, base)[real].mean()

    def describe(self) -> dict:
        return {"method": self.name, "beta": self.beta, "on": self.on, "direction": self.direction,
                "batch_size": self.batch_size, "seed": self.seed}
