"""One engine step: a single batched forward, then each request's own draw and unmasking.

Each request's query is its uncommitted final blocks (prompt blocks at prefill, or the block
that just became final) followed by its current block, against its committed pages; the final
blocks are committed after the forward, as ``BlockCacheDecoder`` does, so committing costs no
extra forward.  The forward is the only batched part whose numbers another request could
touch, and block attention plus the paged mask make it equal to the request's own forward.
Drawing and selection then run per group of requests with equal decoding settings, each row
with its own random stream, exactly as ``generate`` runs them for that row: a full block of
``b`` columns per forward (invalid columns past the length limit included, so streams advance
alike), ``step_quota`` from the block's own masked count and step.
"""

from __future__ import annotations

import torch

from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.sequence import Sequence, randomized
from tracerl.engine.state import record
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
    def __init__(self, model, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.shift = model.spec.logit_shift
        self.banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=model.device)
        self.timer = ForwardTimer(model.device, sync=False)  # CPU: time inside model calls; CUDA: counts only

    @torch.no_grad()
    def step(self, seqs: list[Sequence]) -> int:
        """One block step of ``seqs``; returns the number of query columns it ran.

        Rows run in one forward per query length class, since a padded batch pads every row to
        its longest query: the current block alone (most rows), the block that just became
        final plus the current one (about one row in ``steps``), and prefills (longer).  On the
        mixed-length benchmark splitting the first two made a 64-row step 1.3x cheaper than one
        call padded to two blocks (docs/results.md)."""
        b = self.cache.block_size
        queries = [s.block - self.cache.committed_blocks(s.rid) + 1 for s in seqs]
        classes: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            classes.setdefault(min(q, 3), []).append(i)  # 1, 2, or 3 = a prefill of any length
        logits = None
        for members in classes.values():
            if not members:
                continue
            part = self._forward([seqs[i] for i in members])
            if logits is None:
                logits = part.new_empty((len(seqs),) + part.shape[1:])
            logits[members] = part
        unmask(seqs, logits, self.banned)
        return int(sum(queries)) * b

    def _forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """One batched forward over ``seqs``; the logits predicting each current block (B, b, V)."""
        b, dev, cache = self.cache.block_size, self.model.device, self.cache
        committed = [cache.committed_blocks(s.rid) for s in seqs]
        blocks = [s.block - c + 1 for s, c in zip(seqs, committed)]
        lq = max(blocks) * b
        pool = seqs[0].pool
        first = torch.tensor([c * b for c in committed], device=dev)[:, None]
        cols = first + torch.arange(lq, device=dev)  # absolute positions of the query columns
        inside = cols < torch.tensor([(s.block + 1) * b for s in seqs], device=dev)[:, None]
        slots = torch.tensor([s.slot for s in seqs], device=dev)[:, None]
        ids = torch.where(inside, pool.tokens[slots, cols.clamp_max(pool.columns - 1)], seqs[0].pad_id)
        valid = inside & (cols < torch.tensor([s.end for s in seqs], device=dev)[:, None])
        view = cache.view([s.rid for s in seqs], blocks, valid)
        mask = view.attention_mask()
        # Hidden states predicting the current block's columns (shifted: one column earlier).
        offsets = torch.tensor([(q - 1) * b - self.shift for q in blocks], device=dev)
        cols = (offsets[:, None] + torch.arange(b, device=dev)).clamp_min(0)
        rows = torch.arange(len(seqs), device=dev)[:, None]
        with self.timer:
            hidden, _ = self.model.hidden_states(
                ids, attention_mask=mask, position_ids=view.query_positions, cache=view, use_cache=True,
            )
            logits = self.model.lm_logits(hidden[rows, cols])
        cache.commit(view, [q - 1 for q in blocks])
        if self.shift:
            for i, (s, q) in enumerate(zip(seqs, blocks)):
                if q > 1:  # column s-1 lies in a block final in this forward: its logits are final
                    s.carry = logits[i, :1].clone()
                elif s.block == 0:  # column 0 is a prompt token: nothing predicts it
                    logits[i, 0] = 0
                else:
                    logits[i, :1] = s.carry
        return logits
