import pytest
import torch

from cl_lab import models, pick_device, seed_everything


def test_auto_picks_and_says_why(capsys):
    device = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else device.type
    assert device.type == expected
    assert f"cl_lab: using {device.type}" in capsys.readouterr().out


def test_unknown_device_lists_the_allowed():
    with pytest.raises(ValueError, match="device must be one of 'auto', 'cpu'"):
        pick_device("tpu")


def test_same_seed_same_init():
    seed_everything(3)
    a = models.flat_params(models.MLP(10, (8,), 2))
    seed_everything(3)
    b = models.flat_params(models.MLP(10, (8,), 2))
    assert torch.equal(a, b)


def test_seed_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="seed must be ≥ 0"):
        seed_everything(-1)


def test_thread_policy_follows_cl_lab_threads(monkeypatch):
    from cl_lab.device import apply_thread_policy

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("CL_LAB_THREADS", "1")
        assert apply_thread_policy() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CL_LAB_THREADS", "two")
        with pytest.raises(ValueError, match="CL_LAB_THREADS must be a positive integer, got 'two'"):
            apply_thread_policy()
    finally:
        torch.set_num_threads(before)
