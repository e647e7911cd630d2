"""Paged KV cache for continuous batching of block-diffusion LMs (block-causal attention).

Why a cache is exact.  With block attention (``model.spec.attention == "block"``) a token attends
every earlier block and its own block, never a later one.  Once a block is final (all its tokens
decoded), its keys and values can no longer change, so they can be computed once and reused, as
``BlockCacheDecoder`` (generation/decoders.py) does for a static batch.  The engine needs the same
for many sequences that each sit at their own point of decoding.

Layout.
* A **page** holds the keys and values of one diffusion block, ``block_size`` consecutive token
  positions, for every layer.  Each layer has a preallocated pool ``keys[layer]`` /
  ``values[layer]`` of shape ``(num_pages, block_size, kv_heads, head_dim)`` (the model's dtype
  and device; token-major, so a gathered page table is already the ``(B, L, heads, dim)`` layout
  attention reads through a transpose, without a second copy), and ``page_valid``
  ``(num_pages, block_size)`` says which slots hold a real token.
* Positions are absolute and start at 0 for every sequence (a sequence has no left padding: its
  token index p is its position p), so **page k of a sequence's page table holds positions
  [k*b, (k+1)*b)**.  A sequence's committed part is always whole pages: ``committed_length`` is a
  multiple of the block size, and gathering a page table in order puts position j at key column j.
* The prompt needs no special case.  Its full blocks are committed by the sequence's first
  forward (prefill); its tail shares the first denoising block, which is committed when it is
  final, like any other block.  Positions that hold no token (a last block cut short by the
  sequence's length limit) are committed as invalid slots and never attended.
* ``allocate`` may reserve pages ahead of time (a scheduler that wants admission to guarantee
  memory); ``view`` uses reserved pages first and takes free pages when none is left.

One forward.  Each sequence of the batch contributes its *query columns*: the blocks that are
final but not yet committed (prefill, or the block that just finished) followed by the block being
denoised, i.e. positions ``[committed_length, committed_length + n*b)``.  ``PagedKVCache.view``
gives every query block a page of the sequence (its next pages: reserved ones first, then free
ones) and returns a ``PagedView``, a transformers ``Cache`` for that one forward.  In every
attention layer ``update`` first writes the query's new keys/values into those pages, then
gathers each sequence's pages ``[0, committed + n)`` in one indexing copy and returns them as
``(B, kv_heads, P*b, head_dim)`` (P = the longest such table of the batch; shorter tables are
padded and the padding masked out); ``view.attention_mask()`` (``paged_block_mask``) is the
matching mask.  Writing before reading is what makes the query see its own block: the gathered
tensor already holds it, so there is no concatenation and no second copy.  ``commit(view,
n_blocks)`` then only marks the first ``n_blocks[i]`` query blocks of sequence i as committed;
the pages of the other query blocks (the block still being denoised) stay the sequence's, holding
provisional keys that the next forward overwrites.  This is the sampler's rule, "a finished block
is committed by the first forward of the next block", so committing costs no extra forward and
no copy.  With ``view(..., row_per_block=True)`` each query block is a batch row of its own
(``Lq`` = one block, no padding between queries of one and two blocks, and a mask that is a
broadcast of the key validity); a row sees the query blocks before it in its sequence because
every layer writes all query blocks before it reads any.

Why pages rather than one fixed slot of ``max_len`` columns per sequence.
* Pages are diffusion blocks, the unit in which keys become final, so a page is written once,
  whole, and never partly filled (except a sequence's last, length-capped block).
* A sequence holds memory only for what it has decoded so far (its committed blocks and the
  block being denoised), not for its maximum length, so more
  sequences fit; any free page fits any sequence, so there is no external fragmentation and no
  compaction.
* Preemption is ``free(seq_id)``: all its pages go back at once (the sequence is recomputed when
  it is resumed).
* Memory is accounted per page: ``bytes_per_page`` (from the model config) and ``usage()`` report
  bytes per token and what is in use.
The price is one gather per layer per forward (a copy of the batch's keys and values, the size
of what attention reads anyway).  With ``view(..., in_place=True)`` and the forward run inside
``models.attention.reading_keys_from(view)``, attention itself reads the pages
(``PagedView.attend``): rows are split into up to three groups of similar key length
(``key_length_groups``), each gathered and attended only as wide as its longest row, so short
rows are not padded to the longest (about half of one padded table on the engine benchmark).
A kernel reading pages in place would remove the gather without changing this layout or the mask.

Families.  The view reproduces the hidden states of the query columns exactly, whatever the
family.  A shifted family reads the logits of column s-1 for column s: for the first column of a
block that column lies in the previous block, so the engine keeps those logits from the forward
that committed it (``BlockCacheDecoder.carry``) or keeps the previous block in the query.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tracerl import masks
from tracerl.errors import ConfigError, TracerlError
from tracerl.models.attention import active_key_reader, dense_attention

if TYPE_CHECKING:
    from tracerl.models.model import DiffusionLM


class KVCacheFullError(TracerlError):
    """The page pool has fewer free pages than a request needs (nothing was changed).

    A scheduler catches it to preempt a sequence (``free``) and retry; ``needed`` / ``free`` /
    ``num_pages`` say by how much the pool fell short."""

    def __init__(self, message: str, *, needed: int, free: int, num_pages: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.num_pages = num_pages


# -- geometry and sizing --------------------------------------------------------------------


@dataclass(frozen=True)
class CacheGeometry:
    """What a page holds: ``num_layers`` x (keys, values) x ``(kv_heads, block_size, head_dim)``."""

    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config, block_size: int, dtype: torch.dtype) -> CacheGeometry:
        """From a transformers Llama/Qwen2/Qwen3 config (grouped-query attention aware)."""
        if block_size < 1:
            raise ConfigError(f"block_size: must be >= 1, got {block_size}")
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            # A sliding-window layer would need its own eviction rule; none of our checkpoints has one.
            raise ConfigError(
                f"layer_types: the paged KV cache supports only full_attention layers, got {sorted(kinds)}"
            )
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            block_size=int(block_size),
            dtype=dtype,
        )

    @classmethod
    def from_model(cls, model: DiffusionLM, block_size: int | None = None) -> CacheGeometry:
        if model.spec.attention != "block":
            raise ConfigError(
                f"attention: the paged KV cache is exact only for block attention, the model has "
                f"{model.spec.attention!r} (use a block-attention model or override attention='block')"
            )
        return cls.from_config(model.config, block_size or model.block_size, model.dtype)

    @property
    def page_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.kv_heads, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.block_size * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_page // self.block_size


def bytes_per_page(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page: layers * 2 (keys, values) * kv_heads * head_dim * block_size * dtype size."""
    return CacheGeometry.from_config(config, block_size, dtype).bytes_per_page


