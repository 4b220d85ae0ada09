"""Continual-learning methods, one module per family; each is a ``Method`` (see ``base``)."""

from cl_lab.methods.base import Context, Method, Naive

__all__ = ["Context", "Method", "Naive"]
