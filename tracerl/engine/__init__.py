"""Continuous-batching generation engine for diffusion LMs (paged KV cache, scheduler, runners, canvases)."""

from tracerl.engine.engine import Engine, engine_serves
from tracerl.engine.kv_cache import (
    CacheGeometry,
    KVCacheFullError,
    PagedKVCache,
    PagedView,
    bytes_per_page,
    pages_for_budget,
    paged_block_mask,
)
from tracerl.engine.scheduler import Scheduler
from tracerl.engine.sequence import Sequence, Status, make_requests
from tracerl.engine.stats import EngineStats

__all__ = [
    "Engine", "engine_serves", "EngineStats", "Scheduler", "Sequence", "Status", "make_requests",
    "CacheGeometry", "KVCacheFullError", "PagedKVCache", "PagedView", "bytes_per_page", "pages_for_budget",
    "paged_block_mask",
]
