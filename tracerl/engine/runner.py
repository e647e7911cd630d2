"""One engine step: a single batched forward, then each request's own draw and unmasking.

Each request runs its current block against its committed keys; its uncommitted final blocks
(the block that just became final as an extra row of the same forward, a prompt's blocks in a
prefill forward before it) run too and are committed after the forward, as
``BlockCacheDecoder`` commits them with the next block's first forward, so committing costs no
extra forward per step.  The forward is the only batched part whose numbers another request
could touch, and block attention plus the mask make it equal to the request's own forward.
Drawing and selection then run per group of requests with equal decoding settings, each row
with its own random stream, exactly as ``generate`` runs them for that row: a full block of
``b`` columns per forward (invalid columns past the length limit included, so streams advance
alike), ``step_quota`` from the block's own masked count and step.
"""

from __future__ import annotations

import torch

from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.sequence import Sequence, randomized
from tracerl.engine.slot_kv import SlotKV
from tracerl.engine.state import StatePool, record
from tracerl.generation.decoders import ForwardTimer
from tracerl.generation.sampling import draw
from tracerl.generation.unmasking import select, step_quota


def decoding_key(seq: Sequence) -> tuple:
    """Requests with equal keys can share one draw/select call."""
    c = seq.config
    return (seq.block_size, c.temperature, c.top_k, c.top_p, c.strategy, c.threshold, c.eb_threshold,
            seq.steps, randomized(c))


