"""Continuous batching for diffusion LMs, with ``generate``'s exact outputs.

``generate`` decodes a static batch: every row waits for the slowest, and a finished row's slot
stays empty.  The engine keeps up to ``max_running`` requests in flight and refills a slot at
the next block step after a request finishes, each request at its own block.  A request's output
is a function of the model, its prompt, its config and its seed only, as with ``generate``: the
same tokens, step map, nfe, finish reason and tail, whatever else runs, and after a preemption too.

Block attention (block and shifted families): committed blocks live in a shared paged KV cache
(kv_cache.py), the scheduler admits and preempts by pages (scheduler.py), the runner batches
every request's current block into one forward (runner.py).  Full attention (LLaDA-like): no
exact cache exists, so requests are whole canvases (canvas.py), with no cache or Fast-dLLM's
prefix / dual caches per request.  The step loop itself (loop.py) is shared with the server.
Stats: ``EngineStats`` (stats.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tracerl.engine.canvas import CanvasSequence
from tracerl.engine.kv_cache import CacheGeometry, PagedKVCache
from tracerl.engine.loop import BlockLoop, CanvasLoop
from tracerl.engine.sequence import Status, make_requests
from tracerl.engine.state import request_slots
from tracerl.engine.stats import EngineStats
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import Generation


def engine_serves(model, config: SamplingConfig) -> str | None:
    """None when ``Engine`` decodes ``config`` on ``model``; else why not (``generate`` then
    gives the same outputs).  Block attention needs the model's own block size: a KV page holds
    one model block."""
    if model.spec.attention == "block" and config.block_size not in (None, model.block_size):
        return f"block_size {config.block_size} differs from the model's {model.block_size}"
    return None


class Engine:
    """``Engine(model, max_running=64, num_pages=... | budget_bytes=...)``.

    Block attention: the page pool is made once when ``num_pages`` or ``budget_bytes`` is
    given; with neither, each ``generate`` call makes one large enough for its ``max_running``
    largest requests at once (so that call never preempts).  Full attention has no page pool
    (each request holds at most its own prefix / dual cache).
    """

    def __init__(self, model, *, max_running: int = 64, num_pages: int | None = None,
                 budget_bytes: int | None = None) -> None:
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            raise ConfigError(f"max_running: must be an integer >= 1, got {max_running!r}")
        if num_pages is not None and budget_bytes is not None:
            raise ConfigError("num_pages, budget_bytes: give at most one of them")
        self.model = model
        self.max_running = max_running
        self.paged = model.spec.attention == "block"
        self.cache = None
        if not self.paged and (num_pages is not None or budget_bytes is not None):
            raise ConfigError("num_pages, budget_bytes: full-attention models have no KV page pool (leave them unset)")
        if num_pages is not None or budget_bytes is not None:
            self.cache = PagedKVCache.for_model(model, num_pages=num_pages, budget_bytes=budget_bytes)
        self.stats = EngineStats(max_running=max_running)
        self.kv_bytes_per_token = CacheGeometry.from_model(model).bytes_per_token if self.paged else 0

    def generate(
        self, prompts: list[list[int]], configs: SamplingConfig | list[SamplingConfig] | None = None,
        seeds: list[int] | None = None, *, progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """One ``Generation`` per prompt, in input order; request i equals
        ``generate(model, [prompts[i]], configs[i], seeds=[seeds[i]])``.  ``progress(1)`` is
        called as each request finishes (a progress bar's advance).

        Seeds follow ``generate``'s rule: ``seeds[i]``, else ``derive_seed(configs[i].seed, i)``
        when that config has a seed, else a fresh random seed.  A request that could not fit
        the pool even alone is refused (``ConfigError`` naming ``num_pages``) before any work."""
        t0 = time.perf_counter()
        if not self.paged:
            seqs = make_requests(self.model, prompts, configs, seeds, cls=CanvasSequence)
            loop = CanvasLoop(self.model, request_slots(seqs, self.max_running, self.model.device), self.max_running,
                              self.stats)
        else:
            seqs = make_requests(self.model, prompts, configs, seeds)
            b = self.model.block_size
            for s in seqs:
                if s.config.block_size not in (None, b):
                    raise ConfigError(
                        f"block_size: configs[{s.rid}] asks for {s.config.block_size}, the engine's KV pages hold "
                        f"the model's block size {b} (leave block_size unset)"
                    )
            cache = self.cache or PagedKVCache.for_model(
                self.model,
                num_pages=max(1, sum(sorted((s.num_blocks for s in seqs), reverse=True)[: self.max_running])),
            )
            for s in seqs:
                check_fits(s, cache)
            loop = BlockLoop(self.model, cache, request_slots(seqs, self.max_running, self.model.device),
                             self.max_running, self.stats)
        for s in seqs:
            loop.add(s)
        try:
            while not loop.idle():
                for s in loop.step():
                    if s.status is Status.FINISHED and progress is not None:
                        progress(1)
        finally:  # an interrupted call must not leave pages held in a reused pool
            loop.close()
        self.stats.seconds += time.perf_counter() - t0
        return [s.to_generation(self.model) for s in seqs]


def check_fits(seq, cache: PagedKVCache) -> None:
    """A request the pool could not hold even alone is refused before any work (the scheduler's
    no-deadlock rule assumes every admitted request fits alone)."""
    if seq.num_blocks > cache.num_pages:
        raise ConfigError(
            f"num_pages: request {seq.rid} (prompt {len(seq.prompt)} tokens + max_new_tokens "
            f"{seq.config.max_new_tokens}) needs up to {seq.num_blocks} KV pages, the pool has "
            f"{cache.num_pages}; raise num_pages / budget_bytes or lower max_new_tokens"
        )
