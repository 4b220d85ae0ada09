"""The sweep pattern: a pure function per setting, a thin ipywidgets wrapper, a cache keyed by the full
configuration (so moving a slider back is instant and a stale result is never shown)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt


class ResultCache:
    """Results keyed by the function and every argument it was called with."""

    def __init__(self) -> None:
        self._store: dict[tuple, Any] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fn: Callable, config: dict) -> tuple:
        return (f"{fn.__module__}.{fn.__qualname__}", tuple(sorted((k, repr(v)) for k, v in config.items())))

    def get(self, fn: Callable, config: dict) -> Any:
        key = self.key(fn, config)
        if key in self._store:
            self.hits += 1
        else:
            self.misses += 1
            self._store[key] = fn(**config)
        return self._store[key]

    def put(self, fn: Callable, config: dict, result: Any) -> None:
        """Store ``result`` as ``fn(**config)``'s, e.g. a run the notebook already trained with those arguments."""
        self._store[self.key(fn, config)] = result

    def __len__(self) -> int:
        return len(self._store)


def log_slider(description: str, low: float, high: float, value: float, steps_per_decade: int = 4):
    """A log-scale slider from ``low`` to ``high`` that only reports when released."""
    import math

    import ipywidgets as w

    return w.FloatLogSlider(value=value, base=10, min=math.log10(low), max=math.log10(high),
                            step=1 / steps_per_decade, description=description, continuous_update=False)


def sweep(fn: Callable[..., Any], plot: Callable[[Any], Any], *, fixed: dict | None = None,
          cache: ResultCache | None = None, **controls):
    """Wrap ``fn(**fixed, **setting)`` and ``plot(result)`` in sliders; returns the ``interactive`` widget.

    ``controls`` are ipywidgets (or abbreviations ipywidgets understands); the widget's ``result`` is
    the latest result, ``cache`` its cache, ``figures`` every figure it drew (all but the latest closed).
    """
    import ipywidgets as w

    fixed = dict(fixed or {})
    cache = cache if cache is not None else ResultCache()
    figures: list = []

    def show(**setting):
        result = cache.get(fn, {**fixed, **setting})
        if figures:
            plt.close(figures[-1])  # pyplot keeps every open figure alive; the widget shows one at a time
        fig = plot(result)
        figures.append(fig)
        plt.show()
        return result

    widget = w.interactive(show, **controls)
    for child in widget.children:
        if hasattr(child, "continuous_update"):
            child.continuous_update = False
    widget.cache, widget.figures = cache, figures
    return widget