def pages_for_budget(budget_bytes: int, page_bytes: int) -> int:
    """How many whole pages fit in ``budget_bytes``; an error if not even one does."""
    pages = int(budget_bytes) // page_bytes
    if pages < 1:
        raise ConfigError(f"budget_bytes: {budget_bytes} bytes hold no page (one page is {page_bytes} bytes)")
    return pages


# -- the cache --------------------------------------------------------------------------------


@dataclass
class _Sequence:
    row: int  # its row of the cache's page-table array (``PagedKVCache._tables``)
    pages: list[int] = field(default_factory=list)  # page table: page k holds positions [k*b, (k+1)*b)
    committed: int = 0  # pages[:committed] are written; the rest are reserved


class PagedKVCache:
    """A pool of block-sized KV pages shared by all running sequences (see the module docstring).

    Sequence ids are any hashable values.  A sequence is registered by its first ``allocate``
    (``allocate(seq_id, 0)`` registers it without reserving anything) and forgotten by ``free``.
    """

    def __init__(self, geometry: CacheGeometry, num_pages: int, device: torch.device | str = "cpu") -> None:
        if int(num_pages) < 1:
            raise ConfigError(f"num_pages: must be >= 1, got {num_pages}")
        self.geometry = geometry
        self.num_pages = int(num_pages)
        self.device = torch.device(device)
        shape = (self.num_pages, *geometry.page_shape)
        # Zeros, not empty: a padded page slot is gathered and weighted by exactly 0 in attention,
        # and 0 * (uninitialised NaN) would still be NaN.
        self.keys = [torch.zeros(shape, dtype=geometry.dtype, device=self.device) for _ in range(geometry.num_layers)]
        self.values = [torch.zeros(shape, dtype=geometry.dtype, device=self.device) for _ in range(geometry.num_layers)]
        # Which slots hold a real token: host-side metadata (numpy), like the page tables, so a
        # view computes its masks on the host and copies them to the device once.
        self.page_valid = np.zeros((self.num_pages, geometry.block_size), dtype=bool)
        # The same memory with a page's slots as one opaque element: gathering (R, P) pages is a
        # gather of R*P elements, not of R*P*b booleans (7x faster).
        self._page_valid_words = self.page_valid.view(np.dtype((np.void, geometry.block_size))).reshape(-1)
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: hands out 0, 1, 2, ... first
        self._seqs: dict[Hashable, _Sequence] = {}
        # Every registered sequence's pages as a row of one int64 array (rows and columns grow by
        # doubling): a view builds its page index with one gather of rows, not a copy per row
        # (measured: the per-row copies were the largest part of making a view).  Entries past
        # a sequence's pages are stale; a view masks them.
        self._tables = np.zeros((8, 8), dtype=np.int64)
        self._free_rows = list(range(7, -1, -1))
        self._changes = 0  # commits and frees so far: a view made since the last one needs no re-check

    @classmethod
    def for_model(
        cls, model: DiffusionLM, *, num_pages: int | None = None, budget_bytes: int | None = None,
        block_size: int | None = None,
    ) -> PagedKVCache:
        """A pool on the model's device and dtype, sized in pages or in bytes (exactly one)."""
        if (num_pages is None) == (budget_bytes is None):
            raise ConfigError("num_pages, budget_bytes: give exactly one of them")
        geometry = CacheGeometry.from_model(model, block_size)
        if num_pages is None:
            num_pages = pages_for_budget(budget_bytes, geometry.bytes_per_page)
        return cls(geometry, num_pages, model.device)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"seq_id: unknown sequence {seq_id!r}; allocate(seq_id, 0) registers it") from None

    def page_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's pages in position order, committed first, then reserved."""
        return list(self._seq(seq_id).pages)

    def committed_blocks(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).committed

    def held_pages(self, seq_id: Hashable) -> int:
        """Pages in the sequence's table (committed, provisional and reserved)."""
        return len(self._seq(seq_id).pages)

    def committed_blocks_of(self, seq_ids: Sequence[Hashable]) -> list[int]:
        """``committed_blocks`` of each (registered) sequence, in one pass."""
        try:
            return [self._seqs[i].committed for i in seq_ids]
        except KeyError:
            return [self.committed_blocks(i) for i in seq_ids]  # names the unknown sequence

    def held_pages_of(self, seq_ids: Sequence[Hashable]) -> list[int]:
        """``held_pages`` of each sequence (0 for one not registered), in one pass."""
        seqs = self._seqs
        return [len(seqs[i].pages) if i in seqs else 0 for i in seq_ids]

    def committed_length(self, seq_id: Hashable) -> int:
        """Positions ``[0, committed_length)`` are in the cache (a multiple of the block size)."""
        return self._seq(seq_id).committed * self.block_size

    def _take(self, n: int, what: Callable[[], str]) -> list[int]:
        """``n`` free pages; ``what()`` names the taker in the error (built only on failure)."""
        if n > len(self._free):
            raise KVCacheFullError(
                f"num_pages: the KV cache pool is full: {what()} needs {n} pages, {len(self._free)} of "
                f"num_pages={self.num_pages} are free (raise num_pages / budget_bytes or free a sequence)",
                needed=n, free=len(self._free), num_pages=self.num_pages,
            )
        taken = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return taken

    def allocate(self, seq_id: Hashable, n_pages: int = 0) -> list[int]:
        """Reserve ``n_pages`` more pages at the end of the sequence's page table (registering the
        sequence if new); returns them.  All or nothing: ``KVCacheFullError`` leaves the pool as
        it was."""
        if n_pages < 0:
            raise ValueError(f"n_pages: must be >= 0, got {n_pages}")
        pages = self._take(n_pages, lambda: f"sequence {seq_id!r}")
        seq = self._seqs.get(seq_id)
        if seq is None:
            if not self._free_rows:
                rows = len(self._tables)
                self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)])
                self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
            seq = self._seqs[seq_id] = _Sequence(self._free_rows.pop())
        self._extend(seq, pages)
        return pages

    def _extend(self, seq: _Sequence, new: list[int]) -> None:
        """Append pages to a sequence's table (its list and its row of ``_tables``)."""
        held = len(seq.pages)
        seq.pages.extend(new)
        total = len(seq.pages)
        if total > self._tables.shape[1]:
            grown = np.zeros((len(self._tables), max(2 * self._tables.shape[1], total)), dtype=np.int64)
            grown[:, :self._tables.shape[1]] = self._tables
            self._tables = grown
        if len(new) == 1:  # the usual case (the next block's page): a scalar store, not a list conversion
            self._tables[seq.row, held] = new[0]
        else:
            self._tables[seq.row, held:total] = new

    def free(self, seq_id: Hashable) -> int:
        """Forget the sequence and return all its pages (committed and reserved) to the pool;
        returns how many.  Freed pages are not cleared: a page is fully rewritten, valid mask
        included, by the commit that next fills it."""
        seq = self._seqs.pop(seq_id, None)
        self._changes += 1
        if seq is None:
            raise ValueError(f"seq_id: unknown sequence {seq_id!r} (never allocated or already freed)")
        self._free.extend(reversed(seq.pages))
        self._free_rows.append(seq.row)
        return len(seq.pages)

    def sequence_kv(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's committed keys, values ``(kv_heads, committed_length, head_dim)`` and valid
        mask ``(committed_length,)`` of a sequence, in position order (inspection and tests)."""
        seq = self._seq(seq_id)
        idx = torch.tensor(seq.pages[: seq.committed], dtype=torch.long, device=self.device)
        b, h, d = self.geometry.page_shape

        def flat(pool: torch.Tensor) -> torch.Tensor:
            return pool[idx].reshape(len(idx) * b, h, d).transpose(0, 1)

        return flat(self.keys[layer]), flat(self.values[layer]), \
            torch.from_numpy(self.page_valid[seq.pages[: seq.committed]].reshape(-1)).to(self.device)

    def usage(self) -> dict:
        """Memory report: pages in use, committed tokens, bytes per page / per token
        (``reserved_pages``: held beyond the committed ones, provisional blocks included)."""
        reserved = sum(len(s.pages) - s.committed for s in self._seqs.values())
        committed = sum(s.committed for s in self._seqs.values())
        page_bytes = self.geometry.bytes_per_page
        return {
            "num_pages": self.num_pages,
            "used_pages": self.num_used,
            "free_pages": self.num_free,
            "reserved_pages": reserved,
            "sequences": len(self._seqs),
            "committed_tokens": committed * self.block_size,
            "bytes_per_page": page_bytes,
            "bytes_per_token": self.geometry.bytes_per_token,
            "pool_bytes": self.num_pages * page_bytes,
            "used_bytes": self.num_used * page_bytes,
        }

    # -- one forward -------------------------------------------------------------------------
    def view(
        self, seq_ids: Sequence[Hashable], query_blocks: Sequence[int] | int = 1,
        query_valid: torch.Tensor | np.ndarray | None = None, *, row_per_block: bool = False,
        in_place: bool = False,
    ) -> PagedView:
        """The cache of one forward over ``query_blocks[i]`` blocks of sequence ``seq_ids[i]``,
        starting at its committed length (see ``PagedView``; ``row_per_block``: each query block
        is a batch row of its own; ``in_place``: attention reads the pages itself, run the
        forward inside ``models.attention.reading_keys_from(view)``).  Every query block gets a
        page of its sequence (reserved pages first, then free ones); all or nothing:
        ``KVCacheFullError`` leaves the pool and every page table as they were."""
        return PagedView(self, seq_ids, query_blocks, query_valid, row_per_block=row_per_block, in_place=in_place)

    def _extend_tables(self, seqs: list[_Sequence], query_blocks: list[int]) -> None:
        short = [(s, s.committed + q - len(s.pages)) for s, q in zip(seqs, query_blocks)
                 if s.committed + q > len(s.pages)]
        if not short:
            return
        fresh = self._take(sum(n for _, n in short), lambda: f"a forward over {sum(query_blocks)} query blocks")
        for s, n in short:
            self._extend(s, fresh[:n])
            fresh = fresh[n:]

    def commit(self, view: PagedView, n_blocks: Sequence[int] | int) -> None:
        """After the forward of ``view``: the first ``n_blocks[i]`` query blocks of sequence i
        become committed (their pages already hold their keys); the pages of its later query
        blocks stay in its table with provisional keys, to be overwritten by its next forward.

        Commit only blocks whose tokens were final when the forward ran: their keys are exact
        only then."""
        if view.cache is not self:
            raise ValueError("view: made by another PagedKVCache")
        batch = len(view.seq_ids)
        n_blocks = [n_blocks] * batch if isinstance(n_blocks, int) else [int(n) for n in n_blocks]
        if len(n_blocks) != batch:
            raise ValueError(f"n_blocks: {len(n_blocks)} values for a view of {batch} sequences")
        if view.committed_done:
            raise ValueError("view: already committed (make a new view for the next forward)")
        if min(n_blocks) < 0 or any(n > q for n, q in zip(n_blocks, view.query_blocks)):
            sid, n, q = next((i, n, q) for i, n, q in zip(view.seq_ids, n_blocks, view.query_blocks) if not 0 <= n <= q)
            raise ValueError(f"n_blocks: {n} for sequence {sid!r}, whose query holds {q} blocks")
        if view.cache_changes != self._changes:  # something was committed or freed since the view
            for sid, seq, c in zip(view.seq_ids, view.sequences, view.start_blocks):
                if self._seqs.get(sid) is not seq or seq.committed != c:
                    raise ValueError(f"view: sequence {sid!r} changed (freed or committed) since the view was made")
        if any(n_blocks) and not view.written:
            raise ValueError("view: no forward has run through this view yet")
        for seq, n in zip(view.sequences, n_blocks):
            seq.committed += n
        self._changes += 1
        view.committed_done = True


# -- the per-forward view ---------------------------------------------------------------------


def paged_block_mask(
    query_positions: torch.Tensor, query_valid: torch.Tensor, key_valid: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Block-causal mask ``(B, 1, Lq, K)`` over key columns that are absolute positions 0..K-1.

    ``key_valid`` ``(B, K)`` is False for padded pages, empty slots and invalid query slots.  A
    query attends every valid key with ``block(key) <= block(query)``: its committed pages (all
    in earlier blocks) and its own query blocks up to its own.  A query row left with nothing to
    attend (padding) attends key column 0 so softmax sees no empty row; such rows are never read.
    """
    batch, keys = key_valid.shape
    key_pos = torch.arange(keys, device=query_positions.device).expand(batch, keys)
    allowed = masks.block_causal_mask(query_positions, block_size, key_positions=key_pos, key_valid=key_valid)
    allowed[..., 0] |= ~allowed.any(-1)
    return allowed


# What one more attention group costs on the CPU, in row x key-column units of padded attention:
# a group adds a query selection, two gathers, an SDPA call and an output copy per layer (about
# 50 us for the tiny presets), and one row-column of padded attention costs about 60 ns per layer
# (2 cores, AVX-512; measured on the mixed-length benchmark).
GROUP_OVERHEAD_COLUMNS = 1024


def key_length_groups(lengths: np.ndarray, overhead: int | None) -> list[np.ndarray]:
    """Rows (indices into ``lengths``, each row's key columns) split into at most three groups of
    similar length, each padded to its longest row, minimising ``sum(rows * longest) + overhead
    * groups`` (cut points over the rows sorted by length, all pairs at once).  ``overhead`` None:
    one group, every row in order.  When there are several groups, each lists its rows longest
    first (``PagedView._make_groups`` reads a group's width from its first row)."""
    n = len(lengths)
    if overhead is None or n < 2:
        return [np.arange(n)]
    order = np.argsort(-lengths, kind="stable")
    longest = lengths[order]  # descending: a group starting at sorted row c is padded to longest[c]
    cut, top = np.arange(1, n), longest[1:]
    one = n * longest[0] + overhead
    # Two groups [0, c), [c, n); three [0, c1), [c1, c2), [c2, n), costing c1*L0 + (c2-c1)*L[c1]
    # + (n-c2)*L[c2] + 3*overhead = first[c1] + L[c1]*c2 + last[c2].  More groups only when
    # strictly cheaper (each one is an extra attention call per layer).
    two = cut * longest[0] + (n - cut) * top + 2 * overhead
    first = cut * (longest[0] - top) + 3 * overhead
    three = np.multiply.outer(top, cut) + first[:, None] + ((n - cut) * top)[None, :] + _below_diagonal(n)
    best_two, best_three = int(two.argmin()), int(three.argmin())
    if two[best_two] < one and two[best_two] <= three.flat[best_three]:
        return [order[:best_two + 1], order[best_two + 1:]]  # slices: np.split costs 10x more
    if three.flat[best_three] < one:
        c1, c2 = divmod(best_three, n - 1)
        return [order[:c1 + 1], order[c1 + 1:c2 + 1], order[c2 + 1:]]
    return [np.arange(n)]


@functools.lru_cache(maxsize=8)
def _below_diagonal(n: int) -> np.ndarray:
    """``(n-1, n-1)`` costs that rule out c2 <= c1 in ``key_length_groups`` (a few batch sizes kept)."""
    c = np.arange(1, n)
    return np.where(c[None, :] > c[:, None], 0, np.iinfo(np.int64).max // 4)


class _PagedLayer(CacheLayerMixin):
    """One attention layer's entry point into the view (transformers calls ``update`` per layer)."""

    is_sliding = False

    def __init__(self, view: PagedView, layer: int) -> None:
        super().__init__()
        # A proxy, not a reference: a view and its layers would otherwise form a cycle, and each
        # forward's view (gather buffers included) and each call's page pool would wait for the
        # garbage collector (measured: 0.2 GB more peak memory on the engine benchmark).
        self.view, self.layer = weakref.proxy(view), layer
        self.is_initialized = True  # the pool is preallocated: nothing to initialise lazily

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.view._update(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.view.cached_columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.key_columns, 0

    def get_max_length(self) -> int:
        return -1


class PagedView(Cache):
    """The transformers ``Cache`` of one batched forward over paged sequences.

    Sequence i's query covers ``query_blocks[i]`` whole blocks from its committed length.  By
    default it is one batch row, and the batch is right-padded to the longest query; with
    ``row_per_block`` every query block is a row of its own (``Lq = block_size``, rows in
    sequence order, then block order), which needs no padding when queries differ in length and
    whose mask is a broadcast (below).  A later block's row still sees its sequence's earlier
    query blocks: every layer writes all query blocks into their pages before it gathers any
    row's keys (``_update``: ``_write``, then ``_gather`` or ``attend``).  Feed the model ``input_ids`` ``(R, Lq)`` (R rows),
    ``position_ids=view.query_positions``, ``attention_mask=view.attention_mask()`` and
    ``cache=view``; then call ``cache.commit(view, n_blocks)`` (per sequence).  ``query_valid``
    ``(R, Lq)`` (a boolean tensor or numpy array) marks query columns that hold no token (a block cut short by a length limit);
    columns past a row's query are always invalid.  Invalid columns get the position of the
    row's first query column, so padding never feeds the model a position past the real ones.
    Key column j of a row is position j of its sequence (its pages in order, up to the row's
    last query block).
    """

    def __init__(
        self, cache: PagedKVCache, seq_ids: Sequence[Hashable], query_blocks: Sequence[int] | int,
        query_valid: torch.Tensor | np.ndarray | None, row_per_block: bool = False, in_place: bool = False,
    ) -> None:
        seq_ids = tuple(seq_ids)
        if not seq_ids:
            raise ValueError("seq_ids: empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids: a sequence appears twice in one forward")
        batch, b, dev = len(seq_ids), cache.block_size, cache.device
        query_blocks = [query_blocks] * batch if isinstance(query_blocks, int) else [int(q) for q in query_blocks]
        if len(query_blocks) != batch or min(query_blocks) < 1:
            raise ValueError(f"query_blocks: one count >= 1 per sequence, got {query_blocks} for {batch} sequences")
        seqs = [cache._seq(sid) for sid in seq_ids]
        cache._extend_tables(seqs, query_blocks)

        self.cache = cache
        self.seq_ids = seq_ids
        self.sequences = seqs
        self.cache_changes = cache._changes
        self.query_blocks = query_blocks
        self.start_blocks = [s.committed for s in seqs]
        self.committed_done = False
        self.written = False
        self.cached_columns = max(self.start_blocks) * b  # committed keys of the longest table
        # Rows: their first query block (absolute block index) and number of query
        # blocks, as Python lists (a few dozen values: cheaper than a dozen small numpy calls).
        if row_per_block:
            row_first = [c + k for c, n in zip(self.start_blocks, query_blocks) for k in range(n)]
            row_blocks = [1] * len(row_first)
        else:
            row_first, row_blocks = self.start_blocks, query_blocks
        rows = len(row_first)
        lq = (1 if row_per_block else max(query_blocks)) * b
        if query_valid is not None and tuple(query_valid.shape) != (rows, lq):
            raise ValueError(f"query_valid: shape {tuple(query_valid.shape)}, expected {(rows, lq)}")
        row_end = [f + n for f, n in zip(row_first, row_blocks)]  # a row's table: its pages up to its last query block
        pages = max(row_end)
        self.key_columns = pages * b
        self.in_place = in_place
        self.mask: torch.Tensor | None = None  # attention_mask(), the object a key reader answers to
        self._mask_host: np.ndarray | None = None  # a one-block mask (R, K) on the host
        self.attended = 0  # layers that attended through attend() (in_place: one per layer)
        self._groups: list | None = None

        # Page index (R, P): each row's table up to its last query block; padded slots point at
        # page 0 and are masked out via key_valid.
        row_first, row_blocks, row_end = np.array((row_first, row_blocks, row_end), dtype=np.int64)
        table_rows = [s.row for s in seqs]
        if row_per_block:
            table_rows = np.repeat(table_rows, query_blocks)
        filled = np.arange(pages)[None, :] < row_end[:, None]
        index = cache._tables[table_rows, :pages]
        index *= filled
        self._index_host = index
        self.page_index = torch.from_numpy(index).to(dev)
        self._row_pages = row_end
        # Query validity (structural: the row's blocks, and query_valid) and positions, on the host.
        self._one_block = lq == b
        if query_valid is not None:
            query_valid = query_valid.cpu().numpy() if isinstance(query_valid, torch.Tensor) else query_valid
        if self._one_block:  # every column is in its row's block
            structural = np.ones((rows, lq), dtype=bool)
        else:
            structural = np.arange(lq)[None, :] < (row_blocks * b)[:, None]
        if query_valid is not None:
            structural &= query_valid
        first = (row_first * b)[:, None]
        positions = np.where(structural, first + np.arange(lq), first)
        # Each query block's page, and its row and block within the row (what _write reads).
        if self._one_block:  # query block r is row r
            query_pages = index[np.arange(rows), row_first]
            cache.page_valid[query_pages] = structural
        else:
            block_row = np.repeat(np.arange(rows), row_blocks)
            block_in_row = np.arange(len(block_row)) - np.repeat(np.cumsum(row_blocks) - row_blocks, row_blocks)
            self._rows = torch.from_numpy(block_row).to(dev)
            self._blocks = torch.from_numpy(block_in_row).to(dev)
            query_pages = index[block_row, row_first[block_row] + block_in_row]
            cache.page_valid[query_pages] = structural.reshape(rows, lq // b, b)[block_row, block_in_row]
        # The query blocks' slots are (re)written by this forward: their validity above, the keys in _update.
        self._query_pages = torch.from_numpy(query_pages).to(dev)
        words = cache._page_valid_words
        key_valid = np.where(filled, words.take(index), np.zeros((), words.dtype)).view(bool).reshape(rows, pages * b)
        self._key_valid_host, self._query_valid_host = key_valid, structural
        self.query_valid = torch.from_numpy(structural).to(dev)
        self.query_positions = torch.from_numpy(positions).to(dev)
        self.key_valid = torch.from_numpy(key_valid).to(dev)

        self._buffers: dict = {}  # gather buffers by kind (and group), reused by every layer
        n_layers = cache.geometry.num_layers
        super().__init__(layers=[_PagedLayer(self, i) for i in range(n_layers)])

    def attention_mask(self) -> torch.Tensor:
        """The 4D boolean mask of this forward (``paged_block_mask``).  When every row is one
        block, each query column sees exactly its row's valid keys (its sequence's pages up to
        its own block; nothing later is in its table), so the mask is ``key_valid`` broadcast
        over the query axis, ``(R, 1, 1, K)``: the same numbers without the ``(R, 1, Lq, K)``
        tensor, and a cheaper SDPA on CPU."""
        if self.mask is None:
            if self._one_block:
                # A row with a valid query column sees at least that column's key; only rows
                # without one (padding) can have nothing to attend.  Without such rows the mask
                # is key_valid itself (no copy).
                allowed, mask = self._key_valid_host, self.key_valid
                has_query = self._query_valid_host.any(-1)
                if not has_query.all():
                    empty = ~has_query
                    allowed = allowed.copy()
                    allowed[empty, 0] |= ~allowed[empty].any(-1)
                    mask = torch.from_numpy(allowed).to(self.cache.device)
                self._mask_host = allowed
                self.mask = mask.view(mask.shape[0], 1, 1, mask.shape[1])
            else:
                self.mask = paged_block_mask(self.query_positions, self.query_valid, self.key_valid,
                                             self.cache.block_size)
        return self.mask

    def _update(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, lq = self.query_positions.shape
        if key_states.shape[0] != batch or key_states.shape[-2] != lq:
            raise ValueError(
                f"input_ids: the forward has {key_states.shape[0]} rows x {key_states.shape[-2]} columns, "
                f"the view expects {batch} x {lq} (query_positions.shape)"
            )
        self.written = True
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        self._write(keys, key_states)
        self._write(values, value_states)
        if self.in_place:  # attend() reads the pages; transformers passes these on untouched
            if active_key_reader() is not self:
                raise RuntimeError("PagedView(in_place=True): run the forward inside "
                                   "models.attention.reading_keys_from(view)")
            return key_states, value_states
        return self._gather(keys, key_states, "keys"), self._gather(values, value_states, "values")

    def _write(self, pool: torch.Tensor, new: torch.Tensor) -> None:
        """Write the query blocks ``new`` ``(R, H, Lq, D)`` into their pages."""
        lq, b = new.shape[2], self.cache.block_size
        if self._one_block:
            pool[self._query_pages] = new.transpose(1, 2).to(pool.dtype)
            return
        by_block = new.transpose(1, 2).unflatten(1, (lq // b, b))  # (R, nq, b, H, D)
        pool[self._query_pages] = by_block[self._rows, self._blocks].to(pool.dtype)

    def _gather(self, pool: torch.Tensor, new: torch.Tensor, kind: str) -> torch.Tensor:
        """Every row's pages as ``(R, H, P*b, D)`` (a transposed view of one gathered copy)."""
        return self._gather_pages(pool, self.page_index.reshape(-1), self.key_columns // self.cache.block_size,
                                  kind).to(new.dtype)

    def attend(self, module, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of ``query`` ``(R, heads, Lq, D)`` over the rows' pages, for an ``in_place``
        view (``models.attention.reading_keys_from``): ``(R, Lq, heads, D)``.

        Rows are attended in up to three groups of similar key length (``key_length_groups``),
        each gathering and attending only as many key columns as its longest row: on the
        mixed-length benchmark about half of a single padded table is padding."""
        if self._groups is None:
            self.plan_attention()
        self.attended += 1
        layer = module.layer_idx
        pools = self.cache.keys[layer], self.cache.values[layer]
        out = None
        for g, (rows, flat, mask, width) in enumerate(self._groups):
            keys, values = (self._gather_pages(pool, flat, width, (kind, g))
                            for kind, pool in zip(("keys", "values"), pools))
            part, _ = dense_attention(module, query if rows is None else query.index_select(0, rows),
                                      keys.to(query.dtype), values.to(query.dtype), mask, scaling=scaling)
            if rows is None:
                return part
            if out is None:
                out = part.new_empty((query.shape[0],) + part.shape[1:])
            out.index_copy_(0, rows, part)
        return out

    def plan_attention(self) -> None:
        """Split the rows into key-length groups for ``attend`` (host work, done before the
        forward so that it is not timed as model time; ``attend`` does it if nobody did)."""
        self._groups = self._make_groups(self.cache.device)

    def _make_groups(self, device) -> list:
        """Per group: its rows (None: all, in order), flat page index, mask and width in pages,
        cut from the host copies of the page index and of a one-block mask."""
        b = self.cache.block_size
        mask = self.attention_mask()
        overhead = GROUP_OVERHEAD_COLUMNS if device.type == "cpu" else None
        groups = key_length_groups(self._row_pages * b, overhead)
        if len(groups) == 1:
            return [(None, self.page_index.reshape(-1), mask, self.key_columns // b)]
        made = []
        for rows in groups:
            width = int(self._row_pages[rows[0]])  # a group's first row is its longest
            at = torch.from_numpy(rows).to(device)
            flat = torch.from_numpy(self._index_host[rows, :width].reshape(-1)).to(device)
            if self._mask_host is not None:
                part = torch.from_numpy(self._mask_host[rows, : width * b]).to(device)[:, None, None, :]
            else:
                part = mask.index_select(0, at)[..., : width * b]
            made.append((at, flat, part, width))
        return made

    def _gather_pages(self, pool: torch.Tensor, flat: torch.Tensor, width: int, key) -> torch.Tensor:
        """Pages ``flat`` (rows x ``width`` of them) as ``(rows, kv_heads, width*b, D)``: index_select
        into one buffer per ``key`` (kind, group), reused by every layer, since a layer has
        attended before the next one gathers (3x faster than pool[index])."""
        buffer = self._buffers.get(key)
        if buffer is None or torch.is_grad_enabled():
            buffer = self._buffers[key] = pool.new_empty((len(flat),) + tuple(pool.shape[1:]))
        torch.index_select(pool, 0, flat, out=buffer)
        b, heads, dim = pool.shape[1:]
        return buffer.view(len(flat) // width, width * b, heads, dim).transpose(1, 2)

    # A view lives for one forward; the pool changes only through PagedKVCache.
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedView: the pool changes only through PagedKVCache.commit / free")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("PagedView: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("PagedView: make a new view for another batch")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("PagedView: make a new view for another batch")

    def reset(self):
        raise NotImplementedError("PagedView: the pool changes only through PagedKVCache.commit / free")
