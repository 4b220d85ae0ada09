"""cl-lab: the helper package behind the continual-learning workbook.

Library here, story in the notebooks: ``data`` (datasets, task streams), ``models``, ``train`` (the loop
and its hooks), ``methods``, ``metrics``, ``plots``, ``widgets``, ``check`` (claims as asserts),
``probes`` and ``device``. ``lm`` (a tiny GPT-2 on a synthetic world of facts, and real models by name) needs
``transformers`` and is imported on its own: ``from cl_lab import lm``.
"""

from cl_lab import check, data, device, methods, metrics, models, plots, probes, train, widgets
from cl_lab.device import pick_device, seed_everything

__version__ = "0.1.0"
__all__ = ["check", "data", "device", "methods", "metrics", "models", "plots", "probes", "train", "widgets",
           "pick_device", "seed_everything"]
