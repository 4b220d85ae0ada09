from unittest import mock

import matplotlib.pyplot as plt
import pytest

from cl_lab import widgets


def square(x, scale):
    return {"value": scale * x * x}


def plot_value(result):
    fig, ax = plt.subplots()
    ax.bar(["value"], [result["value"]])
    return fig


@pytest.fixture
def sweep():
    ipywidgets = pytest.importorskip("ipywidgets")
    with mock.patch.object(plt, "show"):
        yield widgets.sweep(square, plot_value, fixed={"scale": 2.0},
                            x=ipywidgets.FloatSlider(value=1.0, min=0, max=3, step=0.5))


def test_moving_a_slider_recomputes_and_redraws(sweep):
    assert sweep.result == {"value": 2.0}
    with mock.patch.object(plt, "show"):
        sweep.children[0].value = 3.0
    assert sweep.result == {"value": 18.0}
    bars = sweep.figures[-1].axes[0].patches
    assert bars[0].get_height() == pytest.approx(18.0)
    assert sweep.children[0].continuous_update is False


def test_moving_back_is_served_from_the_cache(sweep):
    with mock.patch.object(plt, "show"):
        sweep.children[0].value = 3.0
        sweep.children[0].value = 1.0
    assert sweep.cache.misses == 2 and sweep.cache.hits == 1 and sweep.result == {"value": 2.0}


def test_cache_key_covers_the_full_configuration():
    cache = widgets.ResultCache()
    cache.get(square, {"x": 1.0, "scale": 2.0})
    cache.get(square, {"x": 1.0, "scale": 3.0})
    assert cache.misses == 2 and len(cache) == 2


def test_log_slider_spans_decades():
    slider = widgets.log_slider("λ", 1e-2, 1e6, 1.0)
    assert slider.min == -2 and slider.max == 6 and slider.value == pytest.approx(1.0)


def test_a_result_put_in_the_cache_is_returned_without_calling():
    from cl_lab.widgets import ResultCache

    cache = ResultCache()
    cache.put(_square_for_put, {"x": 3}, -1)  # not 9: a call would show
    assert cache.get(_square_for_put, {"x": 3}) == -1 and (cache.hits, cache.misses) == (1, 0)
    assert cache.get(_square_for_put, {"x": 4}) == 16 and cache.misses == 1


def _square_for_put(x):
    return x * x
