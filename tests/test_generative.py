"""The VAE's loss and sampler, and generative replay's pseudo-batches in the loop."""

from types import SimpleNamespace

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


def _ctx(stream, task_index, model):
    return SimpleNamespace(stream=stream, task_index=task_index, model=model, device=torch.device("cpu"))


def test_first_task_trains_on_real_data_only_while_the_vae_learns_it():
    stream = data.split_mnist(5, "class", n_train=100)
    model = models.MLP(784, (16,), 10)
    method = GenerativeReplay(hidden=16, latent=2, seed=0)
    method.on_task_start(_ctx(stream, 0, model))
    before = [p.detach().clone() for p in method.vae.parameters()]
    x, y, t = stream.tasks[0].sample(32, seed=0)
    bx, by, bt = method.compose_batch(_ctx(stream, 0, model), x, y, t)
    assert torch.equal(bx, x) and torch.equal(by, y)  # no generator yet: nothing replaced
    assert all(not torch.equal(a, b) for a, b in zip(before, method.vae.parameters(), strict=True))


def test_later_batches_replace_the_ratio_with_frozen_pseudo_samples_labelled_by_the_old_classifier():
    stream = data.split_mnist(5, "class", n_train=100)
    model = models.MLP(784, (16,), 10)
    method = GenerativeReplay(hidden=16, latent=2, replay_ratio=0.25, seed=0)
    train.fit(model, stream.first(1), method, steps=3, batch_size=16, progress=False)
    assert not any(p.requires_grad for p in [*method.old_vae.parameters(), *method.old_model.parameters()])
    old_vae = [p.clone() for p in method.old_vae.parameters()]
    x, y, t = stream.tasks[1].sample(32, seed=0)
    gen_state = method._gen.get_state()
    bx, by, bt = method.compose_batch(_ctx(stream, 1, model), x, y, t)
    assert len(bx) == 32 and torch.equal(bx[:24], x[:24])  # 32 · (1 − 0.25) real samples, then 8 generated
    method._gen.set_state(gen_state)
    expected = method.old_vae.sample(8, method._gen)  # the same draw from the frozen generator
    assert torch.allclose(bx[24:], expected)
    with torch.no_grad():
        labels = method.old_model(expected)[:, :2].argmax(1)  # the old classifier, among classes 0/1 only
    assert torch.equal(by[24:], labels) and (bt[24:] == 1).all()
    assert all(torch.equal(a, b) for a, b in zip(old_vae, method.old_vae.parameters(), strict=True))
