"""Generative replay in miniature: a small VAE learns the stream and replays pseudo-samples instead of data.

Deep Generative Replay (Shin et al. 2017, arXiv 1705.08690; van de Ven et al. 2020, Nat. Commun.): while
training task k, a share ``replay_ratio`` of each batch is drawn from a frozen copy of the generator
trained up to task k−1, labelled by a frozen copy of the classifier. The generator itself keeps learning
on the same mix (new data + its own old samples), so nothing real is stored — and what the classifier
can remember is capped by how faithful the generator's samples are.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cl_lab import _validate
from cl_lab.methods.base import Context, Method


class VAE(nn.Module):
    """A two-layer MLP VAE (Kingma & Welling 2014, arXiv 1312.6114) for inputs in [0, 1]."""

    def __init__(self, in_dim: int, hidden: int = 200, latent: int = 16) -> None:
        super().__init__()
        self.latent = _validate.positive_int("latent", latent)
        _validate.positive_int("hidden", hidden)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per sample, averaged: BCE reconstruction + KL(q(z|x) ‖ N(0, I))."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # [B, L] each
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum") / len(x)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(x)
        return recon + kl

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images [n, in_dim] decoded from z ~ N(0, I)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent, generator=generator).to(device)
        return torch.sigmoid(self.decoder(z))


class GenerativeReplay(Method):
    """Replay VAE samples labelled by the previous classifier; the VAE learns continually on the same mix."""

    name = "generative replay"

    def __init__(self, hidden: int = 200, latent: int = 16, replay_ratio: float = 0.5, vae_lr: float = 1e-3,
                 seed: int = 0) -> None:
        self.hidden = _validate.positive_int("hidden", hidden)
        self.latent = _validate.positive_int("latent", latent)
        self.replay_ratio = _validate.in_range("replay_ratio", replay_ratio, 0.0, 1.0)
        self.vae_lr = _validate.positive("vae_lr", vae_lr)
        self.seed = _validate.non_negative_int("seed", seed)
        self.vae: VAE | None = None
        self.old_vae: VAE | None = None
        self.old_model: nn.Module | None = None
        self.seen_classes: list[int] = []
        self._gen = torch.Generator().manual_seed(seed)

    def on_task_start(self, ctx: Context) -> None:
        if self.vae is None:
            torch.manual_seed(self.seed)
            self.vae = VAE(ctx.stream.input_dim, self.hidden, self.latent).to(ctx.device)
            self._vae_opt = torch.optim.Adam(self.vae.parameters(), lr=self.vae_lr)

    @torch.no_grad()
    def pseudo_batch(self, ctx: Context, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n generated inputs, labelled by the old classifier among the classes seen so far."""
        x = self.old_vae.sample(n, self._gen)  # [n, D]
        logits = self.old_model(x)  # [n, n_out]
        seen = torch.zeros(logits.shape[1], dtype=torch.bool, device=x.device)
        seen[self.seen_classes] = True
        y = logits.masked_fill(~seen, float("-inf")).argmax(1)  # [n]
        if ctx.stream.scenario == "task":  # the task that owns each class
            t = ctx.stream.masks.to(x.device)[:, y].float().argmax(0)
        else:
            t = torch.full_like(y, ctx.task_index)
        return x, y, t

    def compose_batch(self, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_old = round(self.replay_ratio * len(x)) if self.old_vae is not None else 0
        if n_old:
            xg, yg, tg = self.pseudo_batch(ctx, n_old)
            x, y, t = torch.cat([x[: len(x) - n_old], xg]), torch.cat([y[: len(y) - n_old], yg]), \
                torch.cat([t[: len(t) - n_old], tg])
        self._vae_opt.zero_grad(set_to_none=True)
        self.vae.loss(x).backward()  # the generator learns the same mix of new and replayed inputs
        self._vae_opt.step()
        return x, y, t

    def on_task_end(self, ctx: Context) -> None:
        self.old_vae = copy.deepcopy(self.vae).eval()
        self.old_model = copy.deepcopy(ctx.model).eval()
        for param in [*self.old_vae.parameters(), *self.old_model.parameters()]:
            param.requires_grad_(False)
        self.seen_classes = sorted(set(self.seen_classes) | {int(c) for c in ctx.task.classes})
