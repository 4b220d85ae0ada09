"""Replay buffer policies, ER's batch composition and DER's stored logits: each test pins a behaviour that a
bug in the policy or the method would break."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cl_lab import data, models, train
from cl_lab.methods.replay import (
    DER,
    ER,
    POLICIES,
    ReplayBuffer,
    balanced_quotas,
    head_gradient_cosines,
    herding_order,
    replay_split,
)


def _items(n, d=3, classes=2, start=0):
    x = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, d)  # item id in every feature
    y = torch.arange(start, start + n) % classes
    return x, y, torch.zeros(n, dtype=torch.long)


def _ctx(model, batch_size=32, seed=0):
    """The few Context fields ER and DER read, with ``forward`` recording the size of every input it sees."""
    sizes = []

    def forward(x, t):
        sizes.append(len(x))
        return model(x)

    return SimpleNamespace(model=model, generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
                           forward=forward, sizes=sizes)


# ---- reservoir --------------------------------------------------------------------------------------------
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


def test_a_fixed_keep_probability_is_recency_biased_and_fails_the_same_test():
    """The null control for the test above: the χ² test must be able to fail."""
    n, m, trials = 60, 12, 800
    counts = np.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        memory = list(range(m))
        for item in range(m, n):
            if torch.rand(1, generator=gen).item() < 0.5:  # keep each new item with a fixed probability
                memory[int(torch.randint(m, (1,), generator=gen))] = item
        counts[memory] += 1
    assert stats.chisquare(counts, np.full(n, m * trials / n)).pvalue < 1e-6
    assert counts[-10:].mean() > 3 * counts[:10].mean()


def test_a_zero_size_buffer_counts_what_it_sees_and_keeps_nothing():
    buf = ReplayBuffer(0, "reservoir")
    buf.add(*_items(20))
    assert len(buf) == 0 and buf.seen == 20


# ---- class-balanced reservoir -----------------------------------------------------------------------------
def test_class_balanced_buffer_splits_memory_evenly_over_classes():
    buf = ReplayBuffer(30, "class_balanced")
    x, y, _ = _items(300, classes=1)
    buf.add(x, y, torch.zeros(300, dtype=torch.long))  # 300 of class 0 fill the buffer
    assert buf.class_counts() == {0: 30}
    buf.add(x[:200], torch.full((200,), 1), torch.ones(200, dtype=torch.long))
    buf.add(x[:200], torch.full((200,), 2), torch.full((200,), 2))
    assert buf.class_counts() == {0: 10, 1: 10, 2: 10}


def test_class_balanced_survives_an_imbalanced_stream_where_reservoir_follows_it():
    x, _, t = _items(1000)
    y = (torch.arange(1000) >= 900).long()  # 900 of class 0, then 100 of class 1
    balanced, uniform = ReplayBuffer(100, "class_balanced", seed=0), ReplayBuffer(100, "reservoir", seed=0)
    for buf in (balanced, uniform):
        buf.add(x, y, t)
    assert balanced.class_counts() == {0: 50, 1: 50}
    assert uniform.class_counts().get(1, 0) <= 20  # reservoir keeps the stream's 10 % share (about 10)
    kept = balanced.x[balanced.y == 0, 0]  # inside class 0 it is still a reservoir: spread over all 900
    assert 300 < kept.mean().item() < 600 and kept.max().item() > 800


# ---- herding ----------------------------------------------------------------------------------------------
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
    phi = F.normalize(feats, dim=1)
    herd = (phi.mean(0) - phi[herding_order(feats, 5)].mean(0)).norm()
    random = [(phi.mean(0) - phi[torch.randperm(200, generator=gen)[:5]].mean(0)).norm() for _ in range(200)]
    assert herd < np.quantile(random, 0.05)


def test_herding_buffer_starts_each_class_with_the_exemplar_closest_to_its_feature_mean():
    torch.manual_seed(0)
    model = models.MLP(3, (4,), 2)
    x = torch.randn(40, 3)
    y, t = torch.arange(40) % 2, torch.zeros(40, dtype=torch.long)
    buf = ReplayBuffer(6, "herding")
    buf.end_task(x, y, t, model=model)
    assert buf.class_counts() == {0: 3, 1: 3}
    for c in (0, 1):
        phi = F.normalize(model.features(x[y == c]), dim=1).detach()  # the model's penultimate features
        closest = x[y == c][(phi - phi.mean(0)).norm(dim=1).argmin()]
        assert torch.equal(buf.exemplars[c][0][0], closest)
    first = buf.exemplars[0][0].clone()
    buf.end_task(x + 100, y + 2, t + 1, model=model)  # two new classes: every class shrinks to 6 // 4
    assert sum(buf.class_counts().values()) == 6 and buf.class_counts()[0] == 2
    assert torch.equal(buf.exemplars[0][0], first[: len(buf.exemplars[0][0])])  # the head of the old list


# ---- GSS --------------------------------------------------------------------------------------------------
def test_head_gradient_cosines_match_autograd_per_sample_gradients():
    torch.manual_seed(0)
    model = models.MLP(5, (6,), 3)
    x, y = torch.randn(7, 5), torch.randint(3, (7,))

    def head_grad(i):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        return torch.cat([model.head.weight.grad.reshape(-1), model.head.bias.grad])

    grads = torch.stack([head_grad(i) for i in range(7)])  # [7, P]
    expected = F.normalize(grads, dim=1) @ F.normalize(grads, dim=1).T
    with torch.no_grad():
        h = model.features(x)
        p = model.head(h).softmax(1)
        cos = head_gradient_cosines(h[:3], p[:3], y[:3], h, p, y)
    assert torch.allclose(cos, expected[:3], atol=1e-5)


def test_gss_refuses_gradients_it_already_holds_and_admits_opposite_ones():
    torch.manual_seed(0)
    model = models.MLP(3, (8,), 2)
    buf = ReplayBuffer(10, "gss", seed=0)
    x = torch.randn(200, 3)
    zeros, t = torch.zeros(200, dtype=torch.long), torch.zeros(200, dtype=torch.long)
    buf.add(x[:10], zeros[:10], t[:10], model=model)  # full, all of class 0
    held = buf.x.clone()
    for s in range(10, 100, 10):  # more class-0 samples: same sign of head gradient (ReLU features ≥ 0)
        buf.add(x[s:s + 10], zeros[s:s + 10], t[s:s + 10], model=model)
    assert torch.equal(buf.x, held)
    for s in range(100, 200, 10):  # the other class: a = softmax − onehot flips sign, cosine < 0
        buf.add(x[s:s + 10], zeros[s:s + 10] + 1, t[s:s + 10], model=model)
    assert 0 < buf.class_counts().get(1, 0) < 10 and len(buf) == 10
    assert ((buf.scores >= 0) & (buf.scores <= 2)).all()


# ---- ER ---------------------------------------------------------------------------------------------------
def test_balanced_quotas_sum_to_size():
    assert balanced_quotas([3, 1, 2], 8) == {1: 3, 2: 3, 3: 2}


def test_replay_split_old_share_is_the_ratio():
    assert replay_split(128, 0.25, 1000) == (96, 32)
    assert replay_split(128, 0.5, 10) == (118, 10)
    assert replay_split(128, 1.0, 1000) == (0, 128)


def test_er_batch_is_new_head_then_old_draw_at_the_ratio_drawn_before_the_new_samples_are_stored():
    model = models.MLP(3, (4,), 4)
    method = ER(100, replay_ratio=0.25, seed=0)
    old_x, old_y, old_t = _items(20, start=1000)
    method.buffer.add(old_x, old_y + 2, old_t + 1)  # 20 old items of classes 2/3, task 1
    x, y, t = _items(32)  # the incoming shuffled batch of classes 0/1
    bx, by, bt = method.compose_batch(_ctx(model), x, y, t)
    assert len(bx) == 32
    assert torch.equal(bx[:24], x[:24]) and torch.equal(by[:24], y[:24])  # B·(1 − r) new samples
    assert set(by[24:].tolist()) <= {2, 3} and (bt[24:] == 1).all()  # B·r old ones, none of this batch
    assert set(bx[24:, 0].tolist()) <= set(old_x[:, 0].tolist())
    assert len(method.buffer) == 44  # the 24 trained-on new samples were offered; the 8 left out were not
    assert not set(method.buffer.x[:, 0].tolist()) & set(x[24:, 0].tolist())


def test_er_uses_fewer_old_samples_while_the_buffer_is_small_and_none_at_first():
    model = models.MLP(3, (4,), 2)
    method = ER(100, replay_ratio=0.5)
    x, y, t = _items(64)
    first = method.compose_batch(_ctx(model), x, y, t)
    assert torch.equal(first[0], x)  # empty buffer: the whole batch is new, its size kept
    small = ER(100, replay_ratio=0.5)
    small.buffer.add(*_items(3, start=500))
    assert len(small.compose_batch(_ctx(model), x, y, t)[0]) == 61 + 3


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


@pytest.fixture(scope="module")
def digits_class_il():
    return data.split(data.load("digits", verbose=False), 5, "class")


def _class_il_aa(stream, method, seed=0):
    torch.manual_seed(seed)
    return train.fit(models.MLP(64, (64,), 10), stream, method, steps=100, batch_size=32, seed=seed,
                     device="cpu", progress=False).aa


def test_naive_class_il_keeps_only_the_last_task(digits_class_il):
    assert _class_il_aa(digits_class_il, None) < 0.3


@pytest.mark.parametrize("policy", POLICIES)
def test_er_with_every_policy_remembers_old_classes_in_class_il(digits_class_il, policy):
    method = ER(100, policy=policy)
    assert _class_il_aa(digits_class_il, method) > 0.5  # naive: about 1/5, below 0.3
    counts = method.buffer.class_counts()
    assert len(method.buffer) == 100 and set(counts) == set(range(10))
    if policy in ("class_balanced", "herding"):
        assert set(counts.values()) == {10}


# ---- DER --------------------------------------------------------------------------------------------------
def test_der_stores_the_logits_of_the_model_at_insertion_time():
    stream = data.split_mnist(5, "class", n_train=100)
    model = models.MLP(784, (16,), 10)
    before = copy.deepcopy(model)
    method = DER(buffer_size=64, alpha=0.5)
    train.fit(model, stream.first(1), method, steps=1, batch_size=32, lr=0.1, progress=False)
    x, _, _, z = method.buffer.sample(32, with_logits=True)
    with torch.no_grad():
        assert torch.allclose(z, before(x), atol=1e-6)
        assert not torch.allclose(z, model(x), atol=1e-3)  # the model moved after insertion


def test_der_loss_is_alpha_times_the_mse_to_the_stored_logits():
    torch.manual_seed(0)
    model = models.MLP(3, (4,), 2)
    x, y, t = _items(8)
    with torch.no_grad():
        z = model(x)
    method = DER(8, alpha=0.5, seed=0)
    method.buffer.add(x, y, t, logits=z + 1.0)  # stored logits one above what the model gives now
    ctx = _ctx(model, batch_size=8)
    loss = method.extra_loss(ctx, x, y, t, model(x))
    assert loss.item() == pytest.approx(0.5 * 1.0, rel=1e-5)  # α · mean((f(x) − z)²) = 0.5 · 1
    loss.backward()  # and its gradient pulls f(x) towards z: one small step lowers the distance
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
        assert F.mse_loss(model(x), z + 1.0) < 1.0


def test_der_plus_plus_adds_beta_times_the_cross_entropy_on_a_second_draw():
    torch.manual_seed(0)
    model = models.MLP(3, (4,), 2)
    x, y, t = _items(8)
    with torch.no_grad():
        z = model(x)
    method = DER(8, alpha=0.0, beta=2.0, seed=0)
    method.buffer.add(x, y, t, logits=z)
    ctx = _ctx(model, batch_size=8)
    loss = method.extra_loss(ctx, x, y, t, model(x))
    assert loss.item() == pytest.approx(2.0 * F.cross_entropy(z, y).item(), rel=1e-5)  # the whole buffer drawn
    assert ctx.sizes == [8, 8]  # two draws of a batch each


def test_der_replay_batch_sets_the_size_of_each_draw():
    model = models.MLP(3, (4,), 2)
    method = DER(50, alpha=0.5, beta=0.5, replay_batch=5)
    x, y, t = _items(50)
    method.buffer.add(x, y, t, logits=torch.zeros(50, 2))
    ctx = _ctx(model, batch_size=32)
    method.extra_loss(ctx, x[:32], y[:32], t[:32], model(x[:32]))
    assert ctx.sizes == [5, 5]  # DER++ with replay_batch 5: 5 for the logits, 5 for the labels
    default = DER(50, alpha=0.5)
    default.buffer.add(x, y, t, logits=torch.zeros(50, 2))
    ctx = _ctx(model, batch_size=32)
    default.extra_loss(ctx, x[:32], y[:32], t[:32], model(x[:32]))
    assert ctx.sizes == [32]  # DER: one draw of the batch size


def test_der_plus_plus_name_and_validation():
    assert DER(10, beta=0.5).name == "DER++" and DER(10).name == "DER"
    with pytest.raises(ValueError, match="alpha"):
        DER(10, alpha=-1)
    with pytest.raises(ValueError, match="policy"):
        DER(10, policy="herding")
    with pytest.raises(ValueError, match="replay_batch"):
        DER(10, replay_batch=0)


# ---- chapter 04 helpers -----------------------------------------------------------------------------------
def test_chapter04_playground_widget_headless(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets
    from cl_lab.chapters import ch04

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    widget = widgets.sweep(ch04.playground, ch04.plot_playground, fixed={"seed": 0, "steps": 3},
                           policy=w.Dropdown(options=list(POLICIES), value="herding"),
                           buffer_size=w.SelectionSlider(options=[10, 50], value=10))
    first = widget.result
    widget.children[1].value = 50
    assert widget.result["buffer_size"] == 50 and widget.result["class_counts"] == {c: 5 for c in range(10)}
    assert widget.figures[-1].axes[0].get_title().startswith("herding, M = 50")
    widget.children[1].value = 10  # back to a visited point: served from the cache
    assert widget.result is first and widget.cache.hits >= 1


def test_coin_flip_share_is_r_over_one_plus_r():
    from cl_lab.chapters import ch04

    shares = [ch04.coin_flip_replay_share(2000, 0.3, s) for s in range(20)]
    assert abs(np.mean(shares) - 0.3 / 1.3) < 0.01
    with pytest.raises(ValueError, match="replay_ratio"):
        ch04.coin_flip_replay_share(10, 1.5, 0)


def test_reservoir_inclusion_table_has_each_item_near_m_over_t():
    from cl_lab.chapters import ch04

    table = ch04.reservoir_inclusion(100, 10, 300, checkpoints=[20, 100])
    for t, part in table.groupby("t"):
        assert len(part) == t and part.frequency.sum() == pytest.approx(10.0)  # M items held at every moment
        assert abs(part.frequency.mean() - 10 / t) < 1e-9 and part.frequency.max() < 10 / t + 0.12


def test_der_setups_spend_equal_samples_per_step_and_the_count_is_measured():
    from cl_lab.chapters import ch04

    setups = ch04.der_setups(50, new=16)
    table = ch04.compare_methods(setups, (0,), steps=4, hidden=(8,)).set_index("method")["samples per step"]
    assert table["ER (16 + 16 replayed)"] == 32  # batch 32 at ratio 0.5: 16 new + 16 old from the first step on
    for name in ("DER (16 + 16 logits)", "DER++ (16 + 8 logits + 8 labels)"):
        assert table[name] == pytest.approx((20 * 32 - 16) / 20)  # 16 + 16, but no draw at the very first step
    assert table["DER++ as published (16 + 16 + 16)"] == pytest.approx((20 * 48 - 32) / 20)
    assert table["ER (16 + 32 replayed)"] == 48


def test_replay_step_cost_counts_the_samples_each_step_really_uses():
    from cl_lab.chapters import ch04

    cost = ch04.replay_step_cost((0.0, 0.75), buffer_size=50, batch_size=32, repeats=2)
    assert cost["samples through the network"].tolist() == [32, 32]  # the batch keeps its size
    assert cost["new samples per step"].tolist() == [32, 8]
    assert (cost["best ms per step"] > 0).all()
