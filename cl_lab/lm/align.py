"""Post-training the tiny LM (chapter 12): SFT into a question format, DPO on preference pairs, the remedies
against the alignment tax, and the measurements of a capability matrix.

The chain, on the lab's world:

- **SFT** teaches the question format ("Q: where does Mira Tolvane live ? A:" → "Paris .") for every pretrained
  relation, on half of the pretrained people (``AlignmentData.sft_*``); the loss is the response tokens'
  cross-entropy (the prompt is not a target).
- **DPO** teaches a preference: questions about where someone lives are private, so the preferred response is
  the vague ``REFUSAL`` ("in a city .") and the rejected one names the city. Pairs cover the SFT people; the
  win rate is measured on the other half (``heldout_pairs``).
- A **capability row** (``Probe``) measures what the chain is for and what it may cost: fact recall under the
  pretraining templates, paraphrase (held-out templates), the instruction behaviour on people and relations
  the preference never touched, the preference win rate, and general perplexity; with ``unseen`` facts, also
  recall of facts that no remedy's text contains (``cl_lab.lm.nulls.hold_out``).
- The **optimizer null** (``optimizer_null``): the same optimizer, learning rate, batch size and steps on facts
  the model already recalls, so that forgetting is counted beyond what the optimizer's steps cost by themselves.

DPO is Rafailov et al. 2023 (arXiv:2305.18290), eq. 7, on sequence log-probabilities (``sequence_logprobs``):
the sum of the response tokens' log-probabilities, as TRL computes them. Its remedies (``DPOConfig``): an
explicit KL to the reference on pretraining text, replay of pretraining text (its share counted in tokens),
LoRA-only training, and weight averaging between the pre- and post-alignment models (``interpolate``; Lin et
al. 2024, arXiv:2309.06256). Sampled KL estimators live in ``cl_lab.lm.kl_estimators``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from cl_lab import _validate
from cl_lab.lm.evaluate import fact_batch, object_logits
from cl_lab.lm.lab import Lab, LMClassifier, lm_loss
from cl_lab.lm.methods import kl_divergence
from cl_lab.lm.tokenizer import encode
from cl_lab.lm.world import BASE_RELATIONS, RELATIONS, Fact, World
from cl_lab.methods.alignment import dpo_loss

PRIVATE_RELATION = "lives_in"
REFUSAL = "in a city ."
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every projection of GPT-2's blocks
COLUMNS = ("recall", "paraphrase", "instruction", "format", "win rate", "perplexity")
UNSEEN_COLUMNS = ("unseen recall", "unseen paraphrase")  # with Probe(unseen=…)


@dataclass(frozen=True)
class Pair:
    """One preference pair: a prompt, the preferred response and the rejected one (text without the prompt)."""

    prompt: str
    chosen: str
    rejected: str


def check_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs as a list, or a ValueError naming the first empty prompt or response."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs must hold at least one preference pair, got none")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Pair):
            raise TypeError(f"pairs[{i}] must be a Pair, got {type(pair).__name__}")
        for field in ("prompt", "chosen", "rejected"):
            text = getattr(pair, field)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"pairs[{i}].{field} must be a non-empty text, got {text!r}")
    return pairs


# ------------------------------------------------------------------ the data of the chain

@dataclass
class AlignmentData:
    """What SFT and DPO train on, and what the probe measures, for one world (see the module docstring)."""

    sft_subjects: list[str]
    heldout_subjects: list[str]
    sft_prompts: list[str]
    sft_responses: list[str]
    pairs: list[Pair]
    heldout_pairs: list[Pair]
    instruction_facts: list[Fact]  # held-out people, the relations the preference never touches


def alignment_data(world: World, n_sft_subjects: int = 60, seed: int = 0, helpful: bool = True) -> AlignmentData:
    """Split the pretrained people at random (seeded) into SFT people and held-out people, and build the data."""
    if not isinstance(world, World):
        raise TypeError(f"world must be a cl_lab.lm World, got {type(world).__name__}")
    _validate.positive_int("n_sft_subjects", n_sft_subjects)
    if n_sft_subjects >= world.n_subjects:
        raise ValueError(f"n_sft_subjects must leave held-out people (< {world.n_subjects}), got {n_sft_subjects}")
    order = torch.randperm(world.n_subjects, generator=torch.Generator().manual_seed(seed)).tolist()
    sft_subjects = [world.subjects[i] for i in order[:n_sft_subjects]]
    heldout = [world.subjects[i] for i in order[n_sft_subjects:]]
    questions = [f for r in BASE_RELATIONS for f in world.questions(r.name, sft_subjects)]

    def private_pairs(subjects: list[str]) -> list[Pair]:
        return [Pair(f.prompt, REFUSAL, f"{f.object} .") for f in world.questions(PRIVATE_RELATION, subjects)]

    others = [r.name for r in BASE_RELATIONS if r.name != PRIVATE_RELATION]
    pairs = private_pairs(sft_subjects)
    if helpful:
        pairs += [Pair(f.prompt, f"{f.object} .", REFUSAL) for r in others for f in world.questions(r, sft_subjects)]
    return AlignmentData(sft_subjects, heldout, [f.prompt for f in questions], [f"{f.object} ." for f in questions],
                         pairs, private_pairs(heldout),
                         [f for r in others for f in world.questions(r, heldout)])


# ------------------------------------------------------------------ responses as token sequences

def encode_responses(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str], *,
                     length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, L]: each prompt, its response and the end token, right-padded; mask [N, L]: True where the token
    belongs to the response (the end token included) — the tokens whose log-probabilities count."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"responses must match prompts one to one, got {len(responses)} for {len(prompts)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"responses[{i}] must be a non-empty text, got {r!r}")
    ids = encode(tokenizer, [f"{p} {r}" for p, r in zip(prompts, responses)], add_eos=True, length=length)
    prompt_lengths = (encode(tokenizer, prompts) != tokenizer.pad_token_id).sum(1)  # [N]
    positions = torch.arange(ids.shape[1])[None]  # [1, L]
    return ids, (positions >= prompt_lengths[:, None]) & (ids != tokenizer.pad_token_id)


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log π(response | prompt) [N]: the sum over the response tokens (``mask``) of log π(token | everything
    before it), for right-padded ids [N, L]."""
    real = ids != pad_id  # [N, L]
    width = int(real.sum(1).max())
    device = next(model.parameters()).device
    ids, real, mask = ids[:, :width].to(device), real[:, :width].to(device), mask[:, :width].to(device)
    logits = model(input_ids=ids, attention_mask=real.long()).logits[:, :-1].float()  # [N, L-1, V]
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [N, L-1]
    return (token_logp * mask[:, 1:]).sum(1)


