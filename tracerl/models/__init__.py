"""Model families, checkpoint loading/saving and the tiny presets."""

from tracerl.models.family import FAMILIES, DiffusionSpec
from tracerl.models.loading import load_model
from tracerl.models.model import DiffusionLM, check_finite
from tracerl.models.presets import PRESETS, build_preset

__all__ = ["FAMILIES", "PRESETS", "DiffusionLM", "DiffusionSpec", "build_preset", "check_finite", "load_model"]
