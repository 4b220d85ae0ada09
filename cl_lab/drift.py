"""Drift detection on embeddings: the trigger for an update, and what its alarms cost.

- ``mmd2``: the unbiased estimate of the squared maximum mean discrepancy with a Gaussian kernel (Gretton et al.
  2012, JMLR, arXiv 0805.2368, eq. 3), for one window or a stack of windows at once.
- ``ks_statistic``: the two-sample Kolmogorov–Smirnov statistic of every coordinate, for stacks of windows;
  ``ks_pvalue`` its asymptotic p-value. Rabanser et al. 2019 (Failing Loudly, arXiv 1810.11953) test each of a
  few projected coordinates with KS and combine them with a Bonferroni correction; ``KSDetector`` does that.
- ``MMDDetector``: a fixed reference sample, the first ``n_components`` principal directions of it, and a
  threshold set at the (1 − α) quantile of the statistic over windows drawn from held-out in-distribution
  data (a calibration pool, never the reference itself). Windows never repeat a row (``draw_windows``).
- ``stream_alarms`` / ``summarize`` / ``monitor``: many seeded runs of a stream of windows, stationary or shifted
  at a known window; the per-window and per-run false-alarm rates and the delay to the first alarm after the
  shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cl_lab import _validate

RULES = ("window", "two in a row")


def median_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: the median pairwise Euclidean distance between the rows of x [N, d]."""
    d = torch.cdist(x.double(), x.double())
    return d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)].median().item()


