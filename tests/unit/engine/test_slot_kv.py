"""Keys by slot (slot_kv.py): compaction keeps each request's state, and the pages the block
step commits hold the keys the slot rows hold (the pages stay the record)."""

from __future__ import annotations

import torch

from tests.support.tiny_models import scrambled
from tracerl.engine.kv_cache import PagedKVCache
from tracerl.engine.loop import BlockLoop
from tracerl.engine.sequence import make_requests
from tracerl.engine.state import StatePool
from tracerl.generation.config import SamplingConfig


def test_compact_moves_requests_into_the_holes_with_their_state():
    model = scrambled("tiny-block", dtype=torch.float64)
    seqs = make_requests(model, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], SamplingConfig(max_new_tokens=8), None)
    pool = StatePool(4, max(len(s.tokens) for s in seqs), model.device)
    for s in seqs:
        pool.bind(s)
    before = [s.tokens.clone() for s in seqs]
    pool.release(seqs[0])  # a hole at slot 0
    moves = pool.compact(seqs[1:])
    assert moves == [(2, 0)]
    assert sorted(s.slot for s in seqs[1:]) == [0, 1]
    for s, t in zip(seqs[1:], before[1:]):
        assert torch.equal(s.tokens, t)
        assert s.tokens.data_ptr() == pool.tokens[s.slot].data_ptr()  # a view of its new row
    s = make_requests(model, [[1, 2]], SamplingConfig(max_new_tokens=4), None)[0]
    pool.bind(s)
    assert s.slot == 2  # the free slots follow the compact ones


def test_committed_pages_equal_the_slot_rows():
    model = scrambled("tiny-block", dtype=torch.float64)
    prompts = [[3 + i] * n for i, n in enumerate([1, 5, 9, 14, 2, 7])]
    seqs = make_requests(model, prompts, SamplingConfig(max_new_tokens=16), None)
    cache = PagedKVCache.for_model(model, num_pages=64)
    pool = StatePool(4, max(len(s.tokens) for s in seqs), model.device)
    loop = BlockLoop(model, cache, pool, max_running=4)
    for s in seqs:
        loop.add(s)
    slot_kv = loop.runner.slot_kv
    checked = 0
    while not loop.idle():
        loop.step()
        for s in loop.running:
            n = cache.committed_length(s.rid)
            for layer in range(len(slot_kv.keys)):
                keys, values, valid = cache.sequence_kv(s.rid, layer)
                assert valid.all()
                assert torch.equal(keys, slot_kv.keys[layer][s.slot, :n].transpose(0, 1))
                assert torch.equal(values, slot_kv.values[layer][s.slot, :n].transpose(0, 1))
            checked += n > 0
    assert checked
