"""Random-masking RL: each kept response is corrupted ``mask_samples`` times at a random level
(one level per block for the block family, per row otherwise) and the masked tokens are the
targets, with weight ``1/mask_samples`` (objectives/rl.py).  Ignores the trajectory; the baseline
TraceRL is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from tracerl.errors import ConfigError
from tracerl.objectives import rl_rows
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.base import Algorithm


@dataclass
class MaskingOptions:
    mask_samples: int = 1  # corruptions per response
    noise_low: float = 0.1  # mask level drawn from U(noise_low, noise_high)
    noise_high: float = 0.9

    def __post_init__(self) -> None:
        if self.mask_samples < 1:
            raise ConfigError(f"mask_samples: must be >= 1, got {self.mask_samples}")
        if not 0.0 < self.noise_low <= self.noise_high <= 1.0:
            raise ConfigError(f"noise_low, noise_high: need 0 < noise_low <= noise_high <= 1, got "
                              f"{self.noise_low}, {self.noise_high}")


@register_algorithm
class RandomMasking(Algorithm):
    name = "random_masking"
    Options = MaskingOptions
    coupled = False  # also train each corruption's complement (objectives/rl.py)

    def rows(self, model, examples, generator, *, block_size, pad_id):
        o = self.options
        return rl_rows("coupled" if self.coupled else "random_masking", model.spec, examples, generator, block_size=block_size,
                       mask_samples=o.mask_samples, low=o.noise_low, high=o.noise_high, pad_id=pad_id)
