"""Keys and values of the running requests by slot, read in place by the block step's forward.

Why.  Every block step runs the current block of every running request against its committed
keys.  Read from the page pool (kv_cache.py), each layer first gathers every row's pages into one
padded tensor, a copy of everything attention reads: 10-15% of the engine's time on CPU
(docs/results.md).  Here slot i of the ``StatePool`` (kept compact: the running requests hold
slots ``0..n-1``) owns row i of ``columns`` positions per layer, so the keys of the step's
``n`` rows are a strided view and attention reads them where they are.  The price is a second
copy of the running requests' keys: ``2 x slots`` rows (spare rows below) as wide as the longest
running request.

One forward per step.  A request whose block just became final must commit it: its keys are
exact only now, and its current block attends them.  Its final block runs as an extra batch row
``n + j`` (so no row is padded to two blocks): each layer copies the request's committed keys
into that spare row, and writes the final block's new keys both there and into the request's own
slot row, where its current-block row reads them in the same layer.  Afterwards ``store`` copies
the committed blocks into their pages, which stay the record (admission, preemption, prefill
forwards through ``PagedView``, then ``load`` into the rows).  Columns a row has not filled (past
its block, a spare row's or a previous request's leftovers) are masked out; they are finite
(zeros or old keys), so their weight is exactly 0.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tracerl.engine.kv_cache import PagedKVCache, paged_block_mask


class SlotKV:
    """Per layer ``keys`` / ``values`` of shape ``(2 * slots, columns, kv_heads, head_dim)``:
    a row per slot, then as many spare rows for the final blocks of a step."""

    def __init__(self, cache: PagedKVCache, slots: int) -> None:
        g = cache.geometry
        self.cache = cache
        self.block_size = g.block_size
        self.columns = 0
        shape = (2 * slots, 0, g.kv_heads, g.head_dim)
        self.keys = [torch.zeros(shape, dtype=g.dtype, device=cache.device) for _ in range(g.num_layers)]
        self.values = [torch.zeros(shape, dtype=g.dtype, device=cache.device) for _ in range(g.num_layers)]

    def reserve(self, columns: int) -> None:
        """Rows of at least ``columns`` positions (whole blocks, so a page maps to one (row,
        block)).  They grow by doubling as longer requests run, so memory follows the longest
        running request rather than the longest possible one (a server's context)."""
        if columns <= self.columns:
            return
        b = self.block_size
        width = -(-max(columns, 2 * self.columns) // b) * b
        for rows in (self.keys, self.values):
            for i, old in enumerate(rows):
                rows[i] = old.new_zeros((old.shape[0], width) + tuple(old.shape[2:]))
                rows[i][:, : self.columns] = old
        self.columns = width

    def _pairs(self):
        return zip(self.keys + self.values, self.cache.keys + self.cache.values)

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Follow ``StatePool.compact``: a request moved from slot ``a`` to ``b`` takes its row."""
        if moves:
            src, dst = (torch.tensor(x, device=self.cache.device) for x in zip(*moves))
            for rows in self.keys + self.values:
                rows[dst] = rows[src]

    def load(self, slots: list[int], first_blocks: list[int], pages: list[list[int]]) -> None:
        """Copy ``pages[i]`` (committed pages of slot ``slots[i]``, blocks from ``first_blocks[i]``
        on) from the page pool into the slots' rows."""
        rows, blocks, index = self._blocks(slots, first_blocks, pages)
        for mirror, pool in self._pairs():
            mirror.unflatten(1, (-1, self.block_size))[rows, blocks] = pool[index]

    def store(self, slots: list[int], first_blocks: list[int], pages: list[list[int]]) -> None:
        """The reverse of ``load``: the slots' committed blocks into their pages."""
        rows, blocks, index = self._blocks(slots, first_blocks, pages)
        for mirror, pool in self._pairs():
            pool[index] = mirror.unflatten(1, (-1, self.block_size))[rows, blocks]
        self.cache.page_valid[index] = True  # a final block is whole: one reaching the end finishes instead

    def _blocks(self, slots, first_blocks, pages):
        dev = self.cache.device
        rows = torch.tensor([s for s, p in zip(slots, pages) for _ in p], device=dev)
        blocks = torch.tensor([f + k for f, p in zip(first_blocks, pages) for k in range(len(p))], device=dev)
        return rows, blocks, torch.tensor([q for p in pages for q in p], device=dev)

    def view(self, blocks: list[int], ends: list[int], final: list[tuple[int, int, int]]) -> SlotView:
        return SlotView(self, blocks, ends, final)


class _SlotLayer(CacheLayerMixin):
    """One attention layer's entry point into the view (transformers calls ``update`` per layer)."""

    is_sliding = False

    def __init__(self, view: SlotView, layer: int) -> None:
        super().__init__()
        self.view, self.layer = view, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        v = self.view
        return (v._write_and_read(v.slot_kv.keys[self.layer], key_states),
                v._write_and_read(v.slot_kv.values[self.layer], value_states))

    def get_seq_length(self) -> int:
        return self.view.cached_columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.key_columns, 0

    def get_max_length(self) -> int:
        return -1


class SlotView(Cache):
    """The ``Cache`` of one forward: rows ``0..n-1`` run the current block ``blocks[i]`` of slot
    i; rows ``n + j`` run the final block ``final[j] = (slot, block, end)``.  Feed the model
    ``position_ids=view.query_positions``, ``attention_mask=view.attention_mask()``."""

    def __init__(self, slot_kv: SlotKV, blocks: list[int], ends: list[int],
                 final: list[tuple[int, int, int]]) -> None:
        dev, b = slot_kv.cache.device, slot_kv.block_size
        self.slot_kv = slot_kv
        n = len(blocks)
        final_slots = [f[0] for f in final]
        blocks = blocks + [f[1] for f in final]
        self.rows = len(blocks)
        self.key_columns = (max(blocks) + 1) * b
        self.cached_columns = self.key_columns - b
        self._final = slice(n, self.rows)
        self._final_slots = torch.tensor(final_slots, device=dev, dtype=torch.long)
        # Where each query block is written: its own row, and a final block also its slot's row.
        self._write_rows = torch.tensor(list(range(self.rows)) + final_slots, device=dev)
        self._write_blocks = torch.tensor(blocks + blocks[n:], device=dev)
        self._write_from = torch.tensor(list(range(self.rows)) + list(range(n, self.rows)), device=dev)
        start = torch.tensor(blocks, device=dev)[:, None] * b
        cols = start + torch.arange(b, device=dev)
        ends_t = torch.tensor(ends + [f[2] for f in final], device=dev)[:, None]
        self.query_valid = cols < ends_t
        self.query_positions = torch.where(self.query_valid, cols, start)
        keys = torch.arange(self.key_columns, device=dev)
        self.key_valid = (keys < start + b) & (keys < ends_t)
        super().__init__(layers=[_SlotLayer(self, i) for i in range(len(slot_kv.keys))])

    def attention_mask(self) -> torch.Tensor:
        return paged_block_mask(self.query_positions, self.query_valid, self.key_valid, self.slot_kv.block_size)

    def _write_and_read(self, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Copy the final blocks' committed keys into their spare rows, write the query blocks
        ``new`` ``(B, H, b, D)``, then return rows ``0..B-1`` as ``(B, H, K, D)``, a view."""
        k = rows[:, : self.key_columns]
        if len(self._final_slots):
            k[self._final] = k.index_select(0, self._final_slots)
        rows.unflatten(1, (-1, self.slot_kv.block_size))[self._write_rows, self._write_blocks] = \
            new.transpose(1, 2)[self._write_from].to(rows.dtype)
        return k[: self.rows].transpose(1, 2).to(new.dtype)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlotView: one forward's cache")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("SlotView: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("SlotView: one forward's cache")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("SlotView: one forward's cache")

    def reset(self):
        raise NotImplementedError("SlotView: one forward's cache")
