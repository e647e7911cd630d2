"""One engine step: a single batched forward, then each request's own draw and unmasking.

Each request's query is its uncommitted final blocks (prompt blocks at prefill, or the block
that just became final) followed by its current block, against its committed pages; the final
blocks are committed after the forward, as ``BlockCacheDecoder`` does, so committing costs no
extra forward.  The forward is the only batched part whose numbers another request could
touch, and block attention plus the paged mask make it equal to the request's own forward.
Drawing and selection then run per group of requests with equal decoding settings, each row
with its own random stream, exactly as ``generate`` runs them for that row: a full block of
``b`` columns per forward (invalid columns past the length limit included, so streams advance
alike), ``step_quota`` from the block's own masked count and step (``Sequence.quota``).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.sequence import Sequence, randomized
from tracerl.engine.state import UNBOUND, record
from tracerl.generation.decoders import ForwardTimer
from tracerl.generation.sampling import draw
from tracerl.generation.unmasking import select
from tracerl.models.attention import reading_keys_from, routes_attention


def unmask(seqs: list[Sequence], logits: torch.Tensor, banned: torch.Tensor) -> None:
    """Draw and select for requests of ``seqs`` grouped by ``Sequence.decoding_key`` (``logits`` ``(B, >=b, V)``
    predicts each one's current block; its ``banned`` columns are set to -inf in place), each row
    from its own stream, then record each row."""
    dev, pool = logits.device, seqs[0].pool
    if pool is None:
        raise ValueError(f"unmask: {UNBOUND}")
    if banned.numel():  # as draw(banned_ids=...) does, without copying the logits
        logits.index_fill_(-1, banned, float("-inf"))
    cols = pool.columns
    # One walk over the requests: each one's decoding key, stream, and the facts of its row: its
    # block (first column in the pool's flattened rows), quota of this step, nfe after it and
    # whether it returns log-probs, as one array (torch.tensor on a list of tuples costs 4x more).
    try:
        keys, streams, facts = zip(*[
            (s.decoding_key, s.generator, (s.slot * cols + s.block * s.block_size, s.quota, s.nfe + 1,
                                           s.config.return_logprobs)) for s in seqs])
    except TypeError:  # a request without a slot (record refuses one from another pool)
        raise ValueError(f"unmask: {UNBOUND}") from None
    facts = np.array(facts, dtype=np.int64)
    if keys.count(keys[0]) == len(keys):  # the usual case: one group, no regrouping of rows
        groups = [None]
    else:
        by_key: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        groups = list(by_key.values())
    for members in groups:
        group = seqs if members is None else [seqs[i] for i in members]
        c, b = group[0].config, group[0].block_size
        rows = facts if members is None else facts[members]
        own = (streams if members is None else [streams[i] for i in members]) if randomized(c) else None
        d = draw(logits[:, :b] if members is None else logits[members, :b], temperature=c.temperature,
                 top_k=c.top_k, top_p=c.top_p, banned_ids=None, generator=own)
        block = rows[:, :1] + np.arange(b)  # the current blocks as flat indices into the pool's rows
        if pool.on_host:  # select and record on numpy views of the pool (see select)
            quota, nfe = rows[:, 1], rows[:, 2]
        else:  # the block indices, quotas and nfe: one copy
            packed = torch.from_numpy(np.concatenate([block, rows[:, 1:3]], axis=1)).to(dev)
            block, quota, nfe = packed[:, :b], packed[:, b], packed[:, b + 1]
        masked = pool.flat(pool.masked)[block]
        chosen = select(c.strategy, d, masked, quota, threshold=c.threshold, eb_threshold=c.eb_threshold,
                        generator=own)
        record(group, block, masked, chosen, d, nfe=nfe, logprobs=bool(rows[:, 3].any()))


class Runner:
    def __init__(self, model, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device  # a property that walks the parameters: read once
        self.shift = model.spec.logit_shift
        self.banned = torch.tensor(model.unsampleable_ids, dtype=torch.long, device=self.device)
        self.timer = ForwardTimer(model.device, sync=False)  # CPU: time inside model calls; CUDA: counts only
        # Attention reads the pages itself (by key-length groups) where the backbone lets it.
        self.in_place = routes_attention(model.backbone)

    @torch.no_grad()
    def step(self, seqs: list[Sequence]) -> int:
        """One block step of ``seqs``; returns the number of query columns it ran.

        Most requests' query is their current block, about one in ``steps`` also holds the block
        that just became final: both kinds (and prefills of at most two blocks) run in one
        forward with one batch row per query block (``row_per_block``: no row padded to two
        blocks, a broadcast mask; the current block's row sees the final block's keys written in
        the same layer).  Longer prefills (the prompt's blocks and the first one) run as one row
        each in a second forward, since a row per prompt block would gather the whole key table
        once per block."""
        committed = self.cache.committed_blocks_of([s.rid for s in seqs])
        queries = [s.block - c + 1 for s, c in zip(seqs, committed)]
        decoding = [i for i, q in enumerate(queries) if q <= 2]
        prefill = [i for i, q in enumerate(queries) if q > 2] if len(decoding) < len(seqs) else []
        logits = None
        for members, row_per_block in ((decoding, True), (prefill, False)):
            if not members:
                continue
            part = self._forward([seqs[i] for i in members], [queries[i] for i in members], row_per_block)
            if len(members) == len(seqs):
                logits = part
                break
            if logits is None:
                logits = part.new_empty((len(seqs),) + part.shape[1:])
            logits[members] = part
        unmask(seqs, logits, self.banned)
        return int(sum(queries)) * self.cache.block_size

    def _forward(self, seqs: list[Sequence], blocks: list[int], row_per_block: bool) -> torch.Tensor:
        """One batched forward over ``seqs`` (query: ``blocks[i]`` blocks from the committed
        length, up to the current block); the logits predicting each current block (B, b, V)."""
        b, dev, cache = self.cache.block_size, self.device, self.cache
        # Per row of the view (sequence order, then block order): its first block, its query's
        # blocks, the sequence's length limit and slot.  Positions, validity and indices are
        # worked out on the host (numpy), then copied.
        if row_per_block:
            per_row = [(k, 1, s.end, s.slot) for s, q in zip(seqs, blocks) for k in range(s.block - q + 1, s.block + 1)]
        else:
            per_row = [(s.block - q + 1, q, s.end, s.slot) for s, q in zip(seqs, blocks)]
        first, width, end, slot = np.array(per_row, dtype=np.int64).T[:, :, None]
        lq = b if row_per_block else max(blocks) * b
        cols = first * b + np.arange(lq)  # absolute positions of the query columns
        pool = seqs[0].pool
        valid = cols < end
        if row_per_block or min(blocks) == lq // b:  # every column lies in its row's query (and in its slot's row)
            ids = pool.tokens.view(-1)[torch.from_numpy(slot * pool.columns + cols).to(dev)]
        else:  # shorter prefills: columns past their query are padding
            inside = cols < (first + width) * b
            at = slot * pool.columns + np.minimum(cols, pool.columns - 1)
            ids = pool.tokens.view(-1)[torch.from_numpy(at).to(dev)]
            ids.masked_fill_(torch.from_numpy(~inside).to(dev), seqs[0].pad_id)
            valid &= inside
        view = cache.view([s.rid for s in seqs], blocks, valid, row_per_block=row_per_block, in_place=self.in_place)
        mask = view.attention_mask()
        if view.in_place:
            view.plan_attention()
        # The hidden states predicting each current block (its last row's last b columns; shifted:
        # one column earlier, which for the block's first column is the end of the row before).
        if row_per_block:  # a sequence's last row is its current block, all lq = b columns
            first_col = [(rows - 1) * lq for rows in itertools.accumulate(blocks)]  # rows up to the sequence's last
        else:  # row i, its last query block
            first_col = [i * lq + (q - 1) * b for i, q in enumerate(blocks)]
        flat = np.maximum(np.array(first_col, dtype=np.int64)[:, None] - self.shift + np.arange(b), 0)
        flat = torch.from_numpy(flat).to(dev)
        with self.timer, reading_keys_from(view):
            hidden, _ = self.model.hidden_states(
                ids, attention_mask=mask, position_ids=view.query_positions, cache=view, use_cache=True,
            )
            logits = self.model.lm_logits(hidden.flatten(0, 1)[flat])
        if view.in_place and view.attended != cache.geometry.num_layers:
            raise RuntimeError(f"paged attention: {view.attended} of {cache.geometry.num_layers} layers read the "
                               "pages (the backbone must call tracerl_sdpa with the view's mask)")
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
