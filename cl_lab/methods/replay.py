"""Replay: a memory of past samples, the policies that decide what it keeps, and the methods that use it.

- ``ReplayBuffer`` stores (x, y, t) and, optionally, the logits the model gave each sample when it was
  stored. Selection policies:

  * ``"reservoir"`` (Vitter 1985): after t items have streamed past, each of them is in the buffer with
    probability M/t — a uniform sample of the stream.
  * ``"class_balanced"``: reservoir sampling inside each class, with the memory split evenly over the
    classes seen so far (class-balanced reservoir, Chrysakis & Moens 2020, ICML).
  * ``"herding"`` (iCaRL, Rebuffi et al. 2017, arXiv 1611.07725, Alg. 4): at the end of a task, for each
    class pick exemplars one by one so that the running mean of their (normalised) features stays
    closest to the class mean; when new classes arrive each class keeps the head of its list.
  * ``"gss"`` (GSS-greedy, Aljundi et al. 2019, arXiv 1903.08671, Alg. 2): keep samples whose gradients
    point in diverse directions. A new sample's score is 1 + its largest gradient cosine with a few random
    buffer items; when full, it replaces a buffer item drawn in proportion to the stored scores with
    probability C_i / (C_i + c). Gradients are those of the output layer (closed form, see
    ``head_gradient_cosines``) — a cheap stand-in for the paper's full gradients.

- ``ER``: experience replay — each training batch mixes buffer samples into the new data, a share
  ``replay_ratio`` of the batch coming from the buffer (Chaudhry et al. 2019, arXiv 1902.10486).
- ``DER`` / DER++ (Buzzega et al. 2020, arXiv 2004.07211, Eq. 4 and 6): the buffer also stores logits z;
  loss += α·MSE(f(x'), z') (+ β·CE(f(x''), y'') for DER++).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.methods.base import Context, Method

POLICIES = ("reservoir", "class_balanced", "herding", "gss")
STREAMING_POLICIES = ("reservoir", "class_balanced", "gss")
GSS_COMPARISONS = 10  # random buffer items each new sample's gradient is compared with (paper: n = 10)


def check_policy(policy: str) -> str:
    return _validate.one_of("policy", policy, POLICIES)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features h [N, H] and logits [N, C] of a model with ``.features`` and ``.head``."""
    if not (hasattr(model, "features") and hasattr(model, "head")):
        raise TypeError(f"model must have .features and .head (like cl_lab.models.MLP), got {type(model).__name__}")
    h = model.features(x)
    return h, model.head(h)


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` exemplars chosen greedily so their running mean tracks the mean of ``features``.

    features [N, D] (L2-normalised here, as in iCaRL). Step k picks the unused x minimising
    ‖μ − (φ(x) + Σ_{j<k} φ(p_j)) / k‖ (iCaRL Alg. 4). Returns [m] indices in selection order.
    """
    _validate.non_negative_int("m", m)
    if m > len(features):
        raise ValueError(f"m must be ≤ the {len(features)} samples available, got {m}")
    phi = F.normalize(features.float(), dim=1)  # [N, D]
    mu = phi.mean(0)  # [D]
    chosen: list[int] = []
    running = torch.zeros_like(mu)  # sum of chosen features [D]
    available = torch.ones(len(phi), dtype=torch.bool, device=phi.device)
    for k in range(1, m + 1):
        dist = (mu - (running + phi) / k).norm(dim=1).masked_fill(~available, float("inf"))  # [N]
        i = int(dist.argmin())
        chosen.append(i)
        running += phi[i]
        available[i] = False
    return torch.tensor(chosen, dtype=torch.long)


def head_gradient_cosines(h_new: torch.Tensor, p_new: torch.Tensor, y_new: torch.Tensor,
                          h_old: torch.Tensor, p_old: torch.Tensor, y_old: torch.Tensor) -> torch.Tensor:
    """Cosines [B, n] between per-sample gradients of cross-entropy w.r.t. the output layer (W, b).

    For one sample, ∂CE/∂W = a ⊗ h and ∂CE/∂b = a with a = softmax − onehot(y), so
    ⟨g_i, g_j⟩ = (a_i·a_j)(h_i·h_j + 1): no per-sample backward pass needed.
    """
    a_new = p_new - F.one_hot(y_new, p_new.shape[1]).to(p_new)  # [B, C]
    a_old = p_old - F.one_hot(y_old, p_old.shape[1]).to(p_old)  # [n, C]
    dots = (a_new @ a_old.T) * (h_new @ h_old.T + 1)  # [B, n]
    norm_new = a_new.norm(dim=1) * (h_new.pow(2).sum(1) + 1).sqrt()  # [B]
    norm_old = a_old.norm(dim=1) * (h_old.pow(2).sum(1) + 1).sqrt()  # [n]
    return dots / (norm_new[:, None] * norm_old[None, :]).clamp_min(1e-12)


def balanced_quotas(classes: list[int], size: int) -> dict[int, int]:
    """Split ``size`` slots over ``classes`` as evenly as possible (earlier classes get the remainder)."""
    base, extra = divmod(size, max(len(classes), 1))
    return {c: base + (i < extra) for i, c in enumerate(sorted(classes))}


class ReplayBuffer:
    """A fixed-size memory of (x, y, t[, logits]) filled by one selection policy (see module docstring).

    Streaming policies take samples through ``add``; ``"herding"`` selects at ``end_task``. ``seen`` counts
    the samples offered so far (reservoir's t).
    """

    def __init__(self, size: int, policy: str = "reservoir", *, seed: int = 0) -> None:
        self.size = _validate.non_negative_int("size", size)
        self.policy = check_policy(policy)
        self.gen = torch.Generator().manual_seed(_validate.non_negative_int("seed", seed))
        self.seen = 0
        self.seen_per_class: dict[int, int] = {}
        self.x = self.y = self.t = self.logits = None  # filled lazily: [n, D], [n], [n], [n, C]
        self.scores: torch.Tensor | None = None  # GSS scores [n]
        self.exemplars: dict[int, tuple] = {}  # herding: class -> (x, y, t, logits) in herding order

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def __repr__(self) -> str:
        return f"ReplayBuffer(size={self.size}, policy={self.policy!r}, held={len(self)}, seen={self.seen})"

    # ---- streaming policies -------------------------------------------------------------------------
    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, logits: torch.Tensor | None = None,
            model: nn.Module | None = None) -> None:
        """Offer a batch x [B, D], y [B], t [B] (logits [B, C] optional) to a streaming policy.

        ``model`` is needed by ``"gss"`` (to score gradients). ``"herding"`` selects at ``end_task``.
        """
        if self.policy == "herding":
            raise ValueError("policy 'herding' selects exemplars at the end of a task: call end_task(...)")
        if not len(x):
            return
        x, y, t = x.detach(), y.detach(), t.detach()
        logits = None if logits is None else logits.detach()
        if self.policy == "reservoir":
            self._add_reservoir(x, y, t, logits)
        elif self.policy == "class_balanced":
            self._add_class_balanced(x, y, t, logits)
        else:
            if model is None:
                raise ValueError("policy 'gss' needs the model to score gradients: add(..., model=model)")
            self._add_gss(x, y, t, logits, model)

    def _append(self, x, y, t, logits) -> None:
        if self.y is None:
            self.x, self.y, self.t = x.clone(), y.clone(), t.clone()
            self.logits = None if logits is None else logits.clone()
            return
        self.x, self.y, self.t = torch.cat([self.x, x]), torch.cat([self.y, y]), torch.cat([self.t, t])
        if logits is not None:
            self.logits = logits.clone() if self.logits is None else torch.cat([self.logits, logits])

    def _write(self, slot: int, x, y, t, logits, i: int) -> None:
        self.x[slot], self.y[slot], self.t[slot] = x[i], y[i], t[i]
        if logits is not None:
            self.logits[slot] = logits[i]

    def _fill(self, x, y, t, logits) -> int:
        """Append while there is room; return how many of the batch were appended."""
        room = min(self.size - len(self), len(x))
        if room > 0:
            self._append(x[:room], y[:room], t[:room], None if logits is None else logits[:room])
        return max(room, 0)

    def _add_reservoir(self, x, y, t, logits) -> None:
        n_fill = self._fill(x, y, t, logits)
        seen = self.seen + torch.arange(1, len(x) + 1)  # stream position of each item (1-based) [B]
        self.seen += len(x)
        if self.size == 0:
            return
        slot = (torch.rand(len(x), generator=self.gen) * seen).long()  # uniform in 0..seen-1 [B]
        for i in range(n_fill, len(x)):  # kept with probability size / seen, into a random slot
            if slot[i] < self.size:
                self._write(int(slot[i]), x, y, t, logits, i)

    def _add_class_balanced(self, x, y, t, logits) -> None:
        held = self.class_counts()
        for i in range(len(x)):
            c = int(y[i])
            self.seen += 1
            self.seen_per_class[c] = self.seen_per_class.get(c, 0) + 1
            if self.size == 0:
                continue
            if len(self) < self.size:
                self._append(x[i:i + 1], y[i:i + 1], t[i:i + 1], None if logits is None else logits[i:i + 1])
                held[c] = held.get(c, 0) + 1
                continue
            largest = max(held.values())
            if held.get(c, 0) < largest:  # class c is under-represented: evict from a largest class
                victim_classes = torch.tensor([k for k, v in held.items() if v == largest], device=self.y.device)
                victims = torch.nonzero(torch.isin(self.y, victim_classes)).flatten()
            elif torch.rand(1, generator=self.gen).item() < held[c] / self.seen_per_class[c]:
                victims = torch.nonzero(self.y == c).flatten()  # reservoir inside class c
            else:
                continue
            slot = int(victims[torch.randint(len(victims), (1,), generator=self.gen)])
            held[int(self.y[slot])] -= 1
            held[c] = held.get(c, 0) + 1
            self._write(slot, x, y, t, logits, i)

    def _add_gss(self, x, y, t, logits, model: nn.Module) -> None:
        self.seen += len(x)
        if self.size == 0:
            return
        with torch.no_grad():
            h_new, z_new = features_and_logits(model, x)
            if len(self):
                cmp = torch.randperm(len(self), generator=self.gen)[:GSS_COMPARISONS].to(x.device)
                h_old, z_old = features_and_logits(model, self.x[cmp])
                cos = head_gradient_cosines(h_new, z_new.softmax(1), y, h_old, z_old.softmax(1), self.y[cmp])
                score = cos.max(1).values + 1  # [B] in [0, 2]
            else:
                score = torch.ones(len(x), device=x.device)
        n_fill = self._fill(x, y, t, logits)
        self.scores = score[:n_fill].clone() if self.scores is None else torch.cat([self.scores, score[:n_fill]])
        for i in range(n_fill, len(x)):
            if score[i] >= 1:  # gradient already represented in the buffer
                continue
            slot = int(torch.multinomial(self.scores.cpu() + 1e-12, 1, generator=self.gen))
            if torch.rand(1, generator=self.gen).item() < self.scores[slot] / (self.scores[slot] + score[i]):
                self._write(slot, x, y, t, logits, i)
                self.scores[slot] = score[i]

    # ---- selection at task end ----------------------------------------------------------------------
    @torch.no_grad()
    def end_task(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, model: nn.Module | None = None,
                 store_logits: bool = False) -> None:
        """Herding: select exemplars of each class in x [N, D], y [N], t [N] with ``model``'s features,
        then shrink every class to an even share of the memory. Other policies: nothing to do."""
        if self.policy != "herding":
            return
        if model is None:
            raise ValueError("policy 'herding' needs the model's features: end_task(..., model=model)")
        was_training = model.training
        model.eval()
        self.seen += len(x)
        new_classes = [int(c) for c in torch.unique(y)]
        quotas = balanced_quotas(sorted(set(self.exemplars) | set(new_classes)), self.size)
        for c in new_classes:
            idx = torch.nonzero(y == c).flatten()
            h, z = features_and_logits(model, x[idx])
            pick = herding_order(h, min(quotas[c], len(idx))).to(idx.device)
            order = idx[pick]
            self.exemplars[c] = (x[order], y[order], t[order], z[pick] if store_logits else None)
        model.train(was_training)
        for c, (xc, yc, tc, zc) in self.exemplars.items():  # every class keeps the head of its herding list
            m = quotas[c]
            self.exemplars[c] = (xc[:m], yc[:m], tc[:m], None if zc is None else zc[:m])
        parts = [self.exemplars[c] for c in sorted(self.exemplars)]
        self.x, self.y, self.t = (torch.cat([p[i] for p in parts]) for i in range(3))
        self.logits = torch.cat([p[3] for p in parts]) if store_logits else None

    # ---- reading ------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, *, with_logits: bool = False):
        """``n`` distinct random items: (x [n, D], y [n], t [n]) or, ``with_logits``, (x, y, t, logits [n, C])."""
        _validate.non_negative_int("n", n)
        if n > len(self):
            raise ValueError(f"n must be ≤ the {len(self)} items held by the buffer, got {n}")
        if with_logits and self.logits is None:
            raise ValueError("with_logits=True needs logits stored with the samples (add(..., logits=...))")
        idx = torch.randperm(len(self), generator=generator or self.gen)[:n].to(self.y.device)
        items = (self.x[idx], self.y[idx], self.t[idx])
        return items + (self.logits[idx],) if with_logits else items

    def class_counts(self) -> dict[int, int]:
        """How many items of each class the buffer holds."""
        if not len(self):
            return {}
        values, counts = torch.unique(self.y, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def replay_split(batch_size: int, replay_ratio: float, held: int) -> tuple[int, int]:
    """(new, old) counts for a combined batch of ``batch_size`` with a share ``replay_ratio`` of old samples,
    limited by the ``held`` items in the buffer."""
    n_old = min(round(replay_ratio * batch_size), held)
    return batch_size - n_old, n_old


class ER(Method):
    """Experience replay: each batch keeps its size, a share ``replay_ratio`` of it drawn from the buffer.

    With batch B the step trains on B·(1 − r) new samples and B·r buffer samples, so r is exactly the old
    share of every combined batch (before the buffer holds enough, fewer old samples are used). The
    new samples trained on are then offered to the buffer (streaming policies); herding selects at the
    end of each task from the task's training data.
    """

    name = "ER"

    def __init__(self, buffer_size: int, policy: str = "reservoir", replay_ratio: float = 0.5,
                 seed: int = 0) -> None:
        self.buffer_size = _validate.non_negative_int("buffer_size", buffer_size)
        self.policy = check_policy(policy)
        self.replay_ratio = _validate.in_range("replay_ratio", replay_ratio, 0.0, 1.0)
        self.seed = _validate.non_negative_int("seed", seed)
        self.buffer = ReplayBuffer(buffer_size, policy, seed=seed)

    def compose_batch(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_new, n_old = replay_split(len(x), self.replay_ratio, len(self.buffer))
        x, y, t = x[:n_new], y[:n_new], t[:n_new]  # the incoming batch is already shuffled
        old = self.buffer.sample(n_old, ctx.generator) if n_old else None  # drawn before x is offered
        if self.policy in STREAMING_POLICIES:
            self.buffer.add(x, y, t, model=ctx.model)
        if old is None:
            return x, y, t
        return torch.cat([x, old[0]]), torch.cat([y, old[1]]), torch.cat([t, old[2]])  # [B, ...]

    def on_task_end(self, ctx: Context) -> None:
        task = ctx.task
        self.buffer.end_task(task.x_train.to(ctx.device), task.y_train.to(ctx.device),
                             task.t_train.to(ctx.device), model=ctx.model)


class DER(Method):
    """Dark Experience Replay (Buzzega et al. 2020): replay stored logits with an MSE term.

    loss = CE(new batch) + α·MSE(f(x'), z') [+ β·CE(f(x''), y'') for DER++], where (x', z') and (x'', y'')
    are two independent draws of ``replay_batch`` buffer items and z' the logits the model produced for x'
    when x' was stored (Eq. 4 and 6). Logits are the loop's (Task-IL masked) logits, so masked entries
    match exactly and cost nothing.
    """

    def __init__(self, buffer_size: int, alpha: float = 0.5, beta: float = 0.0, policy: str = "reservoir",
                 replay_batch: int | None = None, seed: int = 0) -> None:
        self.buffer_size = _validate.non_negative_int("buffer_size", buffer_size)
        self.alpha = _validate.non_negative("alpha", alpha)
        self.beta = _validate.non_negative("beta", beta)
        self.policy = _validate.one_of("policy", policy, STREAMING_POLICIES)
        self.replay_batch = None if replay_batch is None else _validate.positive_int("replay_batch", replay_batch)
        self.seed = _validate.non_negative_int("seed", seed)
        self.name = "DER++" if self.beta > 0 else "DER"
        self.buffer = ReplayBuffer(buffer_size, policy, seed=seed)

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        n = min(self.replay_batch or ctx.batch_size, len(self.buffer))
        loss = None
        if n:
            xb, _, tb, zb = self.buffer.sample(n, ctx.generator, with_logits=True)
            loss = self.alpha * F.mse_loss(ctx.forward(xb, tb), zb)
            if self.beta > 0:
                xb, yb, tb = self.buffer.sample(n, ctx.generator)
                loss = loss + self.beta * F.cross_entropy(ctx.forward(xb, tb), yb)
        self.buffer.add(x, y, t, logits=logits.detach(), model=ctx.model)  # z = this model's logits
        return loss
