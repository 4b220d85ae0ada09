"""Copy the default tiny LM (seed 0) from the cache into the package, so a reader's first ``tiny_lm()`` loads it.

Run after anything that changes the default model's cache key (``CORPUS_VERSION``, ``LMConfig``'s defaults, the
world, transformers' major version); pretrains first when the cache lacks it. Old shipped folders are removed first.
``tests/test_lm_shipped.py`` fails while the shipped key and the default configuration's key differ.
"""

import shutil

from cl_lab.lm import cache
from cl_lab.lm.lab import LMConfig, config_key, tiny_lm

SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", cache.META)


def main() -> None:
    key = config_key(LMConfig(seed=0))
    root = cache.shipped_root()
    for old in root.glob("*"):
        shutil.rmtree(old)  # so that tiny_lm reads (or pretrains into) the cache, not a shipped copy
    lab = tiny_lm(0, progress=True)
    source = cache.cache_root() / key
    if lab.info["cache"] != str(source):
        raise SystemExit(f"the default LM loaded from {lab.info['cache']}, not from the cache at {source}")
    target = root / key
    target.mkdir(parents=True)
    for name in SHIPPED_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    print(f"shipped {key} to {target}")


if __name__ == "__main__":
    main()
