"""How the sampler gets logits for the block being denoised: the forward strategies.

All decoders work on the shared column layout of ``Canvas`` (sampler.py): every row's blocks
start at the same columns, padding columns are invalid keys, and position ids are absolute
token positions.  ``logits(s, e)`` returns, for each column c in [s, e), the logits that predict
the token at c (shifted families read them at c - 1).

* ``BlockCacheDecoder``: exact KV cache for block-causal attention.  Finished columns are
  committed to the cache by the first forward of the next block (prompt prefill included):
  that forward runs ``[uncommitted finished columns | current block]``, the cache is then
  cropped back to the block start, so committing costs no extra forward.  Later steps of the
  block run only the block against the cache.
* ``FullForwardDecoder``: no cache; every step runs the whole visible sequence (exact reference).
* ``PrefixCacheDecoder`` / ``DualCacheDecoder``: Fast-dLLM's approximate caches for
  bidirectional attention (arXiv 2505.22618): at a block's first step one full forward refreshes
  the cache of everything before the block (prefix) or outside the block (dual); later steps
  reuse it although the current block's tokens have changed since.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from tracerl import masks

if TYPE_CHECKING:
    from tracerl.generation.sampler import Canvas
    from tracerl.models.model import DiffusionLM


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` cached columns (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class ForwardTimer:
    """Wall time spent inside model forwards (for the sampler-overhead benchmark)."""

    def __init__(self, device: torch.device, *, sync: bool = True) -> None:
        self.seconds = 0.0
        self.forwards = 0
        # On CUDA a wall time needs a sync on each side; without ``sync`` (the engine's loop,
        # which must not stall the device) only forwards are counted there.
        self._cuda = device.type == "cuda"
        self._timed = not self._cuda or sync

    def __enter__(self):
        if self._timed:
            if self._cuda:
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._timed:
            if self._cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._t0
        self.forwards += 1


class Decoder:
    def __init__(self, model: DiffusionLM, canvas: Canvas, block_size: int) -> None:
        self.model = model
        self.canvas = canvas
        self.block_size = block_size
        self.shift = model.spec.logit_shift
        self.timer = ForwardTimer(model.device)

    def logits(self, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def _predictions(self, hidden: torch.Tensor, q0: int, s: int, e: int) -> torch.Tensor:
        """LM logits for columns [s, e) from hidden states of query columns starting at q0."""
        lo, hi = s - self.shift - q0, e - self.shift - q0
        logits = self.model.lm_logits(hidden[:, max(lo, 0):hi])
        return self._pad_front(logits, -lo) if lo < 0 else logits

    @staticmethod
    def _pad_front(logits: torch.Tensor, n: int) -> torch.Tensor:
        # Column 0 of a shifted model has no predictor; it always holds a prompt token, so these
        # placeholder logits are never sampled from.
        return torch.cat([logits.new_zeros(logits.shape[0], n, logits.shape[2]), logits], dim=1)


class FullForwardDecoder(Decoder):
    """Exact, no cache.  Block attention only needs columns < e (later blocks are invisible)."""

    def logits(self, s: int, e: int) -> torch.Tensor:
        c = self.canvas
        end = e if self.model.spec.attention == "block" else c.tokens.shape[1]
        pos, valid = c.positions[:, :end], c.valid[:, :end]
        mask = masks.mask_for_attention(self.model.spec.attention, pos, valid, self.block_size)
        with self.timer:
            hidden, _ = self.model.hidden_states(c.tokens[:, :end], attention_mask=mask, position_ids=pos)
            return self._predictions(hidden, 0, s, e)


class BlockCacheDecoder(Decoder):
    """Exact KV cache for block-causal attention (see module docstring)."""

    def __init__(self, model: DiffusionLM, canvas: Canvas, block_size: int) -> None:
        super().__init__(model, canvas, block_size)
        self.cache = DynamicCache()
        self.committed = 0  # columns [0, committed) are in the cache
        self.carry: torch.Tensor | None = None  # shifted families: logits of column s - 1

    def logits(self, s: int, e: int) -> torch.Tensor:
        c = self.canvas
        q0 = self.committed
        query_pos = c.positions[:, q0:e]
        mask = masks.block_causal_mask(
            query_pos, self.block_size, key_positions=c.positions[:, :e], key_valid=c.valid[:, :e]
        )
        with self.timer:
            hidden, self.cache = self.model.hidden_states(
                c.tokens[:, q0:e], attention_mask=mask, position_ids=query_pos,
                cache=self.cache, use_cache=True,
            )
            crop_cache(self.cache, s)  # keep finished columns, drop the block's provisional entries
            self.committed = s
            if self.shift and q0 < s:
                # Column s-1 lies in a finished block: its logits are final, keep them.
                self.carry = self.model.lm_logits(hidden[:, s - 1 - q0 : s - q0])
            if self.shift:
                inner = self.model.lm_logits(hidden[:, s - q0 : e - 1 - q0])
                if s == 0:  # column 0 is a prompt token: nothing predicts it
                    return self._pad_front(inner, 1)
                return torch.cat([self.carry, inner], dim=1)
            return self.model.lm_logits(hidden[:, s - q0 : e - q0])


class PrefixCacheDecoder(Decoder):
    """Approximate (Fast-dLLM prefix cache): prefix KV refreshed once per block."""

    def __init__(self, model: DiffusionLM, canvas: Canvas, block_size: int) -> None:
        super().__init__(model, canvas, block_size)
        self.block: tuple[int, int] | None = None
        self.cache: DynamicCache | None = None

    def _full_forward(self, s: int, e: int) -> torch.Tensor:
        c = self.canvas
        mask = masks.full_mask(c.tokens.shape[1], c.valid)
        hidden, cache = self.model.hidden_states(
            c.tokens, attention_mask=mask, position_ids=c.positions, cache=DynamicCache(), use_cache=True
        )
        self.cache = self._keep(cache, s)
        return self._predictions(hidden, 0, s, e)

    def _keep(self, cache: DynamicCache, s: int) -> DynamicCache:
        crop_cache(cache, max(s - self.shift, 0))  # column 0 has no predictor (prompt token)
        return cache

    def _query_columns(self, s: int, e: int) -> tuple[int, int]:
        return max(s - self.shift, 0), self.canvas.tokens.shape[1]

    def _key_valid(self, q0: int, q1: int) -> torch.Tensor:
        return self.canvas.valid  # prefix [0, q0) cached + query [q0, end)

    def logits(self, s: int, e: int) -> torch.Tensor:
        with self.timer:
            if self.block != (s, e):
                self.block = (s, e)
                return self._full_forward(s, e)
            c = self.canvas
            q0, q1 = self._query_columns(s, e)
            cached = self.cache.get_seq_length()
            mask = masks.full_mask(q1 - q0, self._key_valid(q0, q1))
            hidden, self.cache = self.model.hidden_states(
                c.tokens[:, q0:q1], attention_mask=mask, position_ids=c.positions[:, q0:q1],
                cache=self.cache, use_cache=True,
            )
            crop_cache(self.cache, cached)
            return self._predictions(hidden, q0, s, e)


class DualCacheDecoder(PrefixCacheDecoder):
    """Approximate (Fast-dLLM dual cache): KV of everything outside the block, refreshed per block.

    Attention is bidirectional and RoPE is applied before caching, so the cached keys may sit in
    any order: the cache holds [prefix | suffix] and the block's fresh keys are appended.
    """

    def _keep(self, cache: DynamicCache, s: int) -> DynamicCache:
        q0, q1 = self._query_columns(s, self.block[1])
        total = self.canvas.tokens.shape[1]
        outside = torch.cat([torch.arange(0, q0), torch.arange(q1, total)]).to(self.canvas.tokens.device)
        self._outside = outside
        layers = [(layer.keys.index_select(-2, outside), layer.values.index_select(-2, outside))
                  for layer in cache.layers]
        return DynamicCache(layers)

    def _query_columns(self, s: int, e: int) -> tuple[int, int]:
        return max(s - self.shift, 0), e  # shifted: column s-1 predicts s; the block stays fresh

    def _key_valid(self, q0: int, q1: int) -> torch.Tensor:
        valid = self.canvas.valid
        return torch.cat([valid[:, self._outside], valid[:, q0:q1]], dim=1)


def make_decoder(model: DiffusionLM, canvas: Canvas, block_size: int, use_cache: bool, full_cache: str) -> Decoder:
    if model.spec.attention == "block":
        return BlockCacheDecoder(model, canvas, block_size) if use_cache else FullForwardDecoder(model, canvas, block_size)
    if not use_cache or full_cache == "none":
        return FullForwardDecoder(model, canvas, block_size)
    if full_cache == "prefix":
        return PrefixCacheDecoder(model, canvas, block_size)
    return DualCacheDecoder(model, canvas, block_size)
