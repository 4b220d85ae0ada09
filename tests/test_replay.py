"""Replay buffer policies, ER's batch composition and DER's stored logits."""

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from cl_lab import data, models, train
from cl_lab.methods.replay import DER, ER, POLICIES, ReplayBuffer, balanced_quotas, herding_order, replay_split


def _items(n, d=3, classes=2):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)  # item id in every feature
    y = torch.arange(n) % classes
    return x, y, torch.zeros(n, dtype=torch.long)


def test_reservoir_keeps_every_item_with_probability_m_over_t():
    n, m, trials = 60, 12, 800
    counts = np.zeros(n)
    for seed in range(trials):
        buf = ReplayBuffer(m, "reservoir", seed=seed)
        x, y, t = _items(n)
        for start in range(0, n, 7):  # uneven batches: the stream position must carry across calls
            buf.add(x[start:start + 7], y[start:start + 7], t[start:start + 7])
        assert len(buf) == m and buf.seen == n
        counts[buf.x[:, 0].long().numpy()] += 1
    assert counts.sum() == m * trials
    expected = np.full(n, m * trials / n)
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    assert np.abs(counts / trials - m / n).max() < 0.08


def test_class_balanced_buffer_splits_memory_evenly_over_classes():
    buf = ReplayBuffer(30, "class_balanced")
    x, y, _ = _items(300, classes=1)
    buf.add(x, y, torch.zeros(300, dtype=torch.long))  # 300 of class 0 fill the buffer
    assert buf.class_counts() == {0: 30}
    buf.add(x[:200], torch.full((200,), 1), torch.ones(200, dtype=torch.long))
    buf.add(x[:200], torch.full((200,), 2), torch.full((200,), 2))
    assert buf.class_counts() == {0: 10, 1: 10, 2: 10}


def test_herding_picks_the_mean_matching_set_by_hand():
    # features normalised inside herding; these are unit vectors at known angles
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0, 10.0]) * torch.pi / 180
    phi = torch.stack([angles.cos(), angles.sin()], 1)  # [5, 2]
    mu = phi.mean(0)  # ≈ (0.197, 0.035)
    # step 1: the point nearest μ is the 10° one; step 2: the point nearest 2μ − φ(10°) is the 180° one
    order = herding_order(phi, 2).tolist()
    assert order == [4, 2]
    assert torch.allclose(phi[herding_order(phi, 5)].mean(0), mu, atol=1e-6)  # all picked: the mean itself


def test_herding_mean_beats_random_subsets():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=gen) + 2
    phi = torch.nn.functional.normalize(feats, dim=1)
    herd = (phi.mean(0) - phi[herding_order(feats, 5)].mean(0)).norm()
    random = [(phi.mean(0) - phi[torch.randperm(200, generator=gen)[:5]].mean(0)).norm() for _ in range(200)]
    assert herd < np.quantile(random, 0.05)


def test_herding_buffer_keeps_head_of_each_class_list():
    model = models.MLP(3, (4,), 2)
    buf = ReplayBuffer(6, "herding")
    x, y, t = _items(40)
    buf.end_task(x, y, t, model=model)
    assert buf.class_counts() == {0: 3, 1: 3}
    first = buf.exemplars[0][0].clone()
    buf.end_task(x + 100, y + 2, t + 1, model=model)
    assert sum(buf.class_counts().values()) == 6
    assert torch.equal(buf.exemplars[0][0], first[: len(buf.exemplars[0][0])])


def test_gss_fills_and_stays_at_size():
    model = models.MLP(3, (4,), 2)
    buf = ReplayBuffer(10, "gss")
    x, y, t = _items(50)
    for s in range(0, 50, 10):
        buf.add(x[s:s + 10], y[s:s + 10], t[s:s + 10], model=model)
    assert len(buf) == 10 and buf.scores.shape == (10,)
    assert ((buf.scores >= 0) & (buf.scores <= 2)).all()


def test_balanced_quotas_sum_to_size():
    assert balanced_quotas([3, 1, 2], 8) == {1: 3, 2: 3, 3: 2}


def test_replay_split_old_share_is_the_ratio():
    assert replay_split(128, 0.25, 1000) == (96, 32)
    assert replay_split(128, 0.5, 10) == (118, 10)
    assert replay_split(128, 1.0, 1000) == (0, 128)


