"""Continual pretraining of the tiny LM on a new domain: learning-rate schedules, replay counted in tokens,
vocabulary extension, and the curves a checkpoint is chosen from.

- ``lr_at``: the schedules compared by Gupta et al. 2023 (arXiv 2308.04014) and Ibrahim et al. 2024 (arXiv
  2403.08763): ``"rewarm"`` warms up linearly to the pretraining peak again, then decays by a cosine to a tenth
  of it (the shape the model was pretrained with); ``"constant"`` stays at the low rate pretraining ended
  on; ``"rewarm-flat"`` re-warms and never decays.
- ``TokenMixer``: each step's batch holds about ``batch_tokens`` supervised tokens, a share ``replay_share``
  of them from the old pretraining corpus, kept exact over the run by carrying the remainder (old and new
  sentences differ in length, so a share of sentences is not a share of tokens).
- ``extend_for_domain``: the domain's words appended to the tokenizer; new embedding rows (tied with the output
  layer) at the mean of the old rows (transformers' default; Hewitt 2021) or drawn like a fresh GPT-2 row,
  N(0, 0.02²).
- ``continual_pretrain``: one run, with an evaluation every ``eval_every`` steps: old facts recalled, the
  domain's facts (trained renderings and held-out ones), and general perplexity on two halves of the held-out
  general text (a *probe* half to choose a checkpoint on, a *test* half to report). ``new_texts`` replaces the
  domain's texts: on sentences the model already knows, the run is the optimizer null (``cl_lab.lm.nulls``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from cl_lab import _validate
from cl_lab.device import seed_everything
from cl_lab.lm.evaluate import fact_batch, object_logits
from cl_lab.lm.lab import Lab, extend_vocabulary, lm_loss
from cl_lab.lm.tokenizer import encode
from cl_lab.lm.world import Domain, Fact, World

SCHEDULES = ("rewarm", "constant", "rewarm-flat")
INITS = ("mean", "random")
PEAK_LR = 1e-3  # re-warming peak: a third of the tiny LM's pretraining peak (LMConfig.lr = 3e-3)
LOW_LR = 3e-4  # the constant low rate: where pretraining's cosine ended (a tenth of 3e-3)
FLOOR = 0.1  # re-decay to a tenth of the peak, as in pretraining
RANDOM_STD = 0.02  # GPT-2's initializer_range: a freshly initialised row


def lr_at(step: int, steps: int, schedule: str = "rewarm", *, peak_lr: float = PEAK_LR, low_lr: float = LOW_LR,
          warmup: float = 0.1, floor: float = FLOOR) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``.

    - ``"rewarm"``: linear from peak/W up to ``peak_lr`` over the first W = max(1, round(warmup·steps)) steps,
      then a cosine from ``peak_lr`` down to ``floor``·``peak_lr`` at the last step;
    - ``"constant"``: ``low_lr`` throughout;
    - ``"rewarm-flat"``: the same warm-up, then ``peak_lr`` to the end.
    """
    _validate.one_of("schedule", schedule, SCHEDULES)
    _validate.positive_int("steps", steps)
    _validate.non_negative_int("step", step)
    if step >= steps:
        raise ValueError(f"step must be below steps = {steps}, got {step}")
    _validate.positive("peak_lr", peak_lr)
    _validate.positive("low_lr", low_lr)
    _validate.in_range("warmup", warmup, 0.0, 1.0, high_open=True)
    _validate.in_range("floor", floor, 0.0, 1.0)
    if schedule == "constant":
        return low_lr
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return peak_lr * (step + 1) / n_warm
    if schedule == "rewarm-flat":
        return peak_lr
    progress = (step - n_warm) / max(steps - 1 - n_warm, 1)  # 0 after the warm-up, 1 at the last step
    return peak_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class TokenMixer:
    """Batches of new-domain sentences with replayed old sentences, the replay share counted in tokens.

    Each step draws new sentences (seeded, with replacement) until they hold (1 − s)·``batch_tokens``
    supervised tokens, then old sentences until the replayed tokens owed, s/(1 − s) of every new token so far
    minus those already replayed, are paid. Over a run the replayed share of supervised tokens is s up to
    one sentence. A supervised token is one that is predicted: every token of a sentence but ``<bos>``, the
    end token included.
    """

    def __init__(self, new_ids: torch.Tensor, old_ids: torch.Tensor, pad_id: int, *, replay_share: float = 0.05,
                 batch_tokens: int = 160, seed: int = 0) -> None:
        self.replay_share = _validate.in_range("replay_share", replay_share, 0.0, 1.0, high_open=True)
        self.batch_tokens = _validate.positive_int("batch_tokens", batch_tokens)
        if len(new_ids) == 0 or (replay_share > 0 and len(old_ids) == 0):
            raise ValueError("new_ids (and old_ids when replay_share > 0) must hold at least one sentence")
        self.new_ids, self.old_ids, self.pad_id = new_ids, old_ids, pad_id
        self.new_len = ((new_ids != pad_id).sum(1) - 1).tolist()  # supervised tokens per sentence
        self.old_len = ((old_ids != pad_id).sum(1) - 1).tolist() if len(old_ids) else []
        self.generator = torch.Generator().manual_seed(_validate.non_negative_int("seed", seed))
        self.new_tokens = self.replay_tokens = self.new_rows = self.replay_rows = 0

    def _draw(self, lengths: list[int], budget: float) -> list[int]:
        rows, got = [], 0
        while got < budget:
            i = int(torch.randint(len(lengths), (1,), generator=self.generator))
            rows.append(i)
            got += lengths[i]
        return rows

    def next_batch(self) -> torch.Tensor:
        """Token ids [B, L] of the next batch: new sentences first, then replayed ones, right-padded."""
        new = self._draw(self.new_len, (1 - self.replay_share) * self.batch_tokens)
        self.new_tokens += sum(self.new_len[i] for i in new)
        owed = self.new_tokens * self.replay_share / (1 - self.replay_share) - self.replay_tokens
        old = self._draw(self.old_len, owed) if self.replay_share > 0 else []
        self.replay_tokens += sum(self.old_len[i] for i in old)
        self.new_rows, self.replay_rows = self.new_rows + len(new), self.replay_rows + len(old)
        parts = [self.new_ids[new]] + ([self.old_ids[old]] if old else [])
        width = max(int((p != self.pad_id).sum(1).max()) for p in parts)
        return torch.cat([p[:, :width] if p.shape[1] >= width else
                          torch.nn.functional.pad(p, (0, width - p.shape[1]), value=self.pad_id) for p in parts])

    @property
    def token_share(self) -> float:
        """Replayed tokens / all supervised tokens so far (nan before the first batch)."""
        total = self.new_tokens + self.replay_tokens
        return self.replay_tokens / total if total else math.nan

    @property
    def sentence_share(self) -> float:
        """Replayed sentences / all sentences so far: what a share counted in examples would read."""
        total = self.new_rows + self.replay_rows
        return self.replay_rows / total if total else math.nan