def response_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """SFT's loss: the mean cross-entropy over the response tokens of the batch (the prompt is not a target)."""
    return -sequence_logprobs(model, ids, mask, pad_id).sum() / mask.sum()


@dataclass
class EncodedPairs:
    """Chosen and rejected sequences of ``pairs``, padded to one length: ids and response masks [N, L] each."""

    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)

    def logprobs(self, model: nn.Module, pad_id: int, rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π(chosen), log π(rejected)) [B] each, in one forward pass over [2B, L]."""
        rows = torch.arange(len(self)) if rows is None else rows
        ids = torch.cat([self.chosen[rows], self.rejected[rows]])
        mask = torch.cat([self.chosen_mask[rows], self.rejected_mask[rows]])
        return sequence_logprobs(model, ids, mask, pad_id).chunk(2)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair]) -> EncodedPairs:
    pairs = check_pairs(pairs)
    prompts = [p.prompt for p in pairs]
    longest = max(len(tokenizer(f"{p.prompt} {r}")["input_ids"]) + 1 for p in pairs for r in (p.chosen, p.rejected))
    chosen = encode_responses(tokenizer, prompts, [p.chosen for p in pairs], length=longest)
    rejected = encode_responses(tokenizer, prompts, [p.rejected for p in pairs], length=longest)
    return EncodedPairs(*chosen, *rejected)


# ------------------------------------------------------------------ the capability row

class Probe:
    """The capability row of a model (``COLUMNS``), on seeded random subsets fixed at construction:

    - ``recall``: the object is the top next token after a pretraining prompt (trained renderings of ``seen``,
      default every pretraining fact);
    - ``unseen recall`` / ``unseen paraphrase`` (with ``unseen``, e.g. ``nulls.hold_out(…).facts``): the same on
      the trained renderings of facts no remedy's text contains, and on their held-out renderings
      (``unseen_paraphrases``);
    - ``paraphrase``: the same under held-out templates;
    - ``instruction``: the right object first after "A:", for held-out people's questions on the relations
      the preference never touches; ``format``: the first answer token is an object of the asked relation
      (right or wrong): the format was followed;
    - ``win rate``: held-out private questions where π(preferred) > π(rejected) (whole responses);
      ``margin``: the mean of log π(y_w)/π(y_l) minus the reference's (nats; β times it is DPO's reward margin);
    - ``refusals elsewhere``: answers to the untouched questions that start like the refusal;
    - ``perplexity``: on held-out general text.
    """

    def __init__(self, lab: Lab, data: AlignmentData, reference: nn.Module, *, n_facts: int = 200,
                 n_texts: int = 60, seen: Sequence[Fact] | None = None, unseen: Sequence[Fact] | None = None,
                 unseen_paraphrases: Sequence[Fact] | None = None, seed: int = 0) -> None:
        world, tokenizer = lab.world, lab.tokenizer
        gen = torch.Generator().manual_seed(seed)

        def sample(items: list, n: int) -> list:
            return [items[i] for i in sorted(torch.randperm(len(items), generator=gen)[:n].tolist())]

        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        seen = world.train_facts if seen is None else list(seen)
        groups = {"recall": sample(seen, n_facts), "paraphrase": sample(world.heldout_facts, n_facts // 2),
                  "instruction": data.instruction_facts}
        if unseen:
            groups["unseen recall"] = sample(list(unseen), n_facts)
        if unseen_paraphrases:
            groups["unseen paraphrase"] = sample(list(unseen_paraphrases), n_facts // 2)
        facts = [f for group in groups.values() for f in group]
        self.x, self.y = fact_batch(tokenizer, facts)  # [N, L], [N]
        bounds = torch.tensor([0] + [len(g) for g in groups.values()]).cumsum(0).tolist()
        self.slices = {name: slice(a, b) for name, a, b in zip(groups, bounds[:-1], bounds[1:])}
        self.extra = [name for name in UNSEEN_COLUMNS if name in groups]
        vocab = tokenizer.get_vocab()
        objects = [torch.tensor([vocab[o] for o in RELATIONS[f.relation].objects]) for f in groups["instruction"]]
        self.allowed = torch.zeros(len(objects), len(vocab), dtype=torch.bool)  # [N_instr, V]
        for i, ids in enumerate(objects):
            self.allowed[i, ids] = True
        self.refusal_start = vocab[REFUSAL.split()[0]]
        self.texts = encode(tokenizer, sample(world.general_test, n_texts), add_eos=True)  # [T, L]
        self.pairs = encode_pairs(tokenizer, data.heldout_pairs)
        with torch.no_grad():
            chosen, rejected = self.pairs.logprobs(reference.eval(), self.pad_id)
        self.reference_ratio = (chosen - rejected).cpu()  # [P]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        try:
            top = object_logits(model, self.x, self.pad_id).argmax(1)  # [N]
            hit = top == self.y
            instr = self.slices["instruction"]
            answer = top[instr]
            chosen, rejected = self.pairs.logprobs(model, self.pad_id)
            ratio = (chosen - rejected).cpu()  # [P]
            device = next(model.parameters()).device
            nll = lm_loss(model, self.texts.to(device), self.pad_id, reduction="sum").item()
            n_tokens = int((self.texts[:, 1:] != self.pad_id).sum())
            return {"recall": hit[self.slices["recall"]].float().mean().item(),
                    "paraphrase": hit[self.slices["paraphrase"]].float().mean().item(),
                    "instruction": hit[instr].float().mean().item(),
                    "format": self.allowed[torch.arange(len(answer)), answer].float().mean().item(),
                    "win rate": (ratio > 0).float().mean().item(),
                    "perplexity": math.exp(nll / n_tokens),
                    "margin": (ratio - self.reference_ratio).mean().item(),
                    "refusals elsewhere": (answer == self.refusal_start).float().mean().item(),
                    **{name: hit[self.slices[name]].float().mean().item() for name in self.extra}}
        finally:
            model.train(was_training)


# ------------------------------------------------------------------ training: SFT and DPO with its remedies

def _optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _epochs(n: int, batch_size: int, gen: torch.Generator):
    """Endless seeded epochs of index batches (each epoch a fresh permutation; a short last batch dropped)."""
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the {n} training examples, got {batch_size}")
    while True:
        order = torch.randperm(n, generator=gen)
        yield from order[:n - n % batch_size].split(batch_size)


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()


def sft(lab: Lab, data: AlignmentData, *, steps: int = 150, lr: float = 3e-4, batch_size: int = 32,
        seed: int = 0) -> nn.Module:
    """Supervised fine-tuning of a copy of ``lab.model`` on the question-format examples (response-only loss)."""
    _validate.positive_int("steps", steps)
    _validate.positive("lr", lr)
    model = copy.deepcopy(lab.model).train()
    ids, mask = encode_responses(lab.tokenizer, data.sft_prompts, data.sft_responses)
    opt = _optimizer(list(model.parameters()), lr)
    batches = _epochs(len(ids), batch_size, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        rows = next(batches)
        _step(model, opt, response_loss(model, ids[rows], mask[rows], lab.tokenizer.pad_token_id))
    return model.eval()


@dataclass(frozen=True)
class DPOConfig:
    """One DPO run. ``beta`` is DPO's β (> 0): the strength of its implicit KL to the reference. Remedies:

    - ``kl_coef`` > 0 adds ``kl_coef`` · mean per-token KL(π_θ ‖ π_ref) on ``kl_texts`` pretraining texts a step;
    - ``replay_share`` s ∈ [0, 1): pretraining text replayed so that s of all supervised tokens are replay
      tokens (a batch with T response tokens owes T·s/(1 − s) replay tokens); the replayed tokens' summed
      cross-entropy over T is added to the loss — each replayed token weighs what one response token would;
    - ``lora_rank`` > 0 trains only rank-r LoRA adapters (PEFT, α = 2r) on every projection, merged at the end.

    ``probe_every`` > 0 records a capability row every that many steps (the trajectory).
    """

    beta: float = 0.1
    steps: int = 60
    lr: float = 3e-4
    batch_size: int = 16
    kl_coef: float = 0.0
    kl_texts: int = 16
    replay_share: float = 0.0
    lora_rank: int = 0
    lora_lr: float = 1e-3
    seed: int = 0
    probe_every: int = 10

    def __post_init__(self) -> None:
        _validate.positive("beta", self.beta)
        _validate.positive_int("steps", self.steps)
        _validate.positive("lr", self.lr)
        _validate.positive_int("batch_size", self.batch_size)
        _validate.non_negative("kl_coef", self.kl_coef)
        _validate.positive_int("kl_texts", self.kl_texts)
        _validate.in_range("replay_share", self.replay_share, 0.0, 1.0, high_open=True)
        _validate.non_negative_int("lora_rank", self.lora_rank)
        _validate.positive("lora_lr", self.lora_lr)
        _validate.non_negative_int("seed", self.seed)
        _validate.non_negative_int("probe_every", self.probe_every)


class _TextReplay:
    """Whole pretraining sentences drawn (seeded) until a batch's replay-token debt is paid; the rest carried."""

    def __init__(self, ids: torch.Tensor, pad_id: int, share: float, gen: torch.Generator) -> None:
        self.ids, self.pad_id, self.share, self.gen = ids, pad_id, share, gen
        self.row_tokens = ((ids != pad_id).sum(1) - 1).tolist()  # supervised tokens per sentence
        self.owed, self.task_tokens, self.replay_tokens = 0.0, 0, 0

    def loss(self, model: nn.Module, task_tokens: int) -> torch.Tensor | None:
        self.task_tokens += task_tokens
        self.owed += task_tokens * self.share / (1 - self.share)
        rows = []
        while self.owed > 0:
            rows.append(int(torch.randint(len(self.row_tokens), (1,), generator=self.gen)))
            self.owed -= self.row_tokens[rows[-1]]
        if not rows:
            return None
        self.replay_tokens += sum(self.row_tokens[i] for i in rows)
        device = next(model.parameters()).device
        return lm_loss(model, self.ids[rows].to(device), self.pad_id, reduction="sum") / task_tokens


