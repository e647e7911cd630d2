"""Diffusion sampling: one sampler core, pluggable unmasking rules, exact and approximate caches."""

from tracerl.generation.config import STRATEGIES, SamplingConfig
from tracerl.generation.sampler import Generation, GenerationStats, generate
from tracerl.generation.seeds import derive_seed

__all__ = ["STRATEGIES", "Generation", "GenerationStats", "SamplingConfig", "derive_seed", "generate"]
