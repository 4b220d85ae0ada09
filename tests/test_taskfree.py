"""ConsolidateEvery: the wrapped method sees one start and a consolidation every N steps, never the true task ends."""

import pytest
import torch

from cl_lab import data, models, train
from cl_lab.chapters import ch03
from cl_lab.methods.base import Method
from cl_lab.methods.regularization import SI
from cl_lab.methods.taskfree import ConsolidateEvery


class HookLog(Method):
    """Records (hook, global step) for every task start and end it is told about."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_task_start(self, ctx) -> None:
        self.calls.append(("start", ctx.step))

    def on_task_end(self, ctx) -> None:
        self.calls.append(("end", ctx.step))


@pytest.fixture(scope="module")
def stream():
    return data.split(data.load("digits"), n_tasks=2, scenario="domain", n_train=60)


def _fit(stream, method, steps: int = 5):
    torch.manual_seed(0)
    model = models.MLP(stream.input_dim, (8,), stream.n_out)
    run = train.fit(model, stream, method, steps=steps, progress=False)
    return model, run


def test_consolidations_follow_the_schedule_not_the_tasks(stream):
    log = HookLog()
    wrapper = ConsolidateEvery(log, every=4)
    _fit(stream, wrapper, steps=5)  # 10 steps over 2 tasks: consolidations after steps 4 and 8
    assert log.calls == [("start", 0), ("end", 3), ("start", 3), ("end", 7), ("start", 7)]
    assert wrapper.consolidations == 2
    assert wrapper.consolidation_seconds >= 0.0


def test_one_task_length_reproduces_consolidating_at_task_ends(stream):
    at_ends, _ = _fit(stream, SI(c=1.0))
    scheduled, _ = _fit(stream, ConsolidateEvery(SI(c=1.0), every=5))
    for a, b in zip(at_ends.parameters(), scheduled.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_shorter_schedule_changes_the_run(stream):
    at_ends, _ = _fit(stream, SI(c=10.0))
    often, _ = _fit(stream, ConsolidateEvery(SI(c=10.0), every=2))
    assert not all(torch.equal(a, b) for a, b in zip(at_ends.parameters(), often.parameters(), strict=True))


def test_describe_names_the_schedule_and_keeps_the_inner_settings():
    described = ConsolidateEvery(SI(c=2.0), every=7).describe()
    assert described["every"] == 7 and described["c"] == 2.0 and "every 7 steps" in described["method"]


@pytest.mark.parametrize("every", [0, -3, 2.5])
def test_every_must_be_a_positive_integer(every):
    with pytest.raises((ValueError, TypeError), match="every"):
        ConsolidateEvery(SI(), every=every)


def test_method_must_be_a_cl_lab_method():
    with pytest.raises(TypeError, match="method"):
        ConsolidateEvery("si", every=5)


def test_task_free_run_names_the_allowed_methods():
    with pytest.raises(ValueError, match="EWC online"):
        ch03.task_free_run("LwF", 10)
