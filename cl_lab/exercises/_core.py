"""The exercise machinery: a registry, and checkers that test a learner's function property by property.

A chapter module defines, for each exercise, a stub (raises ``NotImplementedError``), a solution, the
plausible wrong answers the tests use, and a ``properties(fn)`` function that calls ``fn`` on small seeded
random inputs and calls ``expect`` once per property. ``register`` turns that into ``check_<name>(fn)``:

- in a notebook it never raises: an unsolved stub prints "not attempted yet", a wrong answer prints in red
  the property that failed (what was expected, what came back), a right answer prints one green line;
- with ``strict=True`` (the tests) every failure raises ``AssertionError`` with the same message.

Helpers the chapter modules share: ``unsolved`` makes a stub from a solution, ``tensors_close`` compares a
learner's tensor with a reference, and ``seeded_inputs`` / ``seeded_mlp`` / ``seeded_linear`` build the small
seeded random cases the properties run on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cl_lab.check import GREEN, GREY, RED, RESET
from cl_lab.models import MLP


def unsolved(solution: Callable) -> Callable:
    """The learner's starting point: ``solution``'s name, signature and docstring, and a body that raises
    ``NotImplementedError`` (which ``Exercise.check`` reports as "not attempted yet")."""

    @functools.wraps(solution)
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{solution.__name__} is not written yet")

    return stub


def tensors_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Same shape, and equal entry by entry within ``rtol`` relative to each entry and to ``want``'s largest
    magnitude (so near-zero entries do not demand exact equality); ``got`` may still carry a graph."""
    return got.shape == want.shape and bool(torch.allclose(got.detach().float(), want.float(), rtol=rtol,
                                                           atol=rtol * float(want.abs().max()) + 1e-12))


def seeded_inputs(seed: int, n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal inputs x [n, d] times ``scale``, drawn from a generator of their own seeded with ``seed``
    (the global torch seed is left alone)."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def seeded_mlp(seed: int, d: int, hidden: Sequence[int], out: int) -> MLP:
    """``MLP(d, hidden, out)`` initialised right after ``torch.manual_seed(seed)``: the same weights on every call."""
    torch.manual_seed(seed)
    return MLP(d, hidden, out)


def seeded_linear(seed: int, d: int, out: int) -> nn.Sequential:
    """One ``nn.Linear(d, out)`` (parameters ``0.weight`` [out, d] and ``0.bias`` [out]) initialised right after
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, out))


class PropertyFailed(AssertionError):
    """One property of a learner's function does not hold: ``str(self)`` says which, expected and got."""


def expect(ok: bool, prop: str, expected: object = "", got: object = "") -> None:
    """Raise ``PropertyFailed`` naming ``prop`` unless ``ok``."""
    if not ok:
        detail = f" — expected {expected}, got {got}" if expected != "" or got != "" else ""
        raise PropertyFailed(f"{prop}{detail}")


@dataclass(frozen=True)
class Exercise:
    """One coding exercise: where it lives, how hard it is, and the functions the tests exercise."""

    name: str
    chapter: str
    title: str
    difficulty: int  # 1–3 stars
    minutes: int
    stub: Callable
    solution: Callable
    properties: Callable[[Callable], None]
    wrong_answers: dict[str, Callable] = field(default_factory=dict)

    def check(self, fn: Callable, *, strict: bool = False) -> bool:
        """Test ``fn`` property by property; print the outcome (``strict``: raise ``AssertionError`` on failure)."""
        try:
            self.properties(fn)
        except NotImplementedError:
            return self._fail(f"{self.name}: not attempted yet — the hints are below", strict, GREY)
        except PropertyFailed as exc:
            return self._fail(f"{self.name}: {exc}", strict, RED)
        except Exception as exc:  # the learner's code raised: say what, without our traceback
            return self._fail(f"{self.name}: your function raised {type(exc).__name__}: {exc}", strict, RED)
        print(f"{GREEN}✓ {self.name}: every property holds{RESET}")
        return True

    @staticmethod
    def _fail(message: str, strict: bool, colour: str) -> bool:
        if strict:
            raise AssertionError(message)
        print(f"{colour}✗ {message}{RESET}")
        return False


_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Callable[..., bool]:
    """Add ``exercise`` to the registry and return its checker, ``check_<name>(fn, *, strict=False)``."""
    if exercise.name in _REGISTRY:
        raise ValueError(f"exercise name must be unique, got {exercise.name!r} twice")
    _REGISTRY[exercise.name] = exercise

    def checker(fn: Callable, *, strict: bool = False) -> bool:
        return exercise.check(fn, strict=strict)

    checker.__name__ = f"check_{exercise.name}"
    checker.__doc__ = f"Check your ``{exercise.name}`` (chapter {exercise.chapter}: {exercise.title})."
    return checker


def all_exercises() -> list[Exercise]:
    """Every registered exercise, in chapter order."""
    return sorted(_REGISTRY.values(), key=lambda e: (e.chapter, e.name))
