"""The default tiny LM (seed 0) ships inside the package, so a reader's first ``tiny_lm()`` needs no pretraining."""

import time

from cl_lab.lm import cache
from cl_lab.lm.lab import LMConfig, config_key, tiny_lm


def test_the_shipped_model_is_the_default_configuration():
    shipped = sorted(p.name for p in cache.shipped_root().iterdir())
    assert shipped == [config_key(LMConfig(seed=0))], (
        f"shipped {shipped}, but the default key is {config_key(LMConfig(seed=0))}: "
        "run `python scripts/ship_tiny_lm.py` after changing the world, LMConfig's defaults or CORPUS_VERSION")


def test_first_default_lab_loads_the_shipped_model_and_writes_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_LAB_CACHE", str(tmp_path / "cl_lab"))
    start = time.perf_counter()
    lab = tiny_lm(0, progress=False)
    assert time.perf_counter() - start < 10  # pretraining it takes 60-110 s on the 2-core CPU
    assert lab.info["shipped"] and not lab.info["pretrained_now"]
    assert lab.info["config"] == LMConfig(seed=0).__dict__
    assert not (tmp_path / "cl_lab").exists()


def test_another_seed_is_not_served_from_the_shipped_folder():
    assert cache.shipped(config_key(LMConfig(seed=1))) is None
    assert cache.shipped(config_key(LMConfig(seed=0, steps=999))) is None
