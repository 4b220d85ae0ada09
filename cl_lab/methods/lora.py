"""LoRA for continual learning: a frozen backbone, low-rank adapters per task, and O-LoRA's orthogonality.

- ``LoRALinear``: LoRA (Hu et al. 2021, arXiv 2106.09685, eq. 3): h = W₀x + (α/r)·B A x with W₀ frozen,
  A [r, d_in] random and B [d_out, r] zero at initialisation, so the adapted layer equals W₀ bit for bit
  until B moves. This is also PEFT's convention (scale α/r, B zero-initialised, A drawn like nn.Linear's
  weight: U(±1/√d_in), PEFT's ``kaiming_uniform_(a=√5)``). The frozen projection is an ``nn.Linear``
  (weight [out, in], y = x Wᵀ + b) or a ``transformers`` ``Conv1D`` as in GPT-2 (weight [in, out],
  y = x W + b; PEFT's ``fan_in_fan_out=True``): the adapter path x Aᵀ Bᵀ is the same for both. A layer may
  hold several adapters; the ``active`` ones are summed.
- ``LoRAModel``: the chosen projections of a network (every ``nn.Linear``, or the modules named by
  ``targets``, PEFT-style name suffixes such as ``"c_attn"`` or ``"mlp.c_proj"``) wrapped in ``LoRALinear``,
  the backbone frozen, one adapter made at construction; ``merged()`` folds adapters into plain weights.
- ``SharedLoRA``: one adapter trained through every task (no task id needed, and it forgets).
- ``PerTaskLoRA``: one adapter per task, the older ones frozen; the task id routes a test input to its
  adapter (or, with ``routing="sum"``, every adapter is active at once).
- ``OLoRA``: O-LoRA (Wang et al. 2023, arXiv 2310.14152, eq. 4–5): task k's adapter is trained on top of the
  frozen earlier ones with L = L_task + λ Σ_{j<k} ‖A_j A_kᵀ‖²_F, and all adapters are summed at test time.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cl_lab import _validate
from cl_lab.data.streams import Stream
from cl_lab.methods.base import Context, Method

ROUTINGS = ("task", "sum")


def lora_parameter_count(layer_dims: Sequence[int], rank: int) -> int:
    """Parameters of one adapter set (one rank-``rank`` adapter per layer): Σ_layers r·(d_in + d_out)."""
    _validate.positive_int("rank", rank)
    if len(layer_dims) < 2:
        raise ValueError(f"layer_dims must hold at least two widths (d_in, d_out), got {list(layer_dims)}")
    for width in layer_dims:
        _validate.positive_int("layer width", width)
    return sum(rank * (d_in + d_out) for d_in, d_out in zip(layer_dims[:-1], layer_dims[1:]))


def is_conv1d(module: nn.Module) -> bool:
    """True for a ``transformers`` ``Conv1D`` (GPT-2's projections, weight [in, out]); cl_lab never imports
    transformers itself, so a model holding one has already imported it."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoRALinear(nn.Module):
    """A frozen projection plus low-rank adapters: y = base(x) + Σ_{i ∈ active} (αᵢ/rᵢ)·x Aᵢᵀ Bᵢᵀ.

    ``base`` is an ``nn.Linear`` (weight [out, in]) or a GPT-2 ``Conv1D`` (weight [in, out]:
    ``fan_in_fan_out`` is True). x may carry any leading dimensions: [..., d_in] → [..., d_out].
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_projection(base):
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        self.base = base
        self.fan_in_fan_out = is_conv1d(base)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.A = nn.ParameterList()  # each [r, d_in]
        self.B = nn.ParameterList()  # each [d_out, r]
        self.scales: list[float] = []  # α / r per adapter
        self.active: tuple[int, ...] = ()

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[1 if self.fan_in_fan_out else 0]

    def add_adapter(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> int:
        """Append an adapter (A: nn.Linear's uniform init ±1/√d_in, B: zeros); returns its index."""
        _validate.positive_int("rank", rank)
        _validate.positive("alpha", alpha)
        device = self.base.weight.device
        bound = 1 / math.sqrt(self.in_features)
        a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound  # [r, d_in]
        self.A.append(nn.Parameter(a.to(device)))
        self.B.append(nn.Parameter(torch.zeros(self.out_features, rank, device=device)))  # [d_out, r]
        self.scales.append(alpha / rank)
        return len(self.A) - 1

    def check_adapter(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"adapter must be an int, got {type(i).__name__} {i!r}")
        if not 0 <= i < len(self.A):
            raise ValueError(f"adapter must be in 0..{len(self.A) - 1}, got {i}")
        return i

    def delta_weight(self, i: int) -> torch.Tensor:
        """ΔWᵢ = (α/r)·Bᵢ Aᵢ: [d_out, d_in]."""
        self.check_adapter(i)
        return self.scales[i] * self.B[i] @ self.A[i]

    def adapter_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What adapter i adds to the layer's output for inputs x [..., d_in]: [..., d_out]."""
        self.check_adapter(i)
        return (x @ self.A[i].T) @ self.B[i].T * self.scales[i]  # [..., r] -> [..., d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_out]
        out = self.base(x)
        for i in self.active:
            out = out + self.adapter_output(x, i)
        return out


def target_names(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The qualified names of the projections LoRA adapts: every ``nn.Linear`` (``targets=None``), or every
    ``nn.Linear``/``Conv1D`` whose name is a target or ends with ``"." + target`` (PEFT's matching rule:
    ``"c_proj"`` takes both GPT-2 projections of that name, ``"mlp.c_proj"`` only the MLP's)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if targets is None:
        return [n for n, m in named if isinstance(m, nn.Linear)]
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    projections = [n for n, m in named if is_projection(m)]
    chosen = []
    for target in targets:
        hits = [n for n in projections if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in projections})
            raise ValueError(f"targets must name projection modules of the model (name suffixes such as "
                             f"{suffixes}), got {target!r}, which matches none")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in projections if n in chosen]  # model order


class LoRAModel(nn.Module):
    """A copy of ``base`` with its projections wrapped in ``LoRALinear`` (every ``nn.Linear``, or the modules
    ``targets`` names: see ``target_names``): the backbone frozen, one adapter of rank ``rank`` and scale α/r
    made (trainable, active) at construction; ``add_adapter`` makes more. Adapter A matrices are drawn from
    ``seed``, layer by layer in model order."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 targets: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        self.rank = _validate.positive_int("rank", rank)
        self.alpha = _validate.positive("alpha", alpha)
        _validate.non_negative_int("seed", seed)
        self.targets = None if targets is None else tuple(targets)
        names = target_names(base, targets)
        if not names:
            raise ValueError(f"base must contain at least one nn.Linear, got {type(base).__name__} with none")
        self.net = copy.deepcopy(base)
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = self.net.get_submodule(parent) if parent else self.net
            setattr(owner, child, LoRALinear(getattr(owner, child)))
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed)
        self.train_only(self.add_adapter())
        self.activate(0)

    def lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.net.modules() if isinstance(m, LoRALinear)]

    @property
    def n_adapters(self) -> int:
        return len(self.lora_layers()[0].A)

    @property
    def active(self) -> tuple[int, ...]:
        return self.lora_layers()[0].active

    def add_adapter(self, rank: int | None = None, alpha: float | None = None) -> int:
        """A new (frozen, inactive) adapter in every layer; returns its index."""
        rank = self.rank if rank is None else rank
        alpha = self.alpha if alpha is None else alpha
        return [layer.add_adapter(rank, alpha, self.generator) for layer in self.lora_layers()][0]

    def check_adapter(self, i: int) -> int:
        return self.lora_layers()[0].check_adapter(i)

    def activate(self, *adapters: int) -> None:
        """Make exactly these adapters active (summed) in every layer; none = the bare backbone."""
        for i in adapters:
            self.check_adapter(i)
        for layer in self.lora_layers():
            layer.active = tuple(adapters)

    @contextlib.contextmanager
    def using(self, *adapters: int) -> Iterator[None]:
        """Temporarily activate ``adapters`` (restores the previous set afterwards)."""
        previous = self.active
        self.activate(*adapters)
        try:
            yield
        finally:
            self.activate(*previous)

    def adapter_parameters(self, i: int) -> list[nn.Parameter]:
        self.check_adapter(i)
        return [p for layer in self.lora_layers() for p in (layer.A[i], layer.B[i])]

    def train_only(self, i: int) -> None:
        """Adapter i trainable, every other parameter (backbone, other adapters) frozen."""
        self.check_adapter(i)
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.adapter_parameters(i):
            p.requires_grad_(True)

    def adapter_size(self, i: int) -> int:
        return sum(p.numel() for p in self.adapter_parameters(i))

    @torch.no_grad()
    def merged(self, *adapters: int) -> nn.Module:
        """A plain network (no LoRA layers) with W = W₀ + Σ_{i ∈ adapters} ΔWᵢ folded into each projection."""
        for i in adapters:
            self.check_adapter(i)
        plain = copy.deepcopy(self.net)

        def unwrap(module: nn.Module) -> None:
            for name, child in module.named_children():
                if isinstance(child, LoRALinear):
                    linear = child.base
                    for i in adapters:
                        delta = child.delta_weight(i)  # [d_out, d_in]
                        linear.weight += delta.T if child.fan_in_fan_out else delta
                    setattr(module, name, linear)
                else:
                    unwrap(child)

        unwrap(plain)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _require_lora_model(model: nn.Module, who: str) -> LoRAModel:
    if not isinstance(model, LoRAModel):
        raise TypeError(f"model must be a LoRAModel for {who}, got {type(model).__name__}")
    return model


def _rebuild_optimizer(ctx: Context) -> None:
    """A fresh optimizer of the same kind over the parameters that are trainable now."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.optimizer = type(ctx.optimizer)(params, **ctx.optimizer.defaults)


def orthogonality_penalty(model: LoRAModel, new: int, earlier: Sequence[int]) -> torch.Tensor:
    """O-LoRA's term Σ_layers Σ_{j ∈ earlier} ‖A_j A_newᵀ‖²_F (a scalar; zero when the rows are orthogonal)."""
    _require_lora_model(model, "orthogonality_penalty")
    model.check_adapter(new)
    total = torch.zeros((), device=next(model.parameters()).device)
    for layer in model.lora_layers():
        for j in earlier:
            layer.check_adapter(j)
            total = total + (layer.A[j] @ layer.A[new].T).pow(2).sum()  # [r_j, r_new]
    return total


def subspace_overlap(a_j: torch.Tensor, a_k: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of A_j [r_j, d] and A_k [r_k, d]:
    ‖Q_jᵀ Q_k‖²_F / min(r_j, r_k), 0 = orthogonal, 1 = one contains the other."""
    for name, a in (("a_j", a_j), ("a_k", a_k)):
        if a.dim() != 2:
            raise ValueError(f"{name} must be a matrix [r, d], got shape {tuple(a.shape)}")
    if a_j.shape[1] != a_k.shape[1]:
        raise ValueError(f"a_j and a_k must have the same width d, got {a_j.shape[1]} and {a_k.shape[1]}")
    q_j = torch.linalg.qr(a_j.detach().cpu().double().T).Q  # [d, r_j] orthonormal basis of A_j's row space
    q_k = torch.linalg.qr(a_k.detach().cpu().double().T).Q  # [d, r_k]
    return float((q_j.T @ q_k).pow(2).sum() / min(q_j.shape[1], q_k.shape[1]))


class SharedLoRA(Method):
    """One adapter (the model's adapter 0) trained through every task of the stream; the backbone stays frozen
    but nothing protects the adapter itself, so it is naive fine-tuning in a low-rank subspace."""

    name = "shared LoRA"

    def on_task_start(self, ctx: Context) -> None:
        model = _require_lora_model(ctx.model, "SharedLoRA")
        model.train_only(0)
        model.activate(0)
        _rebuild_optimizer(ctx)


class PerTaskLoRA(Method):
    """One adapter per task (Hu et al. 2021, arXiv 2106.09685, applied per task as in the LoRA-based CL of
    the isolation family): task k trains a fresh adapter, everything else frozen.

    ``routing="task"``: a test input of task j goes through adapter j only (a task with no adapter, e.g. the
    backbone's own task, through the bare backbone); old tasks' outputs are then bit-identical.
    ``routing="sum"``: every adapter is active at once (no task id needed), which is the same function as
    merging them all into the backbone.
    """

    name = "LoRA per task"
    stack_while_training = False  # O-LoRA trains the new adapter on top of the frozen earlier ones

    def __init__(self, routing: str = "task") -> None:
        self.routing = _validate.one_of("routing", routing, ROUTINGS)
        self.adapter_of: dict[int, int] = {}  # task id -> adapter index

    def adapter_for(self, task_id: int) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"task_id must be an int, got {type(task_id).__name__} {task_id!r}")
        if task_id not in self.adapter_of:
            known = sorted(self.adapter_of) or "none yet"
            raise ValueError(f"task_id must be a task with an adapter ({known}), got {task_id}")
        return self.adapter_of[task_id]

    def on_task_start(self, ctx: Context) -> None:
        model = _require_lora_model(ctx.model, type(self).__name__)
        if ctx.task.id in self.adapter_of:
            raise ValueError(f"task {ctx.task.id} already has adapter {self.adapter_of[ctx.task.id]}: "
                             "train each task once, from a fresh method")
        claimed = set(self.adapter_of.values())
        free = [i for i in range(model.n_adapters) if i not in claimed]
        new = free[0] if free else model.add_adapter()
        self.adapter_of[ctx.task.id] = new
        model.train_only(new)
        earlier = [i for i in self.adapter_of.values() if i != new]
        model.activate(*(earlier if self.stack_while_training else []), new)
        _rebuild_optimizer(ctx)

    def logits(self, model: nn.Module, stream: Stream, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model = _require_lora_model(model, type(self).__name__)
        if self.routing == "sum":
            with model.using(*self.adapter_of.values()):
                return stream.mask_logits(model(x), t)
        out = torch.empty(len(x), stream.n_out, device=x.device)
        for task_id in t.unique().tolist():
            rows = t == task_id
            adapters = (self.adapter_of[task_id],) if task_id in self.adapter_of else ()
            with model.using(*adapters):
                out[rows] = model(x[rows])
        return stream.mask_logits(out, t)


class OLoRA(PerTaskLoRA):
    """O-LoRA (Wang et al. 2023, arXiv 2310.14152, eq. 4–5): adapter k is trained with the frozen adapters of
    tasks j < k active, under the extra loss λ Σ_{j<k} ‖A_j A_kᵀ‖²_F summed over layers, and every adapter is
    active at test time (no task id). ``lam=0`` is the same protocol without the penalty (the control).
    """

    name = "O-LoRA"
    stack_while_training = True

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__(routing="sum")
        self.lam = _validate.non_negative("lam", lam)

    def extra_loss(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                   logits: torch.Tensor) -> torch.Tensor | None:
        new = self.adapter_of[ctx.task.id]
        earlier = [i for i in self.adapter_of.values() if i != new]
        if not earlier or self.lam == 0:
            return None
        return self.lam * orthogonality_penalty(ctx.model, new, earlier)
