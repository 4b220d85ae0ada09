"""Explanatory figures drawn in code: the structures behind the chapters (architectures, geometries, pipelines).

One module per chapter (``cl_lab.diagrams.ch06.prognn_columns()``, …); each function returns a matplotlib
``Figure`` and is tested like the plots. ``_draw`` holds the shared pieces (boxes, arrows, a blank canvas).
"""
