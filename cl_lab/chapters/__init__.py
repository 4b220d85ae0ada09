"""Each chapter's experiments as pure, tested functions: ``chNN`` serves ``notebooks/NN_*.ipynb``.

The library core (data, models, train, methods, metrics, …) lives one level up; a chapter module only
composes it into the runs, tables and figures its notebook shows.
"""