@pytest.mark.parametrize("kwargs, match", [
    ({"buffer_size": -1}, "buffer_size"),
    ({"buffer_size": 10, "replay_ratio": 1.5}, "replay_ratio"),
    ({"buffer_size": 10, "replay_ratio": -0.1}, "replay_ratio"),
    ({"buffer_size": 10, "policy": "fifo"}, "reservoir"),
])
def test_er_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ER(**kwargs)


def test_bad_buffer_input_is_a_clear_error():
    with pytest.raises(ValueError, match="size"):
        ReplayBuffer(-3)
    with pytest.raises(ValueError, match="policy must be one of 'reservoir', 'class_balanced', 'herding', 'gss'"):
        ReplayBuffer(3, "kmeans")
    buf = ReplayBuffer(5)
    buf.add(*_items(3))
    with pytest.raises(ValueError, match="n must be ≤ the 3 items"):
        buf.sample(4)
    with pytest.raises(ValueError, match="end_task"):
        ReplayBuffer(5, "herding").add(*_items(3))
    assert set(POLICIES) == {"reservoir", "class_balanced", "herding", "gss"}


def test_er_batch_keeps_its_size_and_ratio_after_the_buffer_fills():
    stream = data.split_mnist(5, "task", n_train=200)
    method = ER(100, replay_ratio=0.25)
    train.fit(models.MLP(784, (16,), 10), stream, method, steps=5, batch_size=32)
    assert len(method.buffer) == 100
    assert set(method.buffer.t.tolist()) <= set(range(5))  # Task-IL task ids are stored with the samples


@pytest.mark.parametrize("policy", POLICIES)
def test_er_runs_with_every_policy(policy):
    stream = data.split_mnist(5, "class", n_train=100)
    method = ER(50, policy=policy)
    run = train.fit(models.MLP(784, (16,), 10), stream, method, steps=3, batch_size=32)
    assert run.R.shape == (5, 5) and len(method.buffer) == 50


def test_der_stores_the_logits_of_the_model_at_insertion_time():
    stream = data.split_mnist(5, "class", n_train=100)
    model = models.MLP(784, (16,), 10)
    before = copy.deepcopy(model)
    method = DER(buffer_size=64, alpha=0.5)
    one_task = type(stream)(stream.name, stream.scenario, stream.tasks[:1], stream.n_out, stream.input_shape)
    train.fit(model, one_task, method, steps=1, batch_size=32, lr=0.1)
    x, _, _, z = method.buffer.sample(32, with_logits=True)
    with torch.no_grad():
        assert torch.allclose(z, before(x), atol=1e-6)
        assert not torch.allclose(z, model(x), atol=1e-3)  # the model moved after insertion


def test_der_plus_plus_name_and_validation():
    assert DER(10, beta=0.5).name == "DER++" and DER(10).name == "DER"
    with pytest.raises(ValueError, match="alpha"):
        DER(10, alpha=-1)
    with pytest.raises(ValueError, match="policy"):
        DER(10, policy="herding")


def test_chapter04_playground_widget_headless(monkeypatch):
    import matplotlib.pyplot as plt

    from cl_lab import widgets
    from cl_lab.chapters import ch04

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    import ipywidgets as w

    widget = widgets.sweep(ch04.playground, ch04.plot_playground, fixed={"seed": 0, "steps": 3},
                           policy=w.Dropdown(options=list(POLICIES), value="herding"),
                           buffer_size=w.SelectionSlider(options=[10, 50], value=10))
    widget.children[1].value = 50
    assert widget.result["buffer_size"] == 50 and sum(widget.result["class_counts"].values()) == 50
    assert len(widget.figures) >= 1
    widget.children[1].value = 10  # back to a visited point: served from the cache
    assert widget.cache.hits >= 1


def test_coin_flip_share_is_r_over_one_plus_r():
    from cl_lab.chapters import ch04

    shares = [ch04.coin_flip_replay_share(2000, 0.3, s) for s in range(20)]
    assert abs(np.mean(shares) - 0.3 / 1.3) < 0.01
    with pytest.raises(ValueError, match="replay_ratio"):
        ch04.coin_flip_replay_share(10, 1.5, 0)
