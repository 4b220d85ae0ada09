"""Model merging on the tiny LM (chapter 10): GPT-2 weights as state dicts, fine-tunes of one base on fact
tasks, LoRA deltas, and what a merge is scored on.

- A *state* is ``{name: tensor}`` over the model's parameters (``params_of``): ``named_parameters`` counts the
  tied ``lm_head.weight`` once, as ``transformer.wte.weight``, so a task vector holds every weight once and
  TIES's global trim or a norm does not count the embedding twice. ``load_params`` / ``model_with`` put a
  state back.
- ``merge_stream`` builds the tasks (one per ``fact_stream`` kind by default: new people, a new relation, a
  question format), padded to one prompt length; ``Probe`` splits each task's test facts into a validation
  half (for choosing λ, density or p) and a test half, and adds a seeded sample of the pretraining facts and
  of the held-out general text.
- ``fine_tune`` (full, Adam through ``train.fit``), ``balanced_union`` (multi-task data, every task
  tiled to the same size), ``lora_delta`` (PEFT LoRA on the attention and MLP projections, returned as a
  dense task vector).

The merges themselves are ``cl_lab.methods.merging``'s, unchanged: they take any state dicts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate, train
from cl_lab.data.streams import Stream, Task
from cl_lab.lm.evaluate import fact_batch, object_logits, perplexity
from cl_lab.lm.lab import Lab, LMClassifier
from cl_lab.lm.stream import KINDS, fact_stream
from cl_lab.lm.world import Fact

State = dict[str, torch.Tensor]
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP projections (Conv1D layers)


# ---------------------------------------------------------------- weights as state dicts


def params_of(model: nn.Module) -> State:
    """Detached copies of ``model``'s parameters by name (tied weights once)."""
    model = model.lm if isinstance(model, LMClassifier) else model
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load_params(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` into ``model``'s parameters in place; every parameter must be given, with its shape."""
    target = model.lm if isinstance(model, LMClassifier) else model
    params = dict(target.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"state must hold exactly the model's parameters: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, extra {extra[:5]}{' …' if len(extra) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"state[{name!r}] must have shape {tuple(p.shape)}, got {tuple(state[name].shape)}")
            p.copy_(state[name])
    return model


def model_with(lab: Lab, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``lab.model`` holding ``state``, in eval mode."""
    return load_params(copy.deepcopy(lab.model), state).eval()


def mean_abs(tau: Mapping[str, torch.Tensor], matrices_only: bool = True) -> float:
    """Mean |τ| per weight: over the 2-D weights (embeddings and projections) by default, as DARE's
    "delta parameter" ranges are quoted; ``matrices_only=False`` takes every parameter."""
    values = [v.reshape(-1) for v in tau.values() if v.dim() >= 2 or not matrices_only]
    return torch.cat(values).abs().mean().item()


# ---------------------------------------------------------------- tasks


def _pad(x: torch.Tensor, length: int, pad_id: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=pad_id)  # [N, length]


def merge_stream(lab: Lab, kinds: Sequence[str] = KINDS, n_subjects: int | Sequence[int] = 20) -> Stream:
    """One task per entry of ``kinds`` (the first task of ``fact_stream(lab, kind=…)``; a kind may repeat, its
    i-th occurrence takes that kind's i-th task), prompts right-padded to one length L: x [N, L], y [N].
    ``n_subjects`` is one number for every task or one per task."""
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty list of {KINDS}, got {kinds!r}")
    for kind in kinds:
        _validate.one_of("kinds[…]", kind, KINDS)
    sizes = [n_subjects] * len(kinds) if isinstance(n_subjects, int) else list(n_subjects)
    if len(sizes) != len(kinds):
        raise ValueError(f"n_subjects must be one int or one per task ({len(kinds)}), got {n_subjects!r}")
    parts = []
    for i, (kind, n) in enumerate(zip(kinds, sizes)):
        index = list(kinds[:i]).count(kind)
        parts.append(fact_stream(lab, index + 1, kind, n_subjects=n).tasks[index])
    length = max(t.x_train.shape[1] for t in parts)
    pad = lab.tokenizer.pad_token_id
    tasks = [Task(i, t.name, _pad(t.x_train, length, pad), t.y_train, _pad(t.x_test, length, pad), t.y_test,
                  t.classes) for i, t in enumerate(parts)]
    return Stream("lm-merge", "domain", tasks, lab.model.config.vocab_size, (length,))


def one_task(stream: Stream, task_id: int) -> Stream:
    """``stream``'s task ``task_id`` alone, as a one-task stream."""
    stream.check_task_id(task_id)
    t = stream.tasks[task_id]
    return Stream(f"{stream.name}[{t.name}]", stream.scenario, [Task(0, t.name, t.x_train, t.y_train, t.x_test,
                                                                     t.y_test, t.classes)],
                  stream.n_out, stream.input_shape)


def balanced_union(stream: Stream, seed: int = 0) -> Stream:
    """Multi-task training data: every task's training set tiled to the largest one's size, shuffled (seeded),
    as one task evaluated on every task. Each task then gets the same share of the batches, as each separate
    fine-tune gets all of its own."""
    size = max(len(t.y_train) for t in stream.tasks)
    xs, ys = [], []
    for t in stream.tasks:
        reps = torch.arange(size) % len(t.y_train)  # [size]
        xs.append(t.x_train[reps])
        ys.append(t.y_train[reps])
    order = torch.randperm(size * len(stream.tasks), generator=torch.Generator().manual_seed(seed))
    union = Task(0, "multi-task", torch.cat(xs)[order], torch.cat(ys)[order], stream.tasks[0].x_test,
                 stream.tasks[0].y_test, tuple(range(stream.n_out)))
    return Stream(f"multi-task({stream.name})", stream.scenario, [union], stream.n_out, stream.input_shape,
                  eval_tasks=list(stream.tasks))


# ---------------------------------------------------------------- what a merge is scored on


@dataclass(frozen=True)
class Probe:
    """The measurements of a merged model: recall of each task's object on its validation and test halves,
    recall of a sample of the pretraining facts (``pretrained_facts``, encoded as ``pretrained``), and
    perplexity on a sample of the held-out general text."""

    names: tuple[str, ...]
    val: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per task: x [N, L], y [N]
    test: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    pretrained: tuple[torch.Tensor, torch.Tensor]
    general: tuple[str, ...]
    tokenizer: object
    pretrained_facts: tuple[Fact, ...] = ()

    def recall(self, model: nn.Module, split: str = "test") -> list[float]:
        """Object recall on each task's ``split`` half ("val" or "test"), a float64 share (38/40 is 0.95 exactly)."""
        _validate.one_of("split", split, ("val", "test"))
        pad = self.tokenizer.pad_token_id
        return [(object_logits(model, x, pad).argmax(1) == y).double().mean().item()
                for x, y in (self.val if split == "val" else self.test)]

    def score(self, model: nn.Module, split: str = "test", general: bool = True) -> dict[str, float]:
        """{task name: recall, …, "mean": mean task recall, "pretrained": recall of the pretraining facts,
        "perplexity": on the general text} (the last two only with ``general``)."""
        row = dict(zip(self.names, self.recall(model, split)))
        row["mean"] = sum(row.values()) / len(self.names)
        if general:
            x, y = self.pretrained
            hit = object_logits(model, x, self.tokenizer.pad_token_id).argmax(1) == y  # [N]
            row["pretrained"] = hit.double().mean().item()
            row["perplexity"] = perplexity(model, self.tokenizer, list(self.general))
        return row


def make_probe(lab: Lab, stream: Stream, n_pretrained: int = 480, n_general: int = 150, seed: int = 0) -> Probe:
    """Split each task's test facts at random (seeded) into a validation half and a test half; draw
    ``n_pretrained`` pretraining renderings and ``n_general`` held-out general sentences."""
    _validate.positive_int("n_pretrained", n_pretrained)
    _validate.positive_int("n_general", n_general)
    val, test = [], []
    for t in stream.tasks:
        if len(t.y_test) < 2:
            raise ValueError(f"task {t.name!r} must have at least 2 test facts to split, got {len(t.y_test)}")
        order = torch.randperm(len(t.y_test), generator=torch.Generator().manual_seed(seed + t.id))
        half = len(order) // 2
        val.append((t.x_test[order[:half]], t.y_test[order[:half]]))
        test.append((t.x_test[order[half:]], t.y_test[order[half:]]))
    world = lab.world
    gen = torch.Generator().manual_seed(seed)
    facts = [world.train_facts[i] for i in torch.randperm(len(world.train_facts), generator=gen)[:n_pretrained]]
    general = [world.general_test[i] for i in torch.randperm(len(world.general_test), generator=gen)[:n_general]]
    return Probe(tuple(t.name for t in stream.tasks), tuple(val), tuple(test), fact_batch(lab.tokenizer, facts),
                 tuple(general), lab.tokenizer, tuple(facts))


# ---------------------------------------------------------------- training


def fine_tune(lab: Lab, state: Mapping[str, torch.Tensor], stream: Stream, *, steps: int, lr: float,
              batch_size: int = 16, seed: int = 0, method=None) -> State:
    """The parameters after full fine-tuning from ``state`` on every task of ``stream`` in order (Adam, a fresh
    optimizer per task, ``train.fit``), on the CPU."""
    model = model_with(lab, state)
    train.fit(LMClassifier(model, lab.tokenizer.pad_token_id), stream, method, steps=steps, lr=lr,
              batch_size=batch_size, seed=seed, device="cpu", progress=False)
    return params_of(model)


def lora_delta(lab: Lab, state: Mapping[str, torch.Tensor], stream: Stream, *, rank: int = 8, alpha: float = 16.0,
               steps: int, lr: float, batch_size: int = 16, seed: int = 0, method=None) -> State:
    """Train one LoRA adapter (Hu et al. 2021, arXiv 2106.09685: W₀ + (α/r)·BA on ``LORA_TARGETS``, PEFT's
    implementation) from ``state`` on ``stream`` and return its dense delta ΔW for every parameter (zero
    outside the adapted weights): a task vector, so adapters merge like fine-tunes."""
    from peft import LoraConfig, get_peft_model

    _validate.positive_int("rank", rank)
    _validate.positive("alpha", alpha)
    torch.manual_seed(seed)  # LoRA's A is drawn from torch's global generator
    model = get_peft_model(model_with(lab, state), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), fan_in_fan_out=True, lora_dropout=0.0))
    train.fit(LMClassifier(model, lab.tokenizer.pad_token_id), stream, method, steps=steps, lr=lr,
              batch_size=batch_size, seed=seed, device="cpu", progress=False)
    merged = params_of(model.merge_and_unload())
    return {k: merged[k] - state[k] for k in state}

