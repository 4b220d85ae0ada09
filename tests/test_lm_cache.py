"""One cache place for the tiny LM, whatever the entry point: a plain ``python -c`` and the scripts (lab.sh's
kernels, test.sh, preflight.sh, prepare_class.sh), which move ``XDG_CACHE_HOME`` into the work folder."""

import re
import subprocess
from pathlib import Path

import pytest

from cl_lab.lm import cache

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / "scripts" / "_env.sh"


def test_cl_lab_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CL_LAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "cl_lab" / "lm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "cl_lab" / "lm"
    monkeypatch.setenv("CL_LAB_CACHE", str(tmp_path / "class"))
    assert cache.cache_root() == tmp_path / "class" / "lm"


def _env_sh_cache_line() -> str:
    text = ENV_SH.read_text(encoding="utf-8")
    (line,) = re.findall(r"^export CL_LAB_CACHE=.*$", text, re.MULTILINE)
    assert text.index(line) < text.index('XDG_CACHE_HOME="$WORK/cache"'), "CL_LAB_CACHE must be read before XDG moves"
    return line


@pytest.mark.parametrize("caller", [{}, {"XDG_CACHE_HOME": "xdg"}, {"CL_LAB_CACHE": "class"}],
                         ids=["plain", "xdg-set", "cl-lab-cache-set"])
def test_the_scripts_cache_where_a_plain_python_caches(monkeypatch, tmp_path, caller):
    """The caller's environment → the place a plain python uses, and the place a kernel of lab.sh uses (with
    _env.sh's CL_LAB_CACHE and its work-folder XDG_CACHE_HOME): the same folder."""
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin",
           **{k: str(tmp_path / v) for k, v in caller.items()}}
    monkeypatch.delenv("CL_LAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plain = cache.cache_root()
    script = f'set -u\n{_env_sh_cache_line()}\necho "$CL_LAB_CACHE"'
    exported = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    monkeypatch.setenv("CL_LAB_CACHE", exported.strip())
    monkeypatch.setenv("XDG_CACHE_HOME", str(ROOT / ".ci-work" / "cache"))  # what _env.sh sets next
    assert cache.cache_root() == plain


@pytest.mark.parametrize("script", ["lab.sh", "test.sh", "preflight.sh", "prepare_class.sh"])
def test_every_entry_point_sources_env_sh(script):
    assert re.search(r'^source "\$\(dirname "\$0"\)/_env\.sh"', (ROOT / "scripts" / script).read_text(), re.MULTILINE)


def test_prepare_class_loads_seed_0_by_default():
    text = (ROOT / "scripts" / "prepare_class.sh").read_text()
    assert "or [0]" in text and "lm.tiny_lm(seed=seed)" in text
