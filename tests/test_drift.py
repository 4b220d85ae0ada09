"""Drift detection (cl_lab.drift): MMD² and KS against reference formulas, calibration, alarm rules, monitoring."""

import numpy as np
import pytest
import torch
from scipy import stats

from cl_lab import drift


def _gauss(n, d=4, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_mmd2_equals_the_double_loop_formula():
    x, y, h = _gauss(6, seed=1), _gauss(9, seed=2, shift=0.5), 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h ** 2))  # noqa: E731
    xs, ys = x.numpy(), y.numpy()
    xx = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j) / (6 * 5)
    yy = sum(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in xs for b in ys) / (6 * 9)
    assert drift.mmd2(x, y, h).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    stacked = drift.mmd2(torch.stack([x, x + 1]), y, h)  # [2]: one value per window
    assert stacked.shape == (2,) and stacked[0].item() == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_mmd2_is_unbiased_near_zero_for_equal_distributions_and_grows_with_the_shift():
    ref = _gauss(200, seed=0)
    same = drift.mmd2(torch.stack([_gauss(50, seed=s) for s in range(1, 41)]), ref, 2.0)
    assert abs(same.mean().item()) < 0.01 and (same < 0).any()  # unbiased: negative values occur
    assert drift.mmd2(_gauss(50, shift=1.0, seed=99), ref, 2.0) > same.max()
    with pytest.raises(ValueError, match="at least 2 rows"):
        drift.mmd2(_gauss(1), ref, 1.0)


def test_ks_statistic_and_pvalue_match_scipy():
    x, y = _gauss(40, d=3, seed=3), _gauss(70, d=3, seed=4, shift=0.3)
    d = drift.ks_statistic(x, y)
    ref = [stats.ks_2samp(x[:, j].numpy(), y[:, j].numpy(), method="asymp") for j in range(3)]
    assert torch.allclose(d, torch.tensor([r.statistic for r in ref], dtype=torch.float64))
    p = drift.ks_pvalue(d, 40, 70)
    for got, r in zip(p.tolist(), ref):
        assert got == pytest.approx(r.pvalue, abs=0.02)
    batched = drift.ks_statistic(torch.stack([x, y[:40]]), y)
    assert torch.allclose(batched[0], d)


def test_median_bandwidth_of_a_known_set():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 2, 3
    assert drift.median_bandwidth(x) == 2.0


def test_mmd_detector_calibrates_its_false_alarm_rate_on_held_out_windows():
    ref, cal, pool = _gauss(128, d=16, seed=0), _gauss(600, d=16, seed=1), _gauss(2000, d=16, seed=2)
    det = drift.MMDDetector.fit(ref, cal, window=32, n_components=4, alpha=0.05, n_windows=400, seed=0)
    rate = det.alarms(drift.draw_windows(pool, 2000, 32, seed=5)).double().mean().item()
    assert 0.02 <= rate <= 0.10  # 0.03-0.08 over eight draws of the three samples: the pool of 600 is one sample
    shifted = drift.draw_windows(pool, 200, 32, seed=6, shifted=pool + 0.7, share=1.0)
    assert det.alarms(shifted).double().mean() > 0.9


def test_ks_detector_bonferroni_keeps_false_alarms_at_most_alpha():
    ref, pool = _gauss(300, d=8, seed=0), _gauss(3000, d=8, seed=1)
    det = drift.KSDetector.fit(ref, n_components=4, alpha=0.05)
    rate = det.alarms(drift.draw_windows(pool, 1000, 64, seed=2)).double().mean().item()
    assert rate <= 0.06
    assert det.alarms(drift.draw_windows(pool + 1.0, 50, 64, seed=3)).all()


def test_draw_windows_mixes_in_the_share_of_shifted_rows():
    pool, other = torch.zeros(100, 2), torch.ones(50, 2)
    w = drift.draw_windows(pool, 400, 50, seed=0, shifted=other, share=0.3)
    assert w.shape == (400, 50, 2) and abs(w[..., 0].mean().item() - 0.3) < 0.01
    assert torch.equal(w, drift.draw_windows(pool, 400, 50, seed=0, shifted=other, share=0.3))


def test_alarm_rules_and_first_alarm():
    a = np.array([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=bool)
    assert drift.first_alarm(a).tolist() == [1, -1, 0]
    assert drift.first_alarm(a, rule="two in a row").tolist() == [4, -1, 1]
    assert drift.first_alarm(a, start=2).tolist() == [3, -1, -1]
    assert drift.apply_rule(a, "two in a row").sum() == 2


class _Always:
    """A detector that alarms on every window whose mean exceeds a threshold."""

    def __init__(self, threshold):
        self.threshold = threshold

    def alarms(self, windows):
        return windows.mean((-1, -2)) > self.threshold


def test_summarize_counts_false_alarms_and_delays():
    still = np.zeros((4, 10), dtype=bool)
    still[0, 3] = True
    moved = np.zeros((4, 10), dtype=bool)
    moved[0, 2] = True  # before the shift: false
    moved[:3, 7] = True  # detected two windows after the shift at 5
    row = drift.summarize(still, moved, shift_at=5)
    assert row["false alarms per window"] == 1 / 40 and row["runs with a false alarm"] == 0.25
    assert row["alarm before the shift"] == 0.25 and row["detected"] == 0.75
    assert row["mean delay"] == 2 and row["median delay"] == 2


def test_monitor_detects_a_full_shift_at_once_and_never_before_it():
    pool, shifted = torch.zeros(10, 3), torch.ones(10, 3)
    rows = drift.monitor(_Always(0.5), pool, shifted, share=1.0, runs=5, windows=8, shift_at=4, window=4)
    single, double = rows
    assert single["detected"] == 1 and single["mean delay"] == 0 and single["alarm before the shift"] == 0
    assert double["mean delay"] == 1 and single["false alarms per window"] == 0
    with pytest.raises(ValueError, match="shift_at"):
        drift.monitor(_Always(0.5), pool, shifted, share=1.0, windows=8, shift_at=8)


def test_draw_windows_repeat_no_row_however_small_the_pool():
    pool = torch.arange(40.0)[:, None]  # [40, 1]: each row its own id
    w = drift.draw_windows(pool, 300, 32, seed=0)  # with replacement: about 12 duplicate pairs a window
    assert all(len(set(row.flatten().tolist())) == 32 for row in w)
    counts = torch.bincount(w.flatten().long(), minlength=40).double()  # every row equally likely
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
    mixed = drift.draw_windows(pool, 50, 32, seed=1, shifted=100 + pool, share=0.5)
    assert all(len(set(row.flatten().tolist())) == 32 for row in mixed)
    with pytest.raises(ValueError, match="window must be at most the 40 rows of pool"):
        drift.draw_windows(pool, 2, 41)
