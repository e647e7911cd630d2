"""RL: the run's config, the algorithm registry (rl/algorithms) and one generic step (rl/loop.py).
The ``tracerl rl`` command that drives them is tracerl/recipes/rl.py."""

from tracerl.rl.algorithms import Algorithm, algorithm_names, make_algorithm, register_algorithm
from tracerl.rl.config import PolicyConfig, RLConfig, RolloutConfig, ValueConfig

__all__ = ["Algorithm", "PolicyConfig", "RLConfig", "RolloutConfig", "ValueConfig", "algorithm_names",
           "make_algorithm", "register_algorithm"]
