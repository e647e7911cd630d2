"""Coupled RL: like random masking, but every corruption is paired with its complement, so each
response token is a target exactly once per pair (lower-variance estimate; objectives/rl.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tracerl.errors import ConfigError
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.random_masking import MaskingOptions, RandomMasking


@dataclass
class CoupledOptions(MaskingOptions):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_high >= 1.0:
            raise ConfigError(f"noise_high: must be < 1 (the complement of a fully masked response is empty), "
                              f"got {self.noise_high}")


@register_algorithm
class Coupled(RandomMasking):
    name = "coupled"
    Options = CoupledOptions
    coupled = True
