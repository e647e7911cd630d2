"""TraceRL (arXiv 2509.06949): train on the decoding trajectory the sampler took.  Rows are the
trace rounds (objectives/rows.py ``build_trace_rows``): in round r every block masks the tokens
from its r-th (shrunk) step on and targets that step's tokens, so each response token is a target
exactly once, in the state the sampler saw it.  The only method whose targets are the trace
steps, hence the one that can use the diffusion value model."""

from __future__ import annotations

from dataclasses import dataclass

from tracerl.errors import ConfigError
from tracerl.objectives import build_trace_rows
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.base import Algorithm


@dataclass
class TraceOptions:
    shrink: int = 1  # merge this many consecutive trace steps per round (fewer forwards)

    def __post_init__(self) -> None:
        if self.shrink < 1:
            raise ConfigError(f"shrink: must be >= 1, got {self.shrink}")


@register_algorithm
class TraceRL(Algorithm):
    name = "tracerl"
    Options = TraceOptions
    value_model = "optional"

    def rows(self, model, examples, generator, *, block_size, pad_id):
        return build_trace_rows(model.spec, examples, shrink=self.options.shrink, block_size=block_size,
                                pad_id=pad_id)
