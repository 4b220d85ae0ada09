"""The cost model (cl_lab.cost) and the EMA of weights (cl_lab.methods.ema)."""

import math

import pytest
import torch
from torch import nn

from cl_lab import cost, data, models, train
from cl_lab.methods.ema import EMA

SECONDS = {"pretrain_step": 0.1, "update_step": 0.02, "adapter_step": 0.01, "evaluation": 1.0,
           "adapter_overhead": 0.001}


def test_monthly_costs_follow_the_formulas():
    m = cost.monthly_costs(SECONDS, months=3, pretrain_steps=1000, update_steps=100, growth=0.1, requests=1000)
    assert list(m.index) == [1, 2, 3] and list(m.columns) == list(cost.STRATEGIES)
    assert m.scratch.tolist() == pytest.approx([1000 * 1.1 * 0.1 + 1, 1000 * 1.2 * 0.1 + 1, 1000 * 1.3 * 0.1 + 1])
    assert m.incremental.tolist() == pytest.approx([100 * 0.02 + 1] * 3)
    assert m.adapters.tolist() == pytest.approx([100 * 0.01 + 1 + 1000 * k * 0.001 for k in (1, 2, 3)])
    assert cost.cumulative(m).iloc[-1].tolist() == pytest.approx(m.sum().tolist())


def test_crossover_is_the_first_month_a_costs_more():
    total = cost.cumulative(cost.monthly_costs(SECONDS, pretrain_steps=10, update_steps=100, growth=0.0,
                                               requests=500))
    # a month: scratch 2, incremental 3, adapters 2 + 0.5·m; cumulative adapters 2.5, 5.5, 9, 13 against
    # incremental 3, 6, 9, 12: equal in month 3, above from month 4
    assert cost.crossover(total, "adapters", "incremental") == 4
    assert cost.crossover(total, "adapters", "scratch") == 1
    assert math.isnan(cost.crossover(total, "scratch", "incremental"))
    with pytest.raises(ValueError, match="nope"):
        cost.crossover(total, "nope", "scratch")


def test_break_even_requests_makes_the_year_cost_equal():
    q = cost.break_even_requests(SECONDS, "scratch", months=12, pretrain_steps=1000, update_steps=150, growth=0.03)
    total = cost.monthly_costs(SECONDS, months=12, pretrain_steps=1000, update_steps=150, growth=0.03,
                               requests=q).sum()
    assert total.adapters == pytest.approx(total.scratch)
    assert cost.break_even_requests({**SECONDS, "adapter_step": 0.02}, "incremental") == 0.0  # nothing saved


def test_monthly_costs_name_a_missing_input():
    with pytest.raises(ValueError, match="adapter_overhead"):
        cost.monthly_costs({k: v for k, v in SECONDS.items() if k != "adapter_overhead"})


# --- EMA --------------------------------------------------------------------------------------------------------

def test_ema_average_follows_the_recursion():
    model = nn.Linear(2, 1)
    ema = EMA(beta=0.9)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.model = model
    ema.on_task_start(ctx)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step(ctx)
    assert torch.allclose(ema.average.weight, 0.9 * start + 0.1 * (start + 1.0))
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step(ctx)
    expected = 0.9 * (0.9 * start + 0.1 * (start + 1)) + 0.1 * (start + 2)
    assert torch.allclose(ema.average.weight, expected)
    assert not ema.average.weight.requires_grad


def test_ema_predicts_with_the_average_and_beta_zero_is_naive():
    stream = data.split("digits", 2, "domain", seed=0)
    runs = {}
    for name, method in (("naive", None), ("beta0", EMA(0.0)), ("ema", EMA(0.99))):
        torch.manual_seed(0)
        runs[name] = train.fit(models.MLP(64, (32,), stream.n_out), stream, method, steps=40, lr=1e-2,
                               batch_size=32, seed=0, device="cpu")
    assert (runs["beta0"].R == runs["naive"].R).all()  # β = 0: the average is the current weights
    assert not (runs["ema"].R == runs["naive"].R).all()
    with pytest.raises(ValueError, match="beta"):
        EMA(1.0)
