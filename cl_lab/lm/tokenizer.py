"""A word-level tokenizer for the world, and one ``encode`` for every tokenizer the lab meets.

The tiny LM's tokenizer is a Hugging Face ``PreTrainedTokenizerFast`` around ``tokenizers``' WordLevel model:
one token per whitespace-separated word, ``<bos>`` prepended to every text, and the special tokens
``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3) before the words. ``encode`` refuses words the
vocabulary lacks instead of silently reading them as ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def build_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary`` (special tokens first, then the words in the given order)."""
    words = [w for w in vocabulary if w not in SPECIAL_TOKENS]
    if len(set(words)) != len(words) or any(not w or w != w.strip() or " " in w for w in words):
        raise ValueError("vocabulary must hold distinct words without whitespace, got duplicates or blanks")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", padding_side="right")
    return tokenizer


def is_word_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, models.WordLevel)


def unknown_words(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[str]:
    """Words of ``texts`` a word-level tokenizer lacks, in order of first appearance (none for subword ones)."""
    if not is_word_level(tokenizer):
        return []
    vocab = tokenizer.get_vocab()
    return list(dict.fromkeys(w for text in texts for w in text.split() if w not in vocab))


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] | str, *, length: int | None = None,
           add_eos: bool = False) -> torch.Tensor:
    """Token ids [B, L] of ``texts``, right-padded with the pad token (L = ``length`` or the longest text).

    The tokenizer adds its own leading tokens (``<bos>`` for the lab's). ``add_eos`` appends the end token
    (training sentences). Raises ``ValueError`` naming any word outside a word-level vocabulary.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    missing = unknown_words(tokenizer, texts)
    if missing:
        shown = ", ".join(repr(w) for w in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise ValueError(f"texts hold {len(missing)} word(s) outside the tokenizer's vocabulary: {shown}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must have a pad token (set tokenizer.pad_token), got none")
    rows = tokenizer(texts, add_special_tokens=True)["input_ids"]
    if add_eos:
        rows = [r + [tokenizer.eos_token_id] for r in rows]
    longest = max(len(r) for r in rows)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"length must be at least the longest text's {longest} tokens, got {length}")
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids


def decode(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor | Sequence[int]) -> str:
    """The text of one row of ids, without special tokens."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=True)
