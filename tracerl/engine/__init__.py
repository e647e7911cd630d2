"""Continuous-batching generation engine for block-diffusion LMs (paged KV cache, scheduler, runner)."""

from tracerl.engine.engine import Engine, EngineStats
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
from tracerl.engine.sequence import Sequence, Status

__all__ = [
    "Engine", "EngineStats", "Scheduler", "Sequence", "Status",
    "CacheGeometry", "KVCacheFullError", "PagedKVCache", "PagedView", "bytes_per_page", "pages_for_budget",
    "paged_block_mask",
]