def _block_index(seqs: list[Sequence], b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the requests' current blocks in their ``StatePool`` tensors: ``(slots, columns)``."""
    slots = torch.tensor([s.slot for s in seqs], device=device)[:, None]
    return slots, torch.tensor([s.block_start for s in seqs], device=device)[:, None] + torch.arange(b, device=device)


def unmask(seqs: list[Sequence], logits: torch.Tensor, banned: torch.Tensor) -> None:
    """Draw and select for requests of ``seqs`` grouped by ``decoding_key`` (``logits`` ``(B, >=b, V)``
    predicts each one's current block), each row from its own stream, then record each row."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(decoding_key(s), []).append(i)
    for members in groups.values():
        group = [seqs[i] for i in members]
        c, b = group[0].config, group[0].block_size
        streams = [s.generator for s in group] if randomized(c) else None
        d = draw(logits[members, :b], temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                 banned_ids=banned, generator=streams)
        masked = group[0].pool.masked[_block_index(group, b, logits.device)]
        at_start = torch.tensor([s.at_start for s in group], device=logits.device)
        step = torch.tensor([s.step for s in group], device=logits.device)
        chosen = select(c.strategy, d, masked, step_quota(at_start, step, group[0].steps),
                        threshold=c.threshold, eb_threshold=c.eb_threshold, generator=streams)
        record(group, chosen, d.tokens, d.logprob, d.confidence)


class Runner:
    def __init__(self, model, cache: PagedKVCache, pool: StatePool) -> None:
        self.model = model
        self.cache = cache
        self.pool = pool
        self.slot_kv = SlotKV(cache, len(pool.tokens))
        self.shift = model.spec.logit_shift
        self.banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=model.device)
        self.timer = ForwardTimer(model.device, sync=False)  # CPU: time inside model calls; CUDA: counts only

    @torch.no_grad()
    def step(self, seqs: list[Sequence]) -> int:
        """One block step of ``seqs`` (every request holding a slot); returns the number of query
        columns it ran.

        Prefills with more than one final block (the prompt's) run first, in one forward through
        the page pool.  Then one forward runs every current block, plus a row for each block that
        just became final (about one request in ``steps``), reading keys in place (slot_kv.py):
        no row is padded to two blocks and no layer gathers the batch's keys.  On the
        mixed-length benchmark a 64-row step took 20 ms against 22 ms with one forward per
        query-length class through the page pool (docs/results.md)."""
        b, cache = self.cache.block_size, self.cache
        self.slot_kv.move(self.pool.compact(seqs))
        self.slot_kv.reserve(max(s.block + 1 for s in seqs) * b)
        pending = [s.block - cache.committed_blocks(s.rid) for s in seqs]
        prefills = [s for s, n in zip(seqs, pending) if n > 1]
        if prefills:
            self._prefill(prefills)
        final = [s for s, n in zip(seqs, pending) if n == 1]
        for s in seqs:  # the current block's page, as the scheduler counted it
            cache.allocate(s.rid, max(0, s.block + 1 - cache.held_pages(s.rid)))
        unmask(seqs, self._forward(seqs, final), self.banned)
        return (sum(pending) + len(seqs)) * b

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run and commit each request's final, uncommitted blocks through the page pool, then
        copy them into the slots' rows (shifted: keep the logits of their last column, which
        predict the current block's first)."""
        b, dev, cache = self.cache.block_size, self.model.device, self.cache
        committed = [cache.committed_blocks(s.rid) for s in seqs]
        blocks = [s.block - c for s, c in zip(seqs, committed)]
        lq = max(blocks) * b
        pool = seqs[0].pool
        first = torch.tensor([c * b for c in committed], device=dev)[:, None]
        cols = first + torch.arange(lq, device=dev)  # absolute positions of the query columns
        inside = cols < torch.tensor([s.block_start for s in seqs], device=dev)[:, None]
        slots = torch.tensor([s.slot for s in seqs], device=dev)[:, None]
        ids = torch.where(inside, pool.tokens[slots, cols.clamp_max(pool.columns - 1)], seqs[0].pad_id)
        valid = inside & (cols < torch.tensor([s.end for s in seqs], device=dev)[:, None])
        view = cache.view([s.rid for s in seqs], blocks, valid)
        with self.timer:
            hidden, _ = self.model.hidden_states(
                ids, attention_mask=view.attention_mask(), position_ids=view.query_positions, cache=view,
                use_cache=True,
            )
            if self.shift:
                last = torch.tensor([n * b - 1 for n in blocks], device=dev)
                carry = self.model.lm_logits(hidden[torch.arange(len(seqs), device=dev), last])
        cache.commit(view, blocks)
        if self.shift:
            for s, c in zip(seqs, carry):
                s.carry = c[None].clone()
        self.slot_kv.load([s.slot for s in seqs], committed,
                          [cache.page_table(s.rid)[c:c + n] for s, c, n in zip(seqs, committed, blocks)])

    def _forward(self, seqs: list[Sequence], final: list[Sequence]) -> torch.Tensor:
        """One forward over every current block (row = slot) and the ``final`` blocks; commits
        the latter and returns the logits predicting each current block (B, b, V), in ``seqs``
        order."""
        b, dev, cache = self.cache.block_size, self.model.device, self.cache
        by_slot = sorted(seqs, key=lambda s: s.slot)  # compact: slot i is row i
        n = len(by_slot)
        view = self.slot_kv.view([s.block for s in by_slot], [s.end for s in by_slot],
                                 [(s.slot, s.block - 1, s.end) for s in final])
        slots = torch.tensor([s.slot for s in by_slot] + [s.slot for s in final], device=dev)
        ids = self.pool.tokens[slots[:, None], view.query_positions]
        ids = torch.where(view.query_valid, ids, by_slot[0].pad_id)
        # Hidden states predicting the current block's columns (shifted: one column earlier).
        cols = (torch.arange(b, device=dev) - self.shift).clamp_min(0)
        with self.timer:
            hidden, _ = self.model.hidden_states(
                ids, attention_mask=view.attention_mask(), position_ids=view.query_positions, cache=view,
                use_cache=True,
            )
            logits = self.model.lm_logits(hidden[:n, cols])
            if self.shift and final:  # the final block's last column predicts the current block's first
                carry = self.model.lm_logits(hidden[n:, b - 1])
        if final:
            self.slot_kv.store([s.slot for s in final], [s.block - 1 for s in final],
                               [cache.mark_committed(s.rid) for s in final])
        if self.shift:
            for j, s in enumerate(final):
                s.carry = carry[j][None].clone()
            for s in seqs:
                if s.block == 0:  # column 0 is a prompt token: nothing predicts it
                    logits[s.slot, 0] = 0
                else:  # column s-1 lies in the last committed block
                    logits[s.slot, :1] = s.carry
        return logits[torch.tensor([s.slot for s in seqs], device=dev)]
