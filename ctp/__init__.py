"""ctp: continual training of CLIP-style models with pseudo-text replay and distillation.

Importing the package imports nothing heavy (``ctp status`` and every ``--help`` stay fast);
``ctp.models`` registers the tiny presets with open_clip when it is imported, and every path
that builds a model imports it.
"""

__version__ = "0.1.0"