def _gauss(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Unbiased MMD² between windows x [..., n, d] and a sample y [m, d] (or [..., m, d]), Gaussian kernel
    k(a, b) = exp(−‖a − b‖² / 2h²):

        MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ_{i,j} k(x_i, y_j)

    Returns [...]: one value per window. It can be slightly negative when the two distributions are equal.
    """
    _validate.positive("bandwidth", bandwidth)
    x, y = x.double(), y.double()
    n, m = x.shape[-2], y.shape[-2]
    if n < 2 or m < 2:
        raise ValueError(f"x and y must hold at least 2 rows each, got {n} and {m}")
    kxx, kyy, kxy = _gauss(x, x, bandwidth), _gauss(y, y, bandwidth), _gauss(x, y, bandwidth)
    term_x = (kxx.sum((-1, -2)) - n) / (n * (n - 1))  # the diagonal is exp(0) = 1
    term_y = (kyy.sum((-1, -2)) - m) / (m * (m - 1))
    return term_x + term_y - 2 * kxy.mean((-1, -2))


def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two-sample KS statistic sup_t |F_x(t) − F_y(t)| of every coordinate: x [..., n, d], y [m, d] → [..., d].

    Both empirical CDFs are read at every pooled point by binary search in the sorted samples."""
    xs = x.double().transpose(-1, -2).sort(-1).values  # [..., d, n]
    ys = y.double().T.sort(-1).values.expand(*xs.shape[:-1], y.shape[0]).contiguous()  # [..., d, m]
    pooled = torch.cat([xs, ys], -1)  # [..., d, n + m]
    fx = torch.searchsorted(xs.contiguous(), pooled, right=True).double() / xs.shape[-1]
    fy = torch.searchsorted(ys, pooled, right=True).double() / ys.shape[-1]
    return (fx - fy).abs().amax(-1)


def ks_pvalue(statistic: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Asymptotic p-value of a two-sample KS statistic (Kolmogorov's distribution at √(nm/(n+m))·D, with
    Stephens' small-sample correction), elementwise."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * statistic.double()  # [...]
    k = torch.arange(1, 101, dtype=torch.double)
    terms = 2 * (-1) ** (k - 1) * torch.exp(-2 * k ** 2 * lam.unsqueeze(-1) ** 2)
    return terms.sum(-1).clamp(0.0, 1.0).where(lam > 0.3, torch.ones_like(lam))


def _pca(reference: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = reference.mean(0)
    _, _, v = torch.linalg.svd(reference - mean, full_matrices=False)
    return mean, v[:n_components].T  # [d], [d, k]


@dataclass
class MMDDetector:
    """MMD² of each window against a fixed reference, in the reference's top principal directions, with the
    threshold calibrated on held-out in-distribution windows at false-alarm rate ``alpha`` per window."""

    reference: torch.Tensor  # [m, k] projected reference
    mean: torch.Tensor
    basis: torch.Tensor  # [d, k]
    bandwidth: float
    threshold: float
    alpha: float

    @classmethod
    def fit(cls, reference: torch.Tensor, calibration: torch.Tensor, *, window: int = 32, n_components: int = 8,
            alpha: float = 0.05, n_windows: int = 400, seed: int = 0) -> MMDDetector:
        """``reference`` [m, d] and ``calibration`` [c, d]: two disjoint samples of in-distribution embeddings."""
        _validate.positive_int("window", window)
        _validate.positive_int("n_components", n_components)
        _validate.in_range("alpha", alpha, 0.0, 1.0, high_open=True)
        mean, basis = _pca(reference.double(), n_components)
        ref = (reference.double() - mean) @ basis
        bandwidth = median_bandwidth(ref)
        det = cls(ref, mean, basis, bandwidth, math.inf, alpha)
        windows = draw_windows(calibration, n_windows, window, seed=seed)  # [W, n, d]
        det.threshold = torch.quantile(det.statistic(windows), 1 - alpha).item()
        return det

    def statistic(self, windows: torch.Tensor) -> torch.Tensor:
        """MMD² of windows [..., n, d] (raw embeddings) against the reference → [...]."""
        return mmd2((windows.double() - self.mean) @ self.basis, self.reference, self.bandwidth)

    def alarms(self, windows: torch.Tensor) -> torch.Tensor:
        return self.statistic(windows) > self.threshold


@dataclass
class KSDetector:
    """KS on each of the reference's top principal directions, Bonferroni over them: a window alarms when its
    smallest p-value is below α / k (no calibration needed; the p-values are asymptotic)."""

    reference: torch.Tensor
    mean: torch.Tensor
    basis: torch.Tensor
    alpha: float

    @classmethod
    def fit(cls, reference: torch.Tensor, *, n_components: int = 8, alpha: float = 0.05) -> KSDetector:
        _validate.in_range("alpha", alpha, 0.0, 1.0, high_open=True)
        mean, basis = _pca(reference.double(), _validate.positive_int("n_components", n_components))
        return cls((reference.double() - mean) @ basis, mean, basis, alpha)

    def statistic(self, windows: torch.Tensor) -> torch.Tensor:
        """The smallest per-direction p-value of each window [..., n, d] → [...]."""
        proj = (windows.double() - self.mean) @ self.basis
        d = ks_statistic(proj, self.reference)
        return ks_pvalue(d, proj.shape[-2], len(self.reference)).amin(-1)

    def alarms(self, windows: torch.Tensor) -> torch.Tensor:
        return self.statistic(windows) < self.alpha / self.basis.shape[1]


def _subsets(n: int, n_windows: int, window: int, gen: torch.Generator, name: str) -> torch.Tensor:
    """Row indices [W, n]: each window a random subset of ``window`` distinct rows of ``n`` (no repeats)."""
    if window > n:
        raise ValueError(f"window must be at most the {n} rows of {name} (windows repeat no row), got {window}")
    return torch.rand(n_windows, n, generator=gen).argsort(1)[:, :window]


def draw_windows(pool: torch.Tensor, n_windows: int, window: int, *, seed: int = 0,
                 shifted: torch.Tensor | None = None, share: float = 0.0) -> torch.Tensor:
    """``n_windows`` windows of ``window`` distinct rows of pool [N, d], each a seeded random subset (drawn
    without replacement, so a window repeats no row however small the pool); with ``shifted`` [M, d], each
    position takes a row from it with probability ``share`` instead (distinct shifted rows too). Returns
    [W, n, d].

    Without replacement matters for calibration: with replacement a window of n from a pool of N holds about
    n(n − 1)/2N duplicate pairs (0.8 for 32 from 600, 0.3 for 32 from 1,672), each an exact kernel match that
    raises MMD², so a threshold calibrated on the smaller pool sits too high for windows of the larger one."""
    _validate.positive_int("n_windows", n_windows)
    _validate.positive_int("window", window)
    _validate.in_range("share", share, 0.0, 1.0)
    gen = torch.Generator().manual_seed(_validate.non_negative_int("seed", seed))
    rows = pool[_subsets(len(pool), n_windows, window, gen, "pool")]  # [W, n, d]
    if shifted is not None and share > 0:
        swap = torch.rand(n_windows, window, generator=gen) < share  # [W, n]
        other = shifted[_subsets(len(shifted), n_windows, window, gen, "shifted")]  # [W, n, d]
        rows = torch.where(swap.unsqueeze(-1), other, rows)
    return rows


def apply_rule(alarms: np.ndarray, rule: str = "window") -> np.ndarray:
    """Alarms [R, T] (bool) under ``rule``: ``"window"`` keeps them; ``"two in a row"`` keeps an alarm only when
    the window before it alarmed too."""
    _validate.one_of("rule", rule, RULES)
    a = np.asarray(alarms, dtype=bool)
    if rule == "two in a row":
        a = np.concatenate([np.zeros_like(a[:, :1]), a[:, 1:] & a[:, :-1]], axis=1)
    return a


def first_alarm(alarms: np.ndarray, start: int = 0, rule: str = "window") -> np.ndarray:
    """Index (≥ ``start``) of each run's first alarm in alarms [R, T] (bool) under ``rule``, −1 when none."""
    a = apply_rule(alarms, rule)[:, start:]
    hit = a.any(1)
    return np.where(hit, a.argmax(1) + start, -1)


def stream_alarms(detector, pool: torch.Tensor, *, runs: int = 100, windows: int = 20, window: int = 32,
                  shifted: torch.Tensor | None = None, share: float = 0.0, shift_at: int = 0,
                  seed: int = 0) -> np.ndarray:
    """Alarms [runs, windows] (bool) of ``detector`` on ``runs`` seeded streams of ``windows`` windows drawn from
    ``pool``; from window ``shift_at`` on, each row comes from ``shifted`` with probability ``share``."""
    _validate.positive_int("runs", runs)
    _validate.positive_int("windows", windows)
    if not 0 <= shift_at < windows:
        raise ValueError(f"shift_at must be in 0..{windows - 1}, got {shift_at}")
    before = draw_windows(pool, runs * shift_at, window, seed=seed) if shift_at else None
    after = draw_windows(pool, runs * (windows - shift_at), window, seed=seed + 1, shifted=shifted, share=share)
    parts = ([before.reshape(runs, shift_at, window, -1)] if shift_at else []) + \
        [after.reshape(runs, windows - shift_at, window, -1)]
    return detector.alarms(torch.cat(parts, 1)).numpy()


def summarize(still: np.ndarray, moved: np.ndarray, shift_at: int, rule: str = "window") -> dict:
    """What a monitor's alarms mean: ``still`` [R, T] on stationary streams, ``moved`` [R, T] on streams shifted
    at window ``shift_at``. The per-window false-alarm rate and the share of stationary runs with at least one
    alarm; on the shifted runs, the share alarmed before the shift (false), after it (detected), and the mean
    and median delay in windows from the shift to the first alarm after it (detected runs only)."""
    first = first_alarm(moved, start=shift_at, rule=rule)
    delays = first[first >= 0] - shift_at
    return {"rule": rule, "false alarms per window": float(apply_rule(still, rule).mean()),
            "runs with a false alarm": float((first_alarm(still, rule=rule) >= 0).mean()),
            "alarm before the shift": float((first_alarm(moved[:, :shift_at], rule=rule) >= 0).mean()),
            "detected": float((first >= 0).mean()),
            "mean delay": float(delays.mean()) if len(delays) else math.nan,
            "median delay": float(np.median(delays)) if len(delays) else math.nan}


def monitor(detector, pool: torch.Tensor, shifted: torch.Tensor, *, share: float, runs: int = 100,
            windows: int = 20, shift_at: int = 10, window: int = 32, rules=RULES, seed: int = 0) -> list[dict]:
    """``stream_alarms`` on stationary and on shifted streams (each row from ``shifted`` with probability
    ``share`` from window ``shift_at`` on), ``summarize``d under each of ``rules``: one dict per rule."""
    if not 0 < shift_at < windows:
        raise ValueError(f"shift_at must be in 1..{windows - 1}, got {shift_at}")
    kwargs = dict(runs=runs, windows=windows, window=window)
    still = stream_alarms(detector, pool, seed=seed + 10, **kwargs)
    moved = stream_alarms(detector, pool, shifted=shifted, share=share, shift_at=shift_at, seed=seed, **kwargs)
    return [{"share": share, **summarize(still, moved, shift_at, rule)} for rule in rules]


def monitor_table(detector, pool: torch.Tensor, shifted: torch.Tensor, shares, **kwargs) -> pd.DataFrame:
    """``monitor`` at each shift share, one row each."""
    return pd.DataFrame([row for s in shares for row in monitor(detector, pool, shifted, share=s, **kwargs)])
