import warnings

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def lab():
    """The SMOKE lab of seed 0 (chapter 09's ``lab_of(0, smoke=True)``: a 1-layer tiny LM, seconds to pretrain),
    for the chapters' helper tests; a module that needs another lab defines its own ``lab``."""
    from cl_lab.chapters import ch09

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ch09.lab_of(0, smoke=True)
