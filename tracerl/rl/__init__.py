"""The RL loop (TraceRL, random-masking and coupled RL, optional diffusion value model)."""

from tracerl.rl.trainer import PolicyConfig, RLConfig, RolloutConfig, ValueConfig, run_rl

__all__ = ["PolicyConfig", "RLConfig", "RolloutConfig", "ValueConfig", "run_rl"]