def extend_for_domain(lab: Lab, domain: Domain, init: str = "mean", *, seed: int = 0) -> Lab:
    """A copy of ``lab`` whose tokenizer knows ``domain.vocabulary`` (appended after the old words) and whose new
    embedding rows (tied with the output layer) start at the mean of the old rows (``"mean"``) or at
    N(0, 0.02²), a fresh GPT-2 row (``"random"``)."""
    _validate.one_of("init", init, INITS)
    extended = extend_vocabulary(lab, domain.vocabulary)
    if init == "random":
        n_old = len(lab.tokenizer)
        weight = extended.model.get_input_embeddings().weight  # [V', d]
        gen = torch.Generator().manual_seed(_validate.non_negative_int("seed", seed))
        with torch.no_grad():
            new = torch.randn(weight.shape[0] - n_old, weight.shape[1], generator=gen) * RANDOM_STD
            weight[n_old:] = new.to(weight.dtype)
    return extended


def embedding_shift(before: torch.Tensor, after: torch.Tensor) -> dict:
    """How far embedding rows moved: before, after [V, d] (the old rows only).

    ``relative``: ‖after − before‖_F / ‖before‖_F; ``median_row``: the median over rows of
    ‖after_v − before_v‖ / ‖before_v‖; ``neighbours_kept``: the share of rows whose nearest other row (cosine)
    is the same before and after.
    """
    if before.shape != after.shape or before.dim() != 2:
        raise ValueError(f"before and after must be [V, d] of one shape, got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    before, after = before.detach().double(), after.detach().double()
    rows = (after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)  # [V]

    def nearest(e: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(e, dim=1)
        sim = unit @ unit.T  # [V, V]
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    return {"relative": ((after - before).norm() / before.norm()).item(), "median_row": rows.median().item(),
            "neighbours_kept": (nearest(before) == nearest(after)).double().mean().item()}


def probe_split(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded random half of ``texts`` (the probe a checkpoint is chosen on) and the other half (the test)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(texts) // 2
    return [texts[i] for i in sorted(order[:half])], [texts[i] for i in sorted(order[half:])]


def _facts_sample(facts: list[Fact], n: int | None, seed: int) -> list[Fact]:
    if n is None or n >= len(facts):
        return facts
    keep = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[:n]
    return [facts[i] for i in sorted(keep.tolist())]


def old_sample(world: World, old_facts: int | None = 240) -> list[Fact]:
    """The old facts a run scores: a seeded random draw (fixed by the world) of ``old_facts`` trained renderings
    (all of them for None)."""
    return _facts_sample(world.train_facts, old_facts, seed=world.seed)


@dataclass
class CPTRun:
    """One continual-pretraining run: the trained lab, the curves, the token accounting, the embedding shift.

    ``history`` has one row per evaluation (step 0 = the extended model before training): step, lr,
    ``old`` (recall of the old facts' trained renderings, a seeded sample), ``new`` (the domain's trained
    renderings), ``new_paraphrase`` (its held-out renderings), ``probe_ppl`` and ``test_ppl`` (general
    perplexity on the two halves of the held-out general text).
    """

    lab: Lab
    history: pd.DataFrame
    config: dict
    token_share: float
    sentence_share: float
    tokens: int  # supervised tokens trained on, new and replayed
    old_embeddings: dict = field(default_factory=dict)  # embedding_shift of the old rows

    @property
    def final(self) -> pd.Series:
        return self.history.iloc[-1]

    def select(self, max_ppl_rise: float = 0.1) -> pd.Series:
        """Early stopping on the probe: the evaluation with the best new-domain recall among those whose probe
        perplexity is at most (1 + ``max_ppl_rise``) × the base model's (step 0); the base itself if none."""
        _validate.non_negative("max_ppl_rise", max_ppl_rise)
        h = self.history
        ok = h[h.probe_ppl <= (1 + max_ppl_rise) * h.probe_ppl.iloc[0]]
        return ok.loc[ok.new.idxmax()] if len(ok) else h.iloc[0]


def _length_chunks(ids: torch.Tensor, pad: int, n_chunks: int = 3) -> list[torch.Tensor]:
    """ids [N, L] sorted by length and cut into ``n_chunks`` batches, each trimmed to its longest row (less
    padding to run through the model; the loss is the same)."""
    lengths = (ids != pad).sum(1)
    order = lengths.argsort()
    return [ids[part][:, :int(lengths[part].max())] for part in order.chunk(n_chunks)]


class _Probe:
    """Every measurement of a checkpoint, encoded once: the facts' prompts and objects, the two text halves."""

    def __init__(self, tokenizer, old: list[Fact], domain: Domain, probe: list[str], test: list[str]) -> None:
        self.pad = tokenizer.pad_token_id
        self.facts = {name: fact_batch(tokenizer, facts) for name, facts in
                      (("old", old), ("new", domain.train_facts), ("new_paraphrase", domain.heldout_facts))}
        self.texts = {name: _length_chunks(encode(tokenizer, texts, add_eos=True), self.pad) for name, texts in
                      (("probe_ppl", probe), ("test_ppl", test))}

    @torch.no_grad()
    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        row = {name: (object_logits(model, x, self.pad).argmax(1) == y).double().mean().item()
               for name, (x, y) in self.facts.items()}
        for name, chunks in self.texts.items():
            n_tokens = sum(int((ids[:, 1:] != self.pad).sum()) for ids in chunks)
            total = sum(lm_loss(model, ids, self.pad, reduction="sum").item() for ids in chunks)
            row[name] = math.exp(total / n_tokens)
        model.train(was_training)
        return row


def continual_pretrain(lab: Lab, domain: Domain | None = None, *, steps: int = 150, batch_tokens: int = 80,
                       replay_share: float = 0.05, schedule: str = "rewarm", peak_lr: float = PEAK_LR,
                       low_lr: float = LOW_LR, warmup: float = 0.1, init: str = "random", eval_every: int = 30,
                       old_facts: int | None = 240, weight_decay: float = 0.01, new_texts: Sequence[str] | None = None,
                       seed: int = 0) -> CPTRun:
    """Continue pretraining ``lab``'s tiny LM on ``domain`` (default ``lab.world.new_domain()``) with the full
    next-token loss, AdamW (β = 0.9, 0.98, clipping at 1, as in pretraining) and a fresh optimizer state.

    The domain's words are added first (``extend_for_domain(lab, domain, init)``); ``lab`` is not changed.
    Each step trains on one ``TokenMixer`` batch (``batch_tokens`` tokens, ``replay_share`` of them replayed
    from ``lab.world.pretraining_texts()``) at ``lr_at(step, steps, schedule, …)``. ``seed`` orders the data
    and draws the random rows; the probe/test split and the old-fact sample (``old_sample``) are fixed by the
    world. ``new_texts`` (default ``domain.texts``) is what the run learns; the domain still sets the new words
    and the new-fact columns.
    """
    if not isinstance(lab, Lab) or lab.world is None:
        raise TypeError(f"lab must be a tiny-LM Lab with a world (cl_lab.lm.tiny_lm), got {type(lab).__name__}")
    _validate.positive_int("steps", steps)
    _validate.positive_int("eval_every", eval_every)
    lr_at(0, steps, schedule, peak_lr=peak_lr, low_lr=low_lr, warmup=warmup)  # validates the schedule's arguments
    domain = lab.world.new_domain() if domain is None else domain
    ext = extend_for_domain(lab, domain, init, seed=seed)
    tok, model = ext.tokenizer, ext.model
    pad = tok.pad_token_id
    old_ids = encode(tok, lab.world.pretraining_texts(), add_eos=True)  # [N, L]
    source = "domain" if new_texts is None else "given"
    new_texts = list(domain.texts if new_texts is None else new_texts)
    if not new_texts:
        raise ValueError("new_texts must hold at least one text, got none")
    mixer = TokenMixer(encode(tok, new_texts, add_eos=True), old_ids, pad, replay_share=replay_share,
                       batch_tokens=batch_tokens, seed=seed)
    probe, test = probe_split(lab.world.general_test, seed=lab.world.seed)
    old = old_sample(lab.world, old_facts)
    n_old_rows = len(lab.tokenizer)
    before = model.get_input_embeddings().weight[:n_old_rows].detach().clone()  # [V, d]
    seed_everything(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr, betas=(0.9, 0.98))
    measure = _Probe(tok, old, domain, probe, test)
    rows = [{"step": 0, "lr": 0.0, **measure(model)}]
    model.train()
    for step in range(steps):
        lr = lr_at(step, steps, schedule, peak_lr=peak_lr, low_lr=low_lr, warmup=warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, mixer.next_batch(), pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            rows.append({"step": step + 1, "lr": lr, **measure(model)})
    model.eval()
    config = {"steps": steps, "batch_tokens": batch_tokens, "replay_share": replay_share, "schedule": schedule,
              "peak_lr": peak_lr, "low_lr": low_lr, "warmup": warmup, "init": init, "seed": seed,
              "new_texts": source}
    shift = embedding_shift(before, model.get_input_embeddings().weight[:n_old_rows])
    return CPTRun(ext, pd.DataFrame(rows), config, mixer.token_share, mixer.sentence_share,
                  mixer.new_tokens + mixer.replay_tokens, shift)