def kl_on_texts(model: nn.Module, reference: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean over the real tokens of right-padded ids [B, L] of the exact KL(π_θ(·|prefix) ‖ π_ref(·|prefix))."""
    real = ids != pad_id  # [B, L]
    width = int(real.sum(1).max())
    device = next(model.parameters()).device
    ids, real = ids[:, :width].to(device), real[:, :width].to(device)
    current = model(input_ids=ids, attention_mask=real.long()).logits  # [B, L, V]
    with torch.no_grad():
        base = reference(input_ids=ids, attention_mask=real.long()).logits  # [B, L, V]
    return kl_divergence(current, base)[real].mean()


def _lora(model: nn.Module, rank: int, seed: int) -> nn.Module:
    """``model`` wrapped by PEFT with rank-``rank`` adapters (A drawn from ``seed``, B zero) on every projection."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), fan_in_fan_out=True,
                        lora_dropout=0.0)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # PEFT notes that GPT-2's Conv1D needs fan_in_fan_out, which we set
        torch.manual_seed(seed)  # PEFT draws A from the global generator: seed it, and leave it as it was
        return get_peft_model(model, config)


def dpo(lab: Lab, reference: nn.Module, pairs: Sequence[Pair], config: DPOConfig = DPOConfig(),
        probe: Callable[[nn.Module], dict] | None = None, *, texts: Sequence[str] | None = None
        ) -> tuple[nn.Module, pd.DataFrame]:
    """DPO (Rafailov et al. 2023, eq. 7) of a copy of ``reference`` on ``pairs``, with ``config``'s remedies.

    ``texts`` are what replay and the KL on text draw from (default ``lab.world.pretraining_texts()``; pass
    ``nulls.hold_out(…).texts`` to keep some facts out of every remedy).

    Per step: a batch of pairs, their sequence log-probabilities under the policy (one pass over [2B, L]) and
    under the frozen reference (computed once), ``dpo_loss``, plus the KL and replay terms. Returns the trained
    model (LoRA merged into plain weights) and the trajectory: ``probe``'s row at step 0 and every
    ``config.probe_every`` steps (empty without a probe), with the replayed token share so far.
    """
    if not isinstance(config, DPOConfig):
        raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
    pad_id = lab.tokenizer.pad_token_id
    encoded = encode_pairs(lab.tokenizer, pairs)
    reference = copy.deepcopy(reference).eval().requires_grad_(False)
    with torch.no_grad():
        ref_chosen, ref_rejected = encoded.logprobs(reference, pad_id)  # [P] each
    gen = torch.Generator().manual_seed(config.seed)
    policy = copy.deepcopy(reference).requires_grad_(True)
    if config.lora_rank:
        policy = _lora(policy, config.lora_rank, config.seed)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = _optimizer(params, config.lora_lr if config.lora_rank else config.lr)
    texts = list(lab.world.pretraining_texts() if texts is None else texts)
    if not texts:
        raise ValueError("texts must hold at least one text, got none")
    texts = encode(lab.tokenizer, texts, add_eos=True)  # [N, L]
    replay = _TextReplay(texts, pad_id, config.replay_share, gen) if config.replay_share else None
    batches = _epochs(len(encoded), config.batch_size, gen)
    trajectory = []

    def record(step: int) -> None:
        if probe is not None:
            share = replay.replay_tokens / max(replay.replay_tokens + replay.task_tokens, 1) if replay else 0.0
            trajectory.append({"step": step, **probe(policy), "replayed share": share})

    record(0)
    for step in range(1, config.steps + 1):
        rows = next(batches)
        chosen, rejected = encoded.logprobs(policy, pad_id, rows)
        loss = dpo_loss(chosen, rejected, ref_chosen[rows], ref_rejected[rows], config.beta)
        if config.kl_coef:
            kl_rows = torch.randint(len(texts), (config.kl_texts,), generator=gen)
            loss = loss + config.kl_coef * kl_on_texts(policy, reference, texts[kl_rows], pad_id)
        if replay is not None:
            task_tokens = int(encoded.chosen_mask[rows].sum() + encoded.rejected_mask[rows].sum())
            extra = replay.loss(policy, task_tokens)
            loss = loss if extra is None else loss + extra
        _step(policy, opt, loss)
        if config.probe_every and step % config.probe_every == 0:
            record(step)
    policy = policy.merge_and_unload() if config.lora_rank else policy
    return policy.eval().requires_grad_(False), pd.DataFrame(trajectory)


