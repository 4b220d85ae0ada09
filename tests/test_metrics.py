"""Golden tests: each metric on hand-made matrices, computed by hand from the paper's formula."""

import numpy as np
import pytest

from cl_lab import metrics

R = np.array([[0.9, 0.1, 0.2],
              [0.5, 0.8, 0.1],
              [0.3, 0.6, 0.7]])
B = np.array([0.1, 0.05, 0.2])
# A task that improves after it was learned, so forgetting (max over l) differs from −BWT.
R_RECOVER = np.array([[0.6, 0.0, 0.0],
                      [0.9, 0.8, 0.0],
                      [0.7, 0.8, 0.9]])


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)


def test_backward_transfer_by_hand():
    assert metrics.backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)


def test_forward_transfer_divides_by_t_minus_1_not_t():
    by_hand = ((0.1 - 0.05) + (0.1 - 0.2)) / 2  # the GEM code's /T would give a third less
    assert metrics.forward_transfer(R, B) == pytest.approx(by_hand)


def test_forgetting_uses_the_best_earlier_accuracy():
    assert metrics.forgetting(R_RECOVER) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.8)) / 2)
    assert metrics.backward_transfer(R_RECOVER) == pytest.approx(((0.7 - 0.6) + 0.0) / 2)


def test_forgetting_equals_minus_bwt_when_accuracy_only_falls():
    assert metrics.forgetting(R) == pytest.approx(-metrics.backward_transfer(R))


def test_min_acc_and_wc_acc_by_hand():
    assert metrics.min_acc([0.9, 0.4, 0.8]) == pytest.approx(0.4)
    assert metrics.wc_acc(0.9, [0.4, 0.6]) == pytest.approx(0.9 / 3 + (2 / 3) * 0.5)
    assert metrics.wc_acc(0.7, []) == pytest.approx(0.7)


def test_perfect_memory_has_zero_bwt_and_forgetting():
    perfect = np.triu(np.ones((4, 4))).T  # lower triangle of ones: every learned task stays at 1.0
    assert metrics.backward_transfer(perfect) == 0.0
    assert metrics.forgetting(perfect) == 0.0


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros(3), np.zeros((0, 0))])
def test_bad_matrices_name_r(bad):
    with pytest.raises(ValueError, match="R must"):
        metrics.backward_transfer(bad)


def test_baseline_length_must_match():
    with pytest.raises(ValueError, match="b must hold one baseline accuracy per task"):
        metrics.forward_transfer(R, [0.1, 0.2])


def test_single_task_has_no_transfer():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        metrics.backward_transfer([[0.9]])


def test_min_acc_needs_values():
    with pytest.raises(ValueError, match="accuracies_after_learning"):
        metrics.min_acc([])


# Task 2 (column 1) scores 0.95 before it is trained (row 0), as a shared Domain-IL head allows.
R_BEFORE = np.array([[0.9, 0.95, 0.3],
                     [0.5, 0.80, 0.2],
                     [0.4, 0.60, 0.7]])


def test_forgetting_maxes_over_every_earlier_row_rwalk_eq_8():
    rwalk = ((0.9 - 0.4) + (0.95 - 0.6)) / 2  # max over l < T, rows before the task included
    rows_from_j = ((0.9 - 0.4) + (0.80 - 0.6)) / 2  # the reading that starts at row j
    assert metrics.forgetting(R_BEFORE) == pytest.approx(rwalk)
    assert rwalk != pytest.approx(rows_from_j)
    assert -metrics.backward_transfer(R_BEFORE) == pytest.approx(rows_from_j)  # Avalanche's reading here
