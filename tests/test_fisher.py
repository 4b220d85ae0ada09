"""Fisher estimates: exact against a per-sample loop, the sampled estimate unbiased, errors named."""

import pytest
import torch
from torch import nn

from cl_lab import fisher
from cl_lab.models import MLP, SmallCNN


def _setup(seed=0, n=24, classes=4):
    torch.manual_seed(seed)
    model = MLP(12, (8, 6), classes)
    x, y = torch.randn(n, 12), torch.randint(0, classes, (n,))
    return model, x, y


def _close(a, b, rtol=1e-5):
    fa, fb = fisher.flatten(a), fisher.flatten(b)
    assert ((fa - fb).abs().max() / fb.abs().max()).item() < rtol


@pytest.mark.parametrize("estimate", ["exact", "sampled", "empirical", "predicted"])
def test_batched_equals_per_sample_loop(estimate):
    model, x, y = _setup()
    kw = dict(estimate=estimate)
    batched = fisher.fisher_diagonal(model, x, y, generator=torch.Generator().manual_seed(3), chunk_size=10, **kw)
    loop = fisher.fisher_diagonal_loop(model, x, y, generator=torch.Generator().manual_seed(3), **kw)
    _close(batched, loop)


def test_cnn_and_task_masking_exact():
    torch.manual_seed(1)
    model = SmallCNN((1, 8, 8), n_out=4, channels=(3, 4))
    x, t = torch.randn(10, 64), torch.randint(0, 2, (10,))
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)

    def forward(xb, tb):
        return model(xb).masked_fill(~masks[tb], -1e9)

    _close(fisher.fisher_diagonal(model, x, t=t, forward=forward),
           fisher.fisher_diagonal_loop(model, x, t=t, forward=forward))


def test_exact_is_the_expectation_of_sampled():
    model, x, y = _setup(n=8, classes=3)
    exact = fisher.flatten(fisher.fisher_diagonal(model, x, estimate="exact"))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([fisher.flatten(fisher.fisher_diagonal(model, x, estimate="sampled", generator=gen))
                         for _ in range(400)])
    mean, sem = draws.mean(0), draws.std(0) / 20
    assert ((mean - exact).abs() <= 5 * sem + 1e-7).all()


def test_batch_squared_with_batch_one_is_empirical_and_shrinks_with_batch():
    model, x, y = _setup(n=64)
    _close(fisher.fisher_diagonal(model, x, y, estimate="batch_squared", batch_size=1),
           fisher.fisher_diagonal(model, x, y, estimate="empirical"))
    big = fisher.flatten(fisher.fisher_diagonal(model, x, y, estimate="batch_squared", batch_size=32)).sum()
    assert big < fisher.flatten(fisher.fisher_diagonal(model, x, y, estimate="empirical")).sum()


def test_bad_inputs_name_the_argument():
    model, x, y = _setup()
    with pytest.raises(ValueError, match="estimate.*'exact'.*'batch_squared'.*got 'true'"):
        fisher.fisher_diagonal(model, x, y, estimate="true")
    with pytest.raises(ValueError, match="y must be given"):
        fisher.fisher_diagonal(model, x, estimate="empirical")
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters"):
        fisher.fisher_diagonal(frozen, torch.randn(4, 3))
    with pytest.raises(TypeError, match="LayerNorm"):
        fisher.fisher_diagonal(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), torch.randn(4, 3))
