"""The VAE's loss and sampler, and generative replay's pseudo-batches in the loop."""

import pytest
import torch

from cl_lab import data, models, train
from cl_lab.methods.generative import VAE, GenerativeReplay


def test_vae_learns_and_samples_in_range():
    torch.manual_seed(0)
    x = (torch.rand(64, 20) > 0.5).float()
    vae = VAE(20, hidden=16, latent=2)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    first = vae.loss(x).item()
    for _ in range(100):
        opt.zero_grad()
        vae.loss(x).backward()
        opt.step()
    assert vae.loss(x).item() < first
    samples = vae.sample(5)
    assert samples.shape == (5, 20) and ((samples >= 0) & (samples <= 1)).all()


def test_generative_replay_labels_pseudo_samples_with_seen_classes_only():
    stream = data.split_mnist(5, "task", n_train=100)
    method = GenerativeReplay(hidden=16, latent=2)
    train.fit(models.MLP(784, (16,), 10), stream, method, steps=3, batch_size=16)
    assert method.seen_classes == list(range(10))
    # after two tasks, pseudo-labels can only be 0..3 and carry their owning task id
    method.seen_classes = [0, 1, 2, 3]
    ctx = type("Ctx", (), {"stream": stream, "task_index": 2})()
    x, y, t = method.pseudo_batch(ctx, 50)
    assert x.shape == (50, 784) and set(y.tolist()) <= {0, 1, 2, 3}
    assert torch.equal(t, y // 2)


def test_generative_replay_rejects_bad_ratio():
    with pytest.raises(ValueError, match="replay_ratio"):
        GenerativeReplay(replay_ratio=2.0)
