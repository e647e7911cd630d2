"""Continuous batching for block-attention diffusion LMs, with ``generate``'s exact outputs.

``generate`` decodes a static batch: every row waits for the slowest, and a finished row's slot
stays empty.  The engine keeps up to ``max_running`` requests in flight and refills a slot at
the next block step after a request finishes, each request at its own block, its committed
blocks in a shared paged KV cache.  A request's output is a function of the model, its prompt,
its config and its seed only, as with ``generate``: the same tokens, step map, nfe, finish reason
and tail, whatever else runs, and after a preemption too.

Stats (``Engine.stats``, summed over calls): ``forwards`` batched block steps (a step that
prefills runs the prefill in a second model call, counted in ``model_calls``); ``row_forwards``
request-rows over all forwards; ``rows_per_forward`` their ratio; ``wasted_row_forwards``
row-forwards of preempted runs (recomputed); ``forward_seconds`` wall time inside model calls and
``forward_fraction`` its share of the engine's time (what ``tracerl bench generate`` calls
forward_fraction: the rest is scheduling and per-request bookkeeping); ``slot_occupancy`` =
(row_forwards - wasted_row_forwards) / (forwards * max_running), the share of the batch slots
that did useful work (1.0 = every forward ran full; the last requests of a call run with the
slots of finished ones empty).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from tracerl.engine.kv_cache import CacheGeometry, PagedKVCache
from tracerl.engine.runner import Runner
from tracerl.engine.scheduler import Scheduler
from tracerl.engine.sequence import Sequence, Status, randomized
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.sampler import Generation, check_prompts, default_stop_ids
from tracerl.generation.seeds import check_seed_value, derive_seed


@dataclass
class EngineStats:
    seconds: float = 0.0
    forward_seconds: float = 0.0
    forwards: int = 0
    model_calls: int = 0
    row_forwards: int = 0
    wasted_row_forwards: int = 0
    query_tokens: int = 0  # query columns over all forwards (padding excluded)
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


class Engine:
    """``Engine(model, max_running=64, num_pages=... | budget_bytes=...)``.

    The page pool is made once when ``num_pages`` or ``budget_bytes`` is given; with neither,
    each ``generate`` call makes one large enough for its ``max_running`` largest requests at
    once (so that call never preempts).
    """

    def __init__(self, model, *, max_running: int = 64, num_pages: int | None = None,
                 budget_bytes: int | None = None) -> None:
        if not isinstance(max_running, int) or max_running < 1:
            raise ConfigError(f"max_running: must be an integer >= 1, got {max_running!r}")
        if num_pages is not None and budget_bytes is not None:
            raise ConfigError("num_pages, budget_bytes: give at most one of them")
        if model.spec.attention != "block":
            raise ConfigError(
                f"attention: the engine serves block-attention models only, the model has "
                f"{model.spec.attention!r} (use tracerl.generation.generate)"
            )
        self.model = model
        self.max_running = max_running
        self.cache = None
        if num_pages is not None or budget_bytes is not None:
            self.cache = PagedKVCache.for_model(model, num_pages=num_pages, budget_bytes=budget_bytes)
        self.stats = EngineStats(max_running=max_running)
        self.kv_bytes_per_token = CacheGeometry.from_model(model).bytes_per_token

    def generate(
        self, prompts: list[list[int]], configs: SamplingConfig | list[SamplingConfig] | None = None,
        seeds: list[int] | None = None,
    ) -> list[Generation]:
        """One ``Generation`` per prompt, in input order; request i equals
        ``generate(model, [prompts[i]], configs[i], seeds=[seeds[i]])``.

        Seeds follow ``generate``'s rule: ``seeds[i]``, else ``derive_seed(configs[i].seed, i)``
        when that config has a seed, else a fresh random seed.  A request that could not fit
        the pool even alone is refused (``ConfigError`` naming ``num_pages``) before any work."""
        t0 = time.perf_counter()
        seqs = self._requests(prompts, configs, seeds)
        cache = self.cache or PagedKVCache.for_model(
            self.model, num_pages=max(1, sum(sorted((s.num_blocks for s in seqs), reverse=True)[: self.max_running])),
        )
        for s in seqs:
            if s.num_blocks > cache.num_pages:
                raise ConfigError(
                    f"num_pages: request {s.rid} (prompt {len(s.prompt)} tokens + max_new_tokens "
                    f"{s.config.max_new_tokens}) needs up to {s.num_blocks} KV pages, the pool has "
                    f"{cache.num_pages}; raise num_pages / budget_bytes or lower max_new_tokens"
                )
        scheduler = Scheduler(cache, self.max_running)
        runner = Runner(self.model, cache)
        for s in seqs:
            scheduler.add(s)
        try:
            while not scheduler.idle():
                batch = scheduler.schedule()
                self.stats.query_tokens += runner.step(batch)
                self.stats.forwards += 1
                self.stats.row_forwards += len(batch)
                for s in batch:
                    if s.status is Status.FINISHED:
                        scheduler.retire(s)
        finally:  # an interrupted call must not leave pages held in a reused pool
            for s in list(scheduler.running):
                scheduler.retire(s)
        results = [s.to_generation(self.model) for s in seqs]
        self.stats.model_calls += runner.timer.forwards
        self.stats.forward_seconds += runner.timer.seconds
        self.stats.preemptions += scheduler.preemptions
        self.stats.wasted_row_forwards += scheduler.wasted_row_forwards
        self.stats.requests += len(seqs)
        self.stats.new_tokens += sum(len(r.response_ids) for r in results)
        self.stats.seconds += time.perf_counter() - t0
        return results

    def _requests(self, prompts, configs, seeds) -> list[Sequence]:
        model = self.model
        check_prompts(prompts, model)
        n = len(prompts)
        if configs is None or isinstance(configs, SamplingConfig):
            configs = [configs or SamplingConfig()] * n
        configs = list(configs)
        if len(configs) != n:
            raise ConfigError(f"configs: {len(configs)} configs for {n} prompts; pass one or one per prompt")
        if seeds is not None:
            if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
                raise ConfigError(f"seeds: must be a list of {n} integers (one per prompt), got {seeds!r}")
            seeds = [check_seed_value(v, f"seeds[{i}]") for i, v in enumerate(seeds)]
        tok = model.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        b = model.block_size
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731 (as generate's)
        out = []
        for i, (prompt, config) in enumerate(zip(prompts, configs)):
            config.validate()
            if config.block_size not in (None, b):
                raise ConfigError(
                    f"block_size: configs[{i}] asks for {config.block_size}, the engine's KV pages hold "
                    f"the model's block size {b} (leave block_size unset)"
                )
            seed = seeds[i] if seeds is not None else None
            if seed is None and randomized(config):
                seed = derive_seed(config.seed, i) if config.seed is not None else secrets.randbits(63)
            stops = config.stop_token_ids if config.stop_token_ids is not None else default_stop_ids(model)
            out.append(Sequence(
                i, prompt, config, seed, block_size=b, mask_id=model.mask_token_id, pad_id=pad_id,
                max_positions=model.max_positions, stop_ids=tuple(stops), device=model.device,
                stop_strings=config.stop, decode=decode,
            ))
        return out
