"""Measurements of a language model: fact recall (next-token accuracy of the object), perplexity, and the
one-row ``evaluate`` the chapters report (recall, paraphrase, neighbourhood, perplexity)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.lab import LMClassifier, lm_loss
from cl_lab.lm.tokenizer import encode, is_word_level
from cl_lab.lm.world import Fact, World


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, LMClassifier) else model


def fact_batch(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L] right-padded prompt ids and y [N] object token ids (each object must be one token)."""
    if not facts:
        raise ValueError("facts must hold at least one fact, got none")
    x = encode(tokenizer, [f.prompt for f in facts], length=length)
    objects = encode(tokenizer, [f.object for f in facts])  # [N, k]: the tokenizer's leading tokens, then the object
    lengths = (objects != tokenizer.pad_token_id).sum(1)
    lead = len(tokenizer("", add_special_tokens=True)["input_ids"])
    if (lengths != lead + 1).any():
        bad = [f.object for f, n in zip(facts, lengths.tolist()) if n != lead + 1]
        raise ValueError(f"facts' objects must be one token each, got {bad[:5]}")
    return x, objects[:, lead]


@torch.no_grad()
def object_logits(model: nn.Module, x: torch.Tensor, pad_id: int, batch_size: int = 1024) -> torch.Tensor:
    """Next-token logits [N, V] at each prompt's last real token, batched, in eval mode, without gradients."""
    clf = LMClassifier(_causal_lm(model), pad_id)
    was_training = clf.training
    clf.eval()
    device = next(clf.parameters()).device
    try:
        return torch.cat([clf(x[s:s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)])
    finally:
        clf.train(was_training)


def hits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
         batch_size: int = 1024) -> torch.Tensor:
    """[N] bool: is each fact's object the model's top next token after its prompt?"""
    x, y = fact_batch(tokenizer, facts)
    return object_logits(model, x, tokenizer.pad_token_id, batch_size).argmax(1) == y


def recall(model: nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact],
           batch_size: int = 1024) -> float:
    """Fraction of ``facts`` whose object is the model's top next token after the prompt (nan for no facts)."""
    if not facts:
        return math.nan
    return hits(model, tokenizer, facts, batch_size).double().mean().item()


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               batch_size: int = 512) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``texts`` (each ends with the end token)."""
    lm = _causal_lm(model)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    total, count = 0.0, 0
    try:
        for s in range(0, len(texts), batch_size):
            ids = encode(tokenizer, texts[s:s + batch_size], add_eos=True).to(device)  # [B, L]
            total += lm_loss(lm, ids, tokenizer.pad_token_id, reduction="sum").item()
            count += int((ids[:, 1:] != tokenizer.pad_token_id).sum())
    finally:
        lm.train(was_training)
    return math.exp(total / count)


def _subjects(targets: Sequence[Fact] | None) -> set[str]:
    return {f.subject for f in targets} if targets else set()


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, world: World, *,
             targets: Sequence[Fact] | None = None, target_paraphrases: Sequence[Fact] | None = None,
             max_facts: int | None = None, seed: int = 0) -> dict:
    """One tidy row of measurements of a causal LM (or its ``LMClassifier``) on ``world``.

    - ``recall``: next-token accuracy of the object on the pretraining facts' trained (subject, template)
      renderings (``world.train_facts``);
    - ``paraphrase``: the same on the held-out renderings (``world.heldout_facts``): knowledge extraction;
    - ``neighbourhood``: recall of the trained renderings of every pretrained subject *not* among the
      ``targets``' subjects (with no targets it equals ``recall``): did editing or fine-tuning those facts
      leave the others alone? (With ``max_facts``, over the sampled renderings.)
    - ``perplexity``: on the held-out general text (``world.general_test``), never seen in pretraining;
    - with ``targets`` (facts a chapter edited or fine-tuned, possibly with new objects): ``target``, their
      recall; with ``target_paraphrases``: ``target_paraphrase``.

    ``max_facts`` evaluates a seeded random subset of at most that many renderings per field (faster).
    """
    if not isinstance(world, World):
        raise TypeError(f"world must be a cl_lab.lm World, got {type(world).__name__}")
    if max_facts is not None:
        _validate.positive_int("max_facts", max_facts)

    def subset(facts: list[Fact]) -> list[Fact]:
        if max_facts is None or len(facts) <= max_facts:
            return facts
        keep = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[:max_facts]
        return [facts[i] for i in sorted(keep.tolist())]

    edited = _subjects(targets)
    trained = subset(world.train_facts)
    correct = hits(model, tokenizer, trained)  # [N]
    neighbours = torch.tensor([f.subject not in edited for f in trained])  # [N]
    row = {"recall": correct.double().mean().item(),
           "paraphrase": recall(model, tokenizer, subset(world.heldout_facts)),
           "neighbourhood": correct[neighbours].double().mean().item() if neighbours.any() else math.nan,
           "perplexity": perplexity(model, tokenizer, world.general_test)}
    if targets:
        row["target"] = recall(model, tokenizer, list(targets))
    if target_paraphrases:
        row["target_paraphrase"] = recall(model, tokenizer, list(target_paraphrases))
    return row


@torch.no_grad()
def complete(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 4) -> str:
    """The greedy continuation of ``prompt`` (at most ``max_new_tokens`` tokens), as text without the prompt."""
    _validate.positive_int("max_new_tokens", max_new_tokens)
    lm = _causal_lm(model)
    ids = encode(tokenizer, [prompt]).to(next(lm.parameters()).device)  # [1, L]
    out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=tokenizer.pad_token_id)  # [1, L + new]
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return " " + text if text and is_word_level(tokenizer) else text
