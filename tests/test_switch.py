"""Switch-time remedies: the warm-up schedule restarts at every task but the first; head-first freezes the body."""

import pytest
import torch

from cl_lab import data, models, train
from cl_lab.methods.base import Method
from cl_lab.methods.switch import HeadFirst, SwitchWarmup


class LrRecorder(Method):
    """Records the learning rate each step is taken with (runs after the warm-up's before_step)."""

    def __init__(self) -> None:
        self.lrs: list[tuple[int, int, float]] = []

    def before_step(self, ctx) -> None:
        self.lrs.append((ctx.task_index, ctx.task_step, ctx.optimizer.param_groups[0]["lr"]))


@pytest.fixture(scope="module")
def stream():
    return data.split(data.load("digits"), n_tasks=2, scenario="class", n_train=60)


def test_warmup_ramps_from_start_factor_after_each_switch_only(stream):
    recorder = LrRecorder()
    train.fit(models.MLP(stream.input_dim, (8,), stream.n_out), stream, [SwitchWarmup(4, 0.1), recorder], steps=6,
              lr=0.5, optimizer="sgd", progress=False)
    first = [lr for task, _, lr in recorder.lrs if task == 0]
    second = [lr for task, _, lr in recorder.lrs if task == 1]
    assert first == pytest.approx([0.5] * 6)
    assert second == pytest.approx([0.05, 0.1625, 0.275, 0.3875, 0.5, 0.5])


class Snapshot(Method):
    """Copies of the body's and the head's weights at the end of the first task."""

    def on_task_end(self, ctx) -> None:
        if ctx.task_index == 0:
            self.body = [p.detach().clone() for p in ctx.model.features.parameters()]
            self.head = ctx.model.head.weight.detach().clone()


def test_head_first_moves_only_the_head_in_its_window(stream):
    model, snapshot = models.MLP(stream.input_dim, (8,), stream.n_out), Snapshot()
    train.fit(model, stream, [HeadFirst(steps=50), snapshot], steps=3, optimizer="sgd", lr=0.1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(snapshot.body, model.features.parameters(), strict=True))
    assert not torch.equal(snapshot.head, model.head.weight)  # task 2's three steps all fell in the window


@pytest.mark.parametrize("bad", [0, -1])
def test_switch_remedies_reject_non_positive_steps(bad):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        SwitchWarmup(bad)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        HeadFirst(bad)


def test_warmup_rejects_a_start_factor_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"start_factor must be in \[0.0, 1.0\]"):
        SwitchWarmup(10, start_factor=1.5)