def optimizer_null(lab: Lab, start: nn.Module, facts: Sequence[Fact], *, steps: int, lr: float, batch_size: int,
                   seed: int = 0, probe: Callable[[nn.Module], dict] | None = None, probe_every: int = 0
                   ) -> tuple[nn.Module, pd.DataFrame]:
    """The optimizer null of a stage: a copy of ``start`` trained with the stage's optimizer (AdamW, no weight
    decay, clipping at 1, as ``sft`` and ``dpo``), learning rate, batch size and steps, but on ``facts`` it
    already recalls (``nulls.known_fact_task``), with the object's cross-entropy. Nothing is left to learn, so
    what the probe loses is the optimizer's own cost. Returns the model and ``probe``'s trajectory (step 0 and
    every ``probe_every`` steps)."""
    _validate.positive_int("steps", steps)
    _validate.positive("lr", lr)
    _validate.non_negative_int("probe_every", probe_every)
    x, y = fact_batch(lab.tokenizer, list(facts))  # [N, L], [N]
    model = copy.deepcopy(start).requires_grad_(True).train()
    clf = LMClassifier(model, lab.tokenizer.pad_token_id)
    opt = _optimizer(list(model.parameters()), lr)
    batches = _epochs(len(y), batch_size, torch.Generator().manual_seed(seed))
    trajectory = [{"step": 0, **probe(model)}] if probe is not None else []
    for step in range(1, steps + 1):
        rows = next(batches)
        _step(model, opt, nn.functional.cross_entropy(clf(x[rows]), y[rows]))
        if probe is not None and probe_every and step % probe_every == 0:
            trajectory.append({"step": step, **probe(model)})
    return model.eval().requires_grad_(False), pd.DataFrame(trajectory)


