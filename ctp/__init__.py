"""ctp: continual training of CLIP-style models with pseudo-text replay and distillation."""

from ctp import models as _models  # noqa: F401  registers the tiny presets with open_clip

__version__ = "0.1.0"
