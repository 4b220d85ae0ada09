"""A cost model for keeping a model up to date: retraining from scratch, incremental updates, or adapters,
month by month, from measured seconds.

Every strategy starts from the same pretrained model (its first pretraining is not counted) and takes one update a
month. Per month m = 1 … M:

- **scratch**: pretrain again on the whole corpus, which has grown by a fraction ``growth`` of the original a
  month: ``pretrain_steps · (1 + m·growth)`` steps at ``pretrain_step`` seconds, plus one shadow evaluation;
- **incremental**: continue training the served model on the month's data (``update_steps`` steps at
  ``update_step`` seconds, replay included), plus one evaluation;
- **adapters**: train one new adapter a month (``update_steps`` at ``adapter_step`` seconds), plus one evaluation,
  and keep every adapter live: each request then pays ``adapter_overhead`` seconds per live adapter, for
  ``requests`` requests a month.

The seconds are inputs (measure them with ``cl_lab.timing.best_times``); ``growth`` and ``requests`` are
assumptions the reader sets.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cl_lab import _validate

STRATEGIES = ("scratch", "incremental", "adapters")
SECONDS = ("pretrain_step", "update_step", "adapter_step", "evaluation", "adapter_overhead")


def monthly_costs(seconds: dict, *, months: int = 12, pretrain_steps: int = 1000, update_steps: int = 150,
                  growth: float = 0.03, requests: float = 1e5) -> pd.DataFrame:
    """Seconds spent in each month (rows 1 … ``months``) by each strategy (columns ``STRATEGIES``).

    ``seconds`` maps each name of ``SECONDS`` to a measured time: one pretraining step, one incremental update
    step, one adapter training step, one shadow evaluation, and the extra seconds one live adapter adds to one
    request.
    """
    missing = sorted(set(SECONDS) - set(seconds))
    if missing:
        raise ValueError(f"seconds must give {list(SECONDS)}, missing {missing}")
    s = {k: _validate.non_negative(k, seconds[k]) for k in SECONDS}
    _validate.positive_int("months", months)
    _validate.positive_int("pretrain_steps", pretrain_steps)
    _validate.positive_int("update_steps", update_steps)
    _validate.non_negative("growth", growth)
    _validate.non_negative("requests", requests)
    m = np.arange(1, months + 1)
    table = pd.DataFrame({
        "scratch": pretrain_steps * (1 + m * growth) * s["pretrain_step"] + s["evaluation"],
        "incremental": np.full(months, update_steps * s["update_step"] + s["evaluation"]),
        "adapters": update_steps * s["adapter_step"] + s["evaluation"] + requests * m * s["adapter_overhead"],
    }, index=pd.Index(m, name="month"))
    return table[list(STRATEGIES)]


def cumulative(monthly: pd.DataFrame) -> pd.DataFrame:
    """Total seconds spent up to and including each month."""
    return monthly.cumsum()


def crossover(total: pd.DataFrame, a: str, b: str) -> float:
    """The first month at which strategy ``a``'s cumulative cost exceeds ``b``'s; nan if it never does."""
    for name in (a, b):
        if name not in total.columns:
            raise ValueError(f"{name!r} must be one of {list(total.columns)}")
    above = (total[a] > total[b]).to_numpy()
    return float(total.index[above.argmax()]) if above.any() else math.nan


def break_even_requests(seconds: dict, against: str = "scratch", *, months: int = 12, pretrain_steps: int = 1000,
                        update_steps: int = 150, growth: float = 0.03) -> float:
    """The monthly requests at which live adapters cost, over ``months``, as much as strategy ``against``
    (``"scratch"`` or ``"incremental"``): the seconds adapters save in training divided by the overhead they
    add (Σ_m m = M(M + 1)/2 adapter-months per monthly request). 0 when adapters save nothing."""
    _validate.one_of("against", against, ("scratch", "incremental"))
    no_traffic = monthly_costs(seconds, months=months, pretrain_steps=pretrain_steps, update_steps=update_steps,
                               growth=growth, requests=0).sum()
    saved = no_traffic[against] - no_traffic["adapters"]
    overhead = seconds["adapter_overhead"] * months * (months + 1) / 2
    if saved <= 0:
        return 0.0
    return saved / overhead if overhead > 0 else math.inf
