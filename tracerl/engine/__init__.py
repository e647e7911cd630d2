"""Continuous-batching generation engine for block-diffusion LMs (in progress: the KV cache)."""

from tracerl.engine.kv_cache import (
    CacheGeometry,
    KVCacheFullError,
    PagedKVCache,
    PagedView,
    bytes_per_page,
    pages_for_budget,
    paged_block_mask,
)

__all__ = [
    "CacheGeometry", "KVCacheFullError", "PagedKVCache", "PagedView", "bytes_per_page", "pages_for_budget",
    "paged_block_mask",
]
