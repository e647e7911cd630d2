"""What an engine call did: forwards, rows, time inside the model, preemptions.

``Engine.stats`` sums them over calls: ``forwards`` batched block steps (a step that
prefills runs the prefill in a second model call, counted in ``model_calls``); ``row_forwards``
request-rows over all forwards; ``rows_per_forward`` their ratio; ``wasted_row_forwards``
row-forwards of preempted runs (recomputed); ``forward_seconds`` wall time inside model calls (CPU
only: on CUDA timing them would need a device sync per call, so it stays 0) and
``forward_fraction`` its share of the engine's time (what ``tracerl bench generate`` calls
forward_fraction: the rest is scheduling and per-request bookkeeping); ``slot_occupancy`` =
(row_forwards - wasted_row_forwards) / (forwards * max_running), the share of the batch slots
that did useful work (1.0 = every forward ran full; the last requests of a call run with the
slots of finished ones empty).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    seconds: float = 0.0
    forward_seconds: float = 0.0
    forwards: int = 0
    model_calls: int = 0
    row_forwards: int = 0
    wasted_row_forwards: int = 0
    query_tokens: int = 0  # query columns over all forwards (padding excluded)
    cached_row_forwards: int = 0  # full attention: row-forwards against a prefix / dual cache
    preemptions: int = 0
    requests: int = 0
    new_tokens: int = 0
    max_running: int = 1

    @property
    def rows_per_forward(self) -> float:
        return self.row_forwards / self.forwards if self.forwards else 0.0

    @property
    def forward_fraction(self) -> float:
        return self.forward_seconds / self.seconds if self.seconds else 0.0

    @property
    def slot_occupancy(self) -> float:
        if not self.forwards:
            return 0.0
        return (self.row_forwards - self.wasted_row_forwards) / (self.forwards * self.max_running)
