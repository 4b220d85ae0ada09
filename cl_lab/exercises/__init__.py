"""Coding exercises that check themselves (ARENA's form): stubs in the chapters, checkers here.

In a chapter::

    def exact_fisher_diag(model, x): ...
    exercises.check_exact_fisher(exact_fisher_diag)   # prints what holds, or the property that failed

``exercises.all()`` lists every exercise (name, chapter, stub, solution, check, wrong answers). Each chapter's
exercises live in ``chNN.py``, which registers them with ``_core.register``; every ``check_*`` a chapter module
defines is importable from here.
"""

import importlib
import pkgutil

from cl_lab.exercises._core import Exercise, PropertyFailed, all_exercises, expect, register

all = all_exercises  # noqa: A001 - the name the chapters use: exercises.all()


def _import_chapters() -> list[str]:
    names = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("ch"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            for attr in dir(module):
                if attr.startswith("check_"):
                    globals()[attr] = getattr(module, attr)
                    names.append(attr)
    return names


__all__ = ["Exercise", "PropertyFailed", "all", "all_exercises", "expect", "register", *_import_chapters()]
