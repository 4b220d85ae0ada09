import numpy as np
import pytest
import torch

from cl_lab import data, models, seed_everything, train
from cl_lab.methods import Method


@pytest.fixture(scope="module")
def stream():
    return data.split(data.load("digits", verbose=False), 5, "class", n_train=100)


def _model(stream, seed=0):
    seed_everything(seed)
    return models.MLP(stream.input_dim, (32,), stream.n_out)


def test_same_seed_same_numbers_on_cpu(stream):
    a = train.fit(_model(stream), stream, steps=20, batch_size=16, seed=1, device="cpu")
    b = train.fit(_model(stream), stream, steps=20, batch_size=16, seed=1, device="cpu")
    assert np.array_equal(a.R, b.R) and a.losses.loss.equals(b.losses.loss)


def test_run_carries_matrix_curves_and_config(stream):
    run = train.fit(_model(stream), stream, steps=10, batch_size=16, eval_every=5, device="cpu")
    assert run.R.shape == (5, 5) and run.b.shape == (5,)
    assert run.boundaries == [0, 10, 20, 30, 40]
    assert set(run.curves.columns) == {"step", "train_task", "task", "accuracy"}
    assert run.curves.step.max() == 50 and len(run.curves) == 5 * 11
    assert run.config["method"] == "naive" and run.config["steps"] == 10
    assert {"AA", "BWT", "FWT"} <= set(run.summary())


def test_class_il_naive_forgets(stream):
    run = train.fit(_model(stream), stream, steps=60, batch_size=32, device="cpu")
    assert run.R[0, 0] > 0.9 and run.R[-1, 0] < 0.2


def test_joint_training_fills_one_row():
    digits = data.load("digits", verbose=False)
    joint = data.joint(data.split(digits, 5, "class", n_train=100))
    seed_everything(0)
    run = train.fit(models.MLP(64, (64,), 10), joint, steps=300, batch_size=64, device="cpu")
    assert run.R.shape == (1, 5) and run.aa > 0.85


class Recorder(Method):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def on_task_start(self, ctx):
        self.calls.append(("start", ctx.task_index))

    def compose_batch(self, ctx, x, y, t):
        self.calls.append("compose")
        return x, y, t

    def extra_loss(self, ctx, x, y, t, logits):
        self.calls.append("extra")
        return torch.zeros(())

    def before_step(self, ctx):
        assert all(p.grad is not None for p in ctx.model.parameters())
        self.calls.append("before_step")

    def after_step(self, ctx):
        self.calls.append("after_step")

    def on_task_end(self, ctx):
        self.calls.append(("end", ctx.task_index))


def test_hooks_fire_in_order(stream):
    rec = Recorder()
    train.fit(_model(stream), stream, rec, steps=1, batch_size=8, device="cpu")
    one_task = lambda i: [("start", i), "compose", "extra", "before_step", "after_step", ("end", i)]  # noqa: E731
    assert rec.calls == [c for i in range(5) for c in one_task(i)]


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps must be a positive int"), ({"lr": -1e-3}, "lr must be > 0"),
    ({"batch_size": 0}, "batch_size must be a positive int"), ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ({"eval_every": 0}, "eval_every must be a positive int"), ({"method": "ewc"}, "method must be a cl_lab Method")])
def test_bad_arguments_are_named(stream, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train.fit(_model(stream), stream, **kwargs)


def test_frozen_model_is_refused(stream):
    model = _model(stream).requires_grad_(False)
    with pytest.raises(ValueError, match="model must have trainable parameters"):
        train.fit(model, stream)


def test_unknown_task_id_is_named(stream):
    with pytest.raises(ValueError, match="task_id must be in 0..4"):
        train.accuracy(_model(stream), stream, 7, stream.tasks[0].x_test, stream.tasks[0].y_test)


def test_output_size_mismatch_is_named(stream):
    with pytest.raises(ValueError, match="model must output stream.n_out = 10 logits"):
        train.fit(models.MLP(stream.input_dim, (8,), 2), stream, steps=1)


def test_input_size_mismatch_is_named(stream):
    with pytest.raises(ValueError, match="model does not accept the stream's inputs of shape"):
        train.fit(models.MLP(784, (8,), 10), stream, steps=1)
