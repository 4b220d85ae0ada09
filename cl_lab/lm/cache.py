"""The on-disk cache of pretrained tiny LMs: a content key, a file lock, an atomic write.

Where: ``$CL_LAB_CACHE/lm/`` when that variable is set, else ``$XDG_CACHE_HOME/cl_lab/lm/``, else
``~/.cache/cl_lab/lm/``. The scripts (``lab.sh``, ``test.sh``, ``preflight.sh``, ``prepare_class.sh``) set
``CL_LAB_CACHE`` from the caller's environment before they move Jupyter's and matplotlib's state into the work
folder, so a kernel started by ``lab.sh`` finds the model that ``python -c "from cl_lab import lm; lm.tiny_lm()"``
or ``prepare_class.sh`` cached: one place for every entry point.

The default seed's model ships with the package (``shipped_root()``, 3 MB): its key is looked up there first,
so a reader's first ``tiny_lm()`` loads in a second instead of pretraining for one to two minutes. Any other
seed or configuration is pretrained and cached as below.

Layout: ``<place>/<key>/`` holds the weights (``model.safetensors``, ``config.json``) and ``meta.json``. The key
hashes everything that decides the weights: the full configuration, ``CORPUS_VERSION``, a digest of the corpus
and vocabulary themselves, and transformers' major version — a changed world or config gets a new key, so a
stale model is never loaded.

Two processes asking for the same missing key (two pytest-xdist workers, two notebooks) take an exclusive
``fcntl`` lock on ``<key>.lock``; the second waits, then finds the finished folder and loads it: pretraining
runs at most once. The folder is written under a temporary name and renamed into place, so a crash leaves
no half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import transformers

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first calls may then pretrain twice
    fcntl = None

META = "meta.json"


def cache_home() -> Path:
    """cl_lab's cache folder: ``$CL_LAB_CACHE``, else ``$XDG_CACHE_HOME/cl_lab``, else ``~/.cache/cl_lab``."""
    if os.environ.get("CL_LAB_CACHE"):
        return Path(os.environ["CL_LAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cl_lab"


def cache_root() -> Path:
    """The pretrained tiny LMs' folder: ``cache_home() / "lm"`` (default ``~/.cache/cl_lab/lm``)."""
    return cache_home() / "lm"


def shipped_root() -> Path:
    """Pretrained tiny LMs that ship inside the package (the default seed's), read before the cache."""
    return Path(__file__).parent / "data" / "tiny_lm"


def shipped(key: str) -> Path | None:
    """The shipped folder of ``key``, or None: a changed config, corpus or transformers major misses it."""
    folder = shipped_root() / key
    return folder if (folder / META).exists() else None


def cache_key(config: dict, corpus_version: int, corpus_digest: str) -> str:
    """A 20-hex-digit key of the configuration, corpus version and digest, and transformers' major version."""
    payload = {"config": config, "corpus_version": corpus_version, "corpus": corpus_digest,
               "transformers": transformers.__version__.split(".")[0]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def ensure(key: str, build: Callable[[Path], dict], root: Path | None = None) -> tuple[Path, bool]:
    """The folder of ``key``, built by ``build(tmp_folder) -> meta`` under the lock when missing.

    Returns (folder, built): ``built`` is False when the folder was already there (possibly finished by
    another process while this one waited for the lock).
    """
    root = cache_root() if root is None else root
    final = root / key
    if (final / META).exists():
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock"):
        if (final / META).exists():
            return final, False
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            meta = build(tmp)
            (tmp / META).write_text(json.dumps({"key": key, **meta}, indent=1))
            if final.exists():  # an incomplete folder from an old crash: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())