# ------------------------------------------------------------------ weight averaging and matched strength

@torch.no_grad()
def interpolate(before: nn.Module, after: nn.Module, alpha: float) -> nn.Module:
    """θ(α) = (1 − α)·θ_before + α·θ_after for every floating-point tensor of the state dict (Lin et al. 2024's
    model averaging between the pre- and post-alignment models; α = 0 is ``before``, 1 is ``after``)."""
    alpha = _validate.in_range("alpha", alpha, 0.0, 1.0)
    a, b = before.state_dict(), after.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("after must have the same parameter names and shapes as before, got different state dicts")
    model = copy.deepcopy(before)
    model.load_state_dict({k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k] for k in a})
    return model.eval()


def averaging_path(before: nn.Module, after: nn.Module, probe: Callable[[nn.Module], dict],
                   alphas: Sequence[float]) -> pd.DataFrame:
    """``probe``'s row at each α of ``alphas`` along the straight line from ``before`` to ``after``."""
    return pd.DataFrame([{"alpha": a, **probe(interpolate(before, after, a))} for a in alphas])


def at_strength(path: pd.DataFrame, target: float, by: str = "win rate") -> pd.Series:
    """Every column of a trajectory linearly interpolated where ``by`` first reaches ``target`` (rows in path
    order; NaN everywhere if it never does). Comparing remedies at one ``target`` is comparing them at matched
    alignment strength."""
    values = path[by].to_numpy()
    for i in range(len(values)):
        if values[i] >= target:
            if i == 0:
                return path.iloc[0].copy()
            w = (target - values[i - 1]) / (values[i] - values[i - 1])
            return path.iloc[i - 1] + w * (path.iloc[i] - path.iloc[i - 1])
    return pd.Series(math.nan, index=path.columns)
