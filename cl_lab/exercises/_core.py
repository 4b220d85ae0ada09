"""The exercise machinery: a registry, and checkers that test a learner's function property by property.

A chapter module defines, for each exercise, a stub (raises ``NotImplementedError``), a solution, the
plausible wrong answers the tests use, and a ``properties(fn)`` function that calls ``fn`` on small seeded
random inputs and calls ``expect`` once per property. ``register`` turns that into ``check_<name>(fn)``:

- in a notebook it never raises: an unsolved stub prints "not attempted yet", a wrong answer prints in red
  the property that failed (what was expected, what came back), a right answer prints one green line;
- with ``strict=True`` (the tests) every failure raises ``AssertionError`` with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cl_lab.check import GREEN, GREY, RED, RESET


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
