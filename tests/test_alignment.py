"""Chapter 12: the DPO loss, the KL penalty and its Fisher quadratic, the per-stage adapter, argument checks."""

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lab.chapters import ch12
from cl_lab.methods.alignment import (
    StageAdapters,
    check_stage,
    dpo_loss,
    dpo_loss_from_logits,
    fisher_quadratic,
    full_fisher,
    kl_along,
    kl_to_reference,
    reinforce_loss,
    rl_loss,
)

matplotlib.use("Agg")


def _tiny(seed=0, n_out=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out))


def test_dpo_loss_by_hand():
    # margin = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1; β = 0.5: loss = −log σ(0.5) = log(1 + e^−0.5)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_dpo_is_log_sigmoid_of_the_implicit_reward_margin():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(6, 5), torch.randn(6, 5)
    chosen, rejected, beta = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 2]), 0.3
    logp, ref_logp = F.log_softmax(logits, 1), F.log_softmax(ref_logits, 1)
    reward = beta * (logp - ref_logp)  # r(x, y) = β log π_θ(y|x)/π_ref(y|x)  [B, C]
    margin = reward.gather(1, chosen[:, None]) - reward.gather(1, rejected[:, None])
    expected = -F.logsigmoid(margin).mean()
    assert dpo_loss_from_logits(logits, ref_logits, chosen, rejected, beta).item() == pytest.approx(expected.item())
    # at the reference the loss is log 2 whatever the pair
    assert dpo_loss_from_logits(ref_logits, ref_logits, chosen, rejected, beta).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("direction", ["policy||ref", "ref||policy"])
def test_kl_penalty_is_zero_with_zero_gradient_at_the_reference(direction):
    torch.manual_seed(1)
    ref_logits = torch.randn(8, 5)
    logits = ref_logits.clone().requires_grad_(True)
    kl = kl_to_reference(logits, ref_logits, direction)
    (grad,) = torch.autograd.grad(kl, logits)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    assert grad.abs().max().item() < 1e-7
    assert kl_to_reference(ref_logits + torch.randn(8, 5), ref_logits, direction).item() > 0


def test_rl_loss_at_the_reference_is_plain_reinforce_and_pushes_rewarded_actions_up():
    torch.manual_seed(2)
    logits = torch.randn(4, 3, requires_grad=True)
    actions, rewards = torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = rl_loss(logits, logits.detach(), actions, rewards, beta=5.0)
    assert loss.item() == pytest.approx(reinforce_loss(logits, actions, rewards).item())
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0] < 0 and grad[1, 1] > 0  # descent raises rewarded, lowers unrewarded log-probs


def test_fisher_quadratic_equals_the_explicit_full_fisher():
    model, x = _tiny(), torch.randn(7, 3)
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    flat = torch.cat([d.reshape(-1) for d in delta.values()])
    explicit = 0.5 * flat @ full_fisher(model, x) @ flat
    assert fisher_quadratic(model, delta, x) == pytest.approx(explicit.item(), rel=1e-4)


def test_quadratic_error_shrinks_as_the_step_shrinks():
    model, x = _tiny(3).double(), torch.randn(20, 3, dtype=torch.float64)  # float32 KLs of tiny steps are noise
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    errors = []
    for t in (0.3, 0.03, 0.003):
        kl, quad = kl_along(model, delta, x, t), fisher_quadratic(model, delta, x, t)
        errors.append(abs(kl - quad) / quad)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.002
    # both KL directions agree with the same quadratic to second order
    assert kl_along(model, delta, x, 0.01, "policy||ref") == pytest.approx(fisher_quadratic(model, delta, x, 0.01),
                                                                         rel=0.02)


def test_stage_adapters_leave_the_backbone_bit_identical_and_start_at_zero():
    backbone = _tiny(4, n_out=3)
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    plain = backbone(x).detach()
    model = StageAdapters(backbone, rank=2)
    before = model.backbone_state()
    assert torch.equal(model.use(["sft", "dpo", "rl"])(x), plain)  # B = 0: adapters add nothing yet
    for stage in ("sft", "rl"):
        params = model.train_stage(stage)
        opt = torch.optim.Adam(params, lr=0.1)  # a large step, so anything that leaks would show
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = model.backbone_state()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(model.use([])(x), plain)
    assert not torch.equal(model.use(["sft"])(x), plain)
    assert torch.equal(model.use(["dpo"])(x), plain)  # never trained
    assert all(p.requires_grad == (".rl" in n or n.endswith(".rl")) for n, p in model.named_parameters()
               if ".A." in n or ".B." in n)


def test_argument_validation():
    with pytest.raises(ValueError, match="beta"):
        rl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2), beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.0)
    with pytest.raises(ValueError, match="stage"):
        check_stage("ppo")
    with pytest.raises(ValueError, match="stage"):
        StageAdapters(_tiny(), stages=("sft", "rlhf"))
    with pytest.raises(ValueError, match="stages"):
        StageAdapters(_tiny()).use(["sft", "grpo"])
    with pytest.raises(ValueError, match="direction"):
        kl_to_reference(torch.zeros(1, 2), torch.zeros(1, 2), "forward")
    model = _tiny()
    for kwargs, name in (({"beta": -1.0}, "beta"), ({"replay": 1.5}, "replay"), ({"replay": -0.1}, "replay"),
                         ({"kl_inputs": "everything"}, "kl_inputs")):
        with pytest.raises(ValueError, match=name):
            ch12.train_stage(model, "sft", model, steps=1, **kwargs)
    with pytest.raises(ValueError, match="stage"):
        ch12.train_stage(model, "rlhf", model, steps=1)
    with pytest.raises(ValueError, match="anchor"):
        ch12.run_chain(anchor="moving")
    with pytest.raises(ValueError, match="replay"):
        ch12.tax_point(replay=2.0)
    with pytest.raises(ValueError, match="beta"):
        ch12.tax_point(beta=-1.0)


def test_stage_inputs_are_what_the_chapter_says():
    d = ch12.chain_data()
    assert torch.equal(d.sft_x, 1 - d.x_train) and torch.equal(d.sft_y, (d.y_train + 1) % 10)
    assert torch.equal(ch12.rotate90(ch12.rotate90(ch12.rotate90(ch12.rotate90(d.x_test[:5])))), d.x_test[:5])
    assert torch.equal(d.dpo_x.sort(1).values, d.x_train.sort(1).values)  # same ink, shuffled


def test_tax_widget_point_and_headless_slider(monkeypatch):
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from cl_lab import widgets

    fixed = {"steps": 3, "pretrain_steps": 5, "hidden": (8,)}
    result = ch12.tax_point(0.5, 0.25, **fixed)
    assert list(result["R"].index) == ["pretrained", "sft", "dpo", "rl"]
    assert result["tax"] == pytest.approx(result["R"]["general"].iloc[0] - result["R"]["general"].iloc[-1])
    assert ch12.plot_tax_point(result) is not None
    monkeypatch.setattr(plt, "show", lambda: None)
    widget = widgets.sweep(ch12.tax_point, ch12.plot_tax_point, fixed=fixed,
                           beta=w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.5),
                           replay=w.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.25))
    widget.children[0].value = 0.5
    assert widget.result["beta"] == pytest.approx(0.5)
    widget.children[0].value = 0.0
    assert widget.cache.hits == 1
