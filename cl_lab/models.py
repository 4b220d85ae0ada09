"""Small models for the chapters: an MLP and a CNN, both returning logits [B, n_out] from flat inputs.

Task-IL multi-head behaviour comes from logit masking in the stream (``Stream.mask_logits``), so
every model here is single-headed and every method sees the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cl_lab import _validate


class MLP(nn.Module):
    """Fully connected ReLU network: in_dim → hidden[0] → … → n_out."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (400, 400), n_out: int = 10) -> None:
        super().__init__()
        _validate.positive_int("in_dim", in_dim)
        _validate.positive_int("n_out", n_out)
        for width in hidden:
            _validate.positive_int("hidden width", width)
        sizes = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, in_dim] -> [B, n_out]
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Two conv blocks (conv-ReLU-maxpool) and a linear head, for flat inputs of ``image_shape``."""

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), n_out: int = 10,
                 channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        _validate.positive_int("n_out", n_out)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.image_shape = tuple(image_shape)
        c, h, w = image_shape
        blocks: list[nn.Module] = []
        for out_c in channels:
            _validate.positive_int("channels", out_c)
            blocks += [nn.Conv2d(c, out_c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out_c, h // 2, w // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(c * h * w, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C*H*W] -> [B, n_out]
        return self.head(self.features(x.reshape(len(x), *self.image_shape)))


def for_stream(stream, kind: str = "mlp", **kwargs) -> nn.Module:
    """A fresh model sized for ``stream`` (its input shape and number of outputs)."""
    _validate.one_of("kind", kind, ("mlp", "cnn"))
    if kind == "mlp":
        return MLP(stream.input_dim, n_out=stream.n_out, **kwargs)
    return SmallCNN(stream.input_shape, n_out=stream.n_out, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached vector [P]."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
