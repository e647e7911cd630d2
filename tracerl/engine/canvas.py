"""Continuous batching over whole canvases, for full-attention diffusion LMs.

Why there is no exact cache.  With full attention (``model.spec.attention == "full"``, LLaDA-like)
every token attends the whole canvas: the prompt and every response position, masked ones
included.  Unmasking any token changes the keys and values of every position at every layer
above the first, so nothing computed at one step is exact at the next, and the paged block cache
of the block-attention engine does not apply.  A request is therefore a *canvas*: its prompt
followed by ``min(max_new_tokens, context - len(prompt))`` response positions (``CanvasSequence``,
a ``Sequence`` whose tokens sit at their absolute positions, the last block possibly cut short),
denoised block by block exactly as ``tracerl.generation.sampler.generate`` denoises it alone: the
same block order, step quota, unmasking rules, per-request random stream (drawn from only on the
request's own forwards) and stop rule, and ``generate``'s full-attention tail (the never-decoded
masked positions after a stop, step 0).

One block step (``CanvasRunner.step``).  Every running canvas takes part; rows at different
phases run in separate batched model calls, each with the attention its request would see alone:

* full forward (``full_cache="none"`` at every step; ``prefix`` / ``dual`` at a request's first
  step of a block): the canvases are right-padded to the longest, positions are 0..n-1 per row,
  padded and past-the-end key columns are masked out (``masks.full_mask``), and the logits of each
  row's current block are read from its own columns.  For ``prefix`` / ``dual`` rows the forward
  also refreshes the request's own K/V cache, as ``PrefixCacheDecoder`` / ``DualCacheDecoder``
  (Fast-dLLM's approximate caches) do: ``prefix`` keeps the keys/values of the columns before the
  block, ``dual`` those of every column outside it.
* cached (``prefix`` / ``dual`` at the later steps of a block): ``prefix`` rows run the columns
  from the block start to the canvas end, ``dual`` rows only the block, against their cached
  keys/values.  Each request keeps its cache as one tensor ``(layers, 2, kv_heads, C, head_dim)``;
  a call pads and concatenates the caches of its rows (padding masked out), so a row attends only
  its own keys and gets the logits ``generate`` computes for it alone.  ``prefix`` and ``dual`` rows
  run in separate calls (their query lengths differ).

Shifted families (the logit at column c - 1 predicts token c) follow the decoders' rule in every
mode: the query starts one column earlier (``max(s - 1, 0)``) and column 0, a prompt token, gets
placeholder logits that are never sampled from.

The loop (``loop.CanvasLoop``, behind ``Engine.generate`` for full-attention models).  Up to ``max_running``
requests are in flight; a request that
finishes (stop token in a final block, or its canvas end) leaves after that block step and the
next waiting requests take its slot before the next step.  There is no shared memory pool (each
request holds at most one cache of its own canvas size), hence no preemption.  A request's output
is a function of the model, its prompt, its config and its seed only, never of ``max_running`` or
of what runs beside it.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from tracerl import masks
from tracerl.engine.runner import unmask
from tracerl.engine.sequence import Sequence
from tracerl.errors import ConfigError
from tracerl.generation.config import SamplingConfig
from tracerl.generation.decoders import ForwardTimer
from tracerl.generation.sampler import Generation

MODES = ("none", "prefix", "dual")


def cache_mode(config: SamplingConfig) -> str:
    """How ``generate`` runs a full-attention model under ``config`` (``make_decoder``'s rule)."""
    return "none" if not config.use_cache else config.full_cache


class CanvasSequence(Sequence):
    """A request's canvas: ``Sequence`` (tokens at absolute positions, masks, step map, random
    stream, ``apply``) plus its cache mode, its own approximate K/V cache and the full-attention
    tail in ``to_generation``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = cache_mode(self.config)
        if self.mode not in MODES:
            raise ConfigError(f"full_cache: unknown {self.mode!r}; valid: {', '.join(MODES)}")

    def reset(self) -> None:
        super().reset()
        self.kv: torch.Tensor | None = None  # (layers, 2, kv_heads, C, head_dim)
        self.kv_valid: torch.Tensor | None = None  # (C,) which cached columns hold a token

    def finish(self, reason: str) -> None:
        super().finish(reason)
        self.kv = self.kv_valid = None

    @property
    def columns(self) -> int:
        """Canvas columns: whole blocks, the last one possibly past ``end`` (invalid)."""
        return self.num_blocks * self.block_size

    def query_columns(self, shift: int) -> tuple[int, int]:
        """Columns a cached step runs (``PrefixCacheDecoder`` / ``DualCacheDecoder``)."""
        s = self.block_start
        q0 = max(s - shift, 0)
        return q0, (self.columns if self.mode == "prefix" else s + self.block_size)

    def to_generation(self, model) -> Generation:
        """``Sequence.to_generation`` with full attention's tail: after a stop, the positions of
        later blocks were visible to every forward, all masked (step 0), up to the canvas end."""
        out = super().to_generation(model)
        if self.finished_at >= 0:
            b = self.block_size
            block_end = min((self.finished_at // b + 1) * b, self.end)
            never = self.end - block_end
            out.tail_ids = out.tail_ids + [self.mask_id] * never
            out.tail_steps = out.tail_steps + [0] * never
        return out


class CanvasRunner:
    """One block step for a batch of running canvases (see the module docstring)."""

    def __init__(self, model) -> None:
        if model.spec.attention != "full":
            raise ConfigError(
                f"attention: canvas batching serves full-attention models, the model has "
                f"{model.spec.attention!r} (use tracerl.engine.Engine)"
            )
        self.shift = int(model.spec.logit_shift)
        if self.shift not in (0, 1):
            raise ConfigError(f"logit_shift: {self.shift} is not supported (0 or 1)")
        self.model = model
        self.device = model.device
        self.banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=self.device)
        self.timer = ForwardTimer(self.device, sync=False)  # CPU: time inside model calls; CUDA: counts only
        self.query_tokens = 0  # query columns run, padding excluded
        self.cached_row_forwards = 0  # row-forwards that ran against a cache

    @torch.no_grad()
    def step(self, seqs: list[CanvasSequence]) -> None:
        """One forward (one step of its current block) for every request of ``seqs``."""
        full = [i for i, s in enumerate(seqs) if s.mode == "none" or s.step == 0]
        cached = {mode: [i for i, s in enumerate(seqs) if s.mode == mode and s.step > 0]
                  for mode in ("prefix", "dual")}
        bmax = max(s.block_size for s in seqs)
        logits = None
        for members, run in ((full, self._full_forward), (cached["prefix"], self._cached_forward),
                             (cached["dual"], self._cached_forward)):
            if not members:
                continue
            part = run([seqs[i] for i in members], bmax)
            if logits is None:
                logits = part.new_empty((len(seqs),) + part.shape[1:])
            logits[members] = part
        self.cached_row_forwards += len(cached["prefix"]) + len(cached["dual"])
        unmask(seqs, logits, self.banned)

    # -- model calls --------------------------------------------------------------------------
    def _block_logits(self, hidden: torch.Tensor, first: torch.Tensor, bmax: int) -> torch.Tensor:
        """Logits (B, bmax, V) predicting each row's block, whose column j is predicted by query
        column ``first[r] + j`` (negative: column 0 of a shifted family, placeholder zeros)."""
        cols = first[:, None] + torch.arange(bmax, device=self.device)
        rows = torch.arange(hidden.shape[0], device=self.device)[:, None]
        logits = self.model.lm_logits(hidden[rows, cols.clamp(0, hidden.shape[1] - 1)])
        if self.shift:
            logits = logits.masked_fill((cols < 0)[..., None], 0.0)
        return logits

    def _full_forward(self, seqs: list[CanvasSequence], bmax: int) -> torch.Tensor:
        """Every column of every canvas (right-padded); refreshes prefix / dual caches."""
        dev = self.device
        ids = pad_sequence([s.tokens for s in seqs], batch_first=True, padding_value=seqs[0].pad_id)
        cols = torch.arange(ids.shape[1], device=dev)
        ends = torch.tensor([s.end for s in seqs], device=dev)
        valid = cols[None, :] < ends[:, None]
        pos = torch.where(valid, cols[None, :], 0)
        keep = [i for i, s in enumerate(seqs) if s.mode != "none"]
        self.query_tokens += sum(s.columns for s in seqs)
        with self.timer:
            hidden, cache = self.model.hidden_states(
                ids, attention_mask=masks.full_mask(ids.shape[1], valid), position_ids=pos,
                cache=DynamicCache() if keep else None, use_cache=bool(keep),
            )
        if keep:
            rows = torch.tensor(keep, device=dev)
            kv = torch.stack([torch.stack([layer.keys[rows], layer.values[rows]]) for layer in cache.layers])
            for j, i in enumerate(keep):  # (layers, 2, rows, H, L, D) -> columns outside its query
                s = seqs[i]
                q0, q1 = s.query_columns(self.shift)
                outside = torch.cat([torch.arange(0, q0, device=dev), torch.arange(q1, s.columns, device=dev)])
                s.kv = kv[:, :, j].index_select(-2, outside)
                s.kv_valid = valid[i].index_select(0, outside)
        first = torch.tensor([s.block_start - self.shift for s in seqs], device=dev)
        return self._block_logits(hidden, first, bmax)

    def _cached_forward(self, seqs: list[CanvasSequence], bmax: int) -> torch.Tensor:
        """The query columns of each request against its own cached keys/values (one mode)."""
        dev = self.device
        spans = [s.query_columns(self.shift) for s in seqs]
        ids = pad_sequence([s.tokens[q0:q1] for s, (q0, q1) in zip(seqs, spans)], batch_first=True,
                           padding_value=seqs[0].pad_id)
        lq = ids.shape[1]
        q0s = torch.tensor([q0 for q0, _ in spans], device=dev)
        q1s = torch.tensor([q1 for _, q1 in spans], device=dev)
        ends = torch.tensor([s.end for s in seqs], device=dev)
        cols = q0s[:, None] + torch.arange(lq, device=dev)
        query_valid = (cols < q1s[:, None]) & (cols < ends[:, None])
        pos = torch.where(query_valid, cols, 0)
        lengths = [s.kv.shape[-2] for s in seqs]
        cmax = max(lengths)
        cache = None
        key_valid = query_valid
        if cmax:
            ref = seqs[0].kv
            kv = ref.new_zeros(ref.shape[:2] + (len(seqs),) + ref.shape[2:3] + (cmax, ref.shape[-1]))
            cached_valid = torch.zeros(len(seqs), cmax, dtype=torch.bool, device=dev)
            for i, (s, n) in enumerate(zip(seqs, lengths)):
                kv[:, :, i, :, :n] = s.kv
                cached_valid[i, :n] = s.kv_valid
            cache = DynamicCache([(kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])])
            key_valid = torch.cat([cached_valid, query_valid], dim=1)
        self.query_tokens += int(sum(q1 - q0 for q0, q1 in spans))
        with self.timer:
            hidden, _ = self.model.hidden_states(
                ids, attention_mask=masks.full_mask(lq, key_valid), position_ids=pos,
                cache=cache, use_cache=cache is not None,
            )
        first = torch.tensor([s.block_start - self.shift for s in seqs], device=dev) - q0s
        return self._block_logits(hidden, first, bmax)
