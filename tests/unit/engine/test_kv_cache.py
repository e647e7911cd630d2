"""Paged KV cache: one batched paged forward equals each sequence's own full forward; commits,
page reuse, pool exhaustion and memory sizes.  Real tiny models, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from tests.support.tiny_models import scrambled
from tracerl import masks
from tracerl.engine import CacheGeometry, KVCacheFullError, PagedKVCache, bytes_per_page
from tracerl.engine import kv_cache
from tracerl.engine.kv_cache import key_length_groups, paged_block_mask
from tracerl.models.attention import reading_keys_from
from tracerl.errors import ConfigError, TracerlError
from tracerl.models import load_model

# (preset, dtype, scrambled weights, atol).  Scrambled float64 models: sharp, state-dependent
# logits where summation order cannot matter, so any wrong key, position or mask shows.  The plain
# float32 preset is what the engine serves (scrambled float32 logits reach ~10, where batching
# alone moves them by ~1e-5).
SETUPS = {
    "block-f64": ("tiny-block", torch.float64, True, 1e-10),
    "shifted-f64": ("tiny-shifted", torch.float64, True, 1e-10),
    "block-f32": ("tiny-block", torch.float32, False, 1e-5),
}
PROMPTS = {"s0": 3, "s1": 9, "s2": 17, "s3": 30}  # prompt lengths; s1.. end mid-block or on a boundary
CANVAS = 64


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    name, dtype, scramble, atol = SETUPS[request.param]
    return (scrambled(name, dtype=dtype) if scramble else load_model(name, dtype=dtype)), atol


class Sequences:
    """Per-sequence token canvases (absolute positions), filled the way decoding would."""

    def __init__(self, model, lengths: dict[str, int], seed: int = 0) -> None:
        self.mask_id = model.mask_token_id
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = {}
        self.valid = {}
        for sid, n in lengths.items():
            t = torch.full((CANVAS,), self.mask_id, dtype=torch.long)
            t[:n] = self._random(n)
            self.tokens[sid] = t
            self.valid[sid] = torch.ones(CANVAS, dtype=torch.bool)

    def _random(self, n: int) -> torch.Tensor:
        return torch.randint(3, 250, (n,), generator=self.gen)  # byte tokens, no special ids

    def decode(self, sid: str, block: int, b: int, fraction: float = 1.0) -> None:
        """Unmask the first ``fraction`` of the block's masked positions (1.0: block is final)."""
        cols = torch.arange(block * b, (block + 1) * b)
        masked = cols[self.tokens[sid][cols] == self.mask_id]
        chosen = masked[: round(len(masked) * fraction)]
        self.tokens[sid][chosen] = self._random(len(chosen))


def reference_logits(model, tokens: torch.Tensor, valid: torch.Tensor, b: int) -> torch.Tensor:
    """Plain full forward, no cache, over one sequence: (L, V)."""
    pos = torch.arange(len(tokens))[None]
    mask = masks.mask_for_attention("block", pos, valid[None], b)
    with torch.no_grad():
        return model(tokens[None], attention_mask=mask, position_ids=pos)[0]


def paged_forward(model, cache, seqs, seq_ids, query_blocks, atol, query_valid=None, row_per_block=False,
                  in_place=False):
    """One batched forward through a view; checks every valid query column against the
    sequence's own full forward.  Returns the view (for commit).  ``query_valid`` is per
    sequence ``(B, Lq)``; ``row_per_block`` runs every query block as a row of its own;
    ``in_place``: attention reads the pages itself (grouped by key length), with no
    overhead per group so that rows of different lengths do form groups."""
    b = cache.block_size
    # The view's rows: (sequence, first query column of the row, columns in the row).
    if row_per_block:
        rows = [(i, k * b, b) for i, q in enumerate(query_blocks) for k in range(q)]
    else:
        rows = [(i, 0, q * b) for i, q in enumerate(query_blocks)]
    if query_valid is not None and row_per_block:
        query_valid = torch.stack([query_valid[i, c: c + n] for i, c, n in rows])
    view = cache.view(seq_ids, query_blocks, query_valid, row_per_block=row_per_block, in_place=in_place)
    batch, lq = view.query_positions.shape
    assert batch == len(rows) and lq == max(n for _, _, n in rows)
    ids = torch.zeros(batch, lq, dtype=torch.long)  # padding columns: any token, masked out
    for r, (i, c, n) in enumerate(rows):
        start = cache.committed_length(seq_ids[i]) + c
        ids[r, :n] = seqs.tokens[seq_ids[i]][start: start + n]
    mask = view.attention_mask()
    full = paged_block_mask(view.query_positions, view.query_valid, view.key_valid, b)
    assert full.shape == (batch, 1, lq, view.key_columns)
    assert torch.equal(mask.expand_as(full), full)  # one-block rows: key_valid broadcast (R, 1, 1, K)
    assert view.key_columns == max(cache.committed_blocks(s) + q for s, q in zip(seq_ids, query_blocks)) * b
    assert mask.any(-1).all()  # no empty softmax row, padding included
    with torch.no_grad(), reading_keys_from(view), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kv_cache, "GROUP_OVERHEAD_COLUMNS", 0)
        hidden, out_cache = model.hidden_states(
            ids, attention_mask=mask, position_ids=view.query_positions, cache=view, use_cache=True
        )
        logits = model.lm_logits(hidden)
    assert out_cache is view
    if in_place:  # the reader answered every layer, in more than one group when lengths differ
        assert view._groups is not None and (len(view._groups) > 1) == (len(set(view._row_pages.tolist())) > 1)
    for r, (i, c, n) in enumerate(rows):
        sid = seq_ids[i]
        start = cache.committed_length(sid)
        end = start + query_blocks[i] * b
        ref = reference_logits(model, seqs.tokens[sid][:end], seqs.valid[sid][:end], b)[start + c: start + c + n]
        keep = view.query_valid[r, :n]
        assert keep.any()
        torch.testing.assert_close(logits[r, :n][keep], ref[keep], atol=atol, rtol=0)
    return view


def mixed_state(model, atol):
    """Four sequences (prompts 3, 9, 17, 30 tokens) brought to different points of decoding by
    batched paged forwards (prefill of different lengths, then a subset, out of order)."""
    b = model.block_size
    cache = PagedKVCache.for_model(model, num_pages=40)
    seqs = Sequences(model, PROMPTS)
    for sid in PROMPTS:
        cache.allocate(sid)
    ids = list(PROMPTS)
    # Prefill: prompt's full blocks + the first denoising block (prompt tail + masks); commit the former.
    first = [PROMPTS[s] // b for s in ids]  # 0, 2, 4, 7
    view = paged_forward(model, cache, seqs, ids, [k + 1 for k in first], atol)
    cache.commit(view, first)
    # s1 finishes block 2; s3 finishes blocks 7 and 8; their next blocks are partly decoded.
    seqs.decode("s1", 2, b)
    seqs.decode("s1", 3, b, 0.5)
    for k in (7, 8):
        seqs.decode("s3", k, b)
    seqs.decode("s3", 9, b, 0.25)
    view = paged_forward(model, cache, seqs, ["s3", "s1"], [3, 2], atol)
    cache.commit(view, [2, 1])
    # s0 is mid-block; s2 finished its first block (not committed yet) and is mid-way in the next.
    seqs.decode("s0", 0, b, 0.5)
    seqs.decode("s1", 3, b, 0.5)
    seqs.decode("s2", 4, b)
    seqs.decode("s2", 5, b, 0.5)
    return cache, seqs


@pytest.mark.parametrize("row_per_block", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_batched_current_blocks_equal_each_sequence_alone(setup, row_per_block, in_place):
    model, atol = setup
    cache, seqs = mixed_state(model, atol)
    ids = list(PROMPTS)
    assert [cache.committed_blocks(s) for s in ids] == [0, 3, 4, 9]  # all different
    # ONE forward: every sequence's current block (s2: its finished block too) against its own pages.
    view = paged_forward(model, cache, seqs, ids, [1, 1, 2, 1], atol, row_per_block=row_per_block, in_place=in_place)
    assert view.cached_columns == 9 * model.block_size
    used = cache.num_used
    cache.commit(view, 0)  # nothing was final: nothing is committed, no page moves
    assert [cache.committed_blocks(s) for s in ids] == [0, 3, 4, 9] and cache.num_used == used
    # Each sequence holds its committed pages plus one per query block (provisional keys).
    assert [cache.held_pages(s) for s in ids] == [1, 4, 6, 10]


@pytest.mark.parametrize("row_per_block", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_commit_then_next_forward_still_matches(setup, row_per_block, in_place):
    """(With ``row_per_block`` each new block's row reads the keys that the row of the block
    before it wrote in the same forward.)"""
    model, atol = setup
    b = model.block_size
    cache, seqs = mixed_state(model, atol)
    ids = list(PROMPTS)
    used = cache.num_used
    # Every current block becomes final; the first forward of the next block commits it (s2: two).
    for sid, k in zip(ids, (0, 3, 5, 9)):
        seqs.decode(sid, k, b)
    view = paged_forward(model, cache, seqs, ids, [2, 2, 3, 2], atol, row_per_block=row_per_block, in_place=in_place)
    cache.commit(view, [1, 1, 2, 1])
    assert [cache.committed_blocks(s) for s in ids] == [1, 4, 6, 10]
    assert cache.num_used == used + 5  # one page per new query block (s2: its blocks 5 and 6)
    # Later steps of the new blocks run only the block against the pages.
    for sid, k in zip(ids, (1, 4, 6, 10)):
        seqs.decode(sid, k, b, 0.5)
    paged_forward(model, cache, seqs, ids, [1, 1, 1, 1], atol)
    # The pages hold exactly the keys/values a full forward computes for those positions.
    for sid in ids:
        n = cache.committed_length(sid)
        pos = torch.arange(n)[None]
        full = DynamicCache()
        with torch.no_grad():
            model.hidden_states(seqs.tokens[sid][None, :n], position_ids=pos, cache=full, use_cache=True,
                                attention_mask=masks.mask_for_attention("block", pos, seqs.valid[sid][None, :n], b))
        for layer in range(model.config.num_hidden_layers):
            keys, values, valid = cache.sequence_kv(sid, layer)
            torch.testing.assert_close(keys, full.layers[layer].keys[0], atol=atol, rtol=0)
            torch.testing.assert_close(values, full.layers[layer].values[0], atol=atol, rtol=0)
            assert valid.all()


def test_freed_pages_are_reused_without_touching_other_sequences(setup):
    model, atol = setup
    b = model.block_size
    cache, seqs = mixed_state(model, atol)
    pages = cache.page_table("s3")
    assert cache.free("s3") == 10  # preemption: every page back at once (9 committed + its current block)
    assert "s3" not in cache
    # A new sequence takes s3's pages (LIFO) and is prefilled in the same forward as the others.
    new = Sequences(model, {"s4": 34}, seed=7)
    seqs.tokens["s4"], seqs.valid["s4"] = new.tokens["s4"], new.valid["s4"]
    cache.allocate("s4")
    view = paged_forward(model, cache, seqs, ["s4", "s0", "s1", "s2"], [9, 1, 1, 2], atol)
    cache.commit(view, [8, 0, 0, 1])
    assert set(cache.page_table("s4")) <= set(pages) and cache.held_pages("s4") == 9
    seqs.decode("s4", 8, b, 0.5)
    paged_forward(model, cache, seqs, ["s0", "s1", "s2", "s4"], [1, 1, 1, 1], atol)


@pytest.mark.parametrize("row_per_block", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_invalid_slots_are_committed_as_invalid(setup, row_per_block, in_place):
    # A block cut short by the length limit (prompt 6, canvas ends at 7): position 7 holds no
    # token; once committed it must stay invisible to later blocks.
    model, atol = setup
    b = model.block_size
    cache = PagedKVCache.for_model(model, num_pages=4)
    seqs = Sequences(model, {"x": 6})
    seqs.valid["x"][7] = False
    cache.allocate("x")
    qvalid = seqs.valid["x"][: 2 * b][None]
    seqs.decode("x", 1, b, 0.5)
    view = paged_forward(model, cache, seqs, ["x"], [2], atol, query_valid=qvalid, row_per_block=row_per_block, in_place=in_place)
    cache.commit(view, 1)
    seqs.decode("x", 1, b)
    view = paged_forward(model, cache, seqs, ["x"], [1], atol, query_valid=seqs.valid["x"][b : 2 * b][None])
    cache.commit(view, 1)
    assert cache.sequence_kv("x", 0)[2].tolist() == [True] * 7 + [False]
    paged_forward(model, cache, seqs, ["x"], [1], atol)  # block 2 must not see position 7


def test_pool_exhaustion_is_a_clear_error_and_free_returns_pages():
    model = load_model("tiny-block")
    cache = PagedKVCache.for_model(model, num_pages=5)
    assert cache.allocate("a", 3) == [0, 1, 2]
    with pytest.raises(KVCacheFullError, match="num_pages") as err:
        cache.allocate("b", 3)
    assert isinstance(err.value, TracerlError)
    assert (err.value.needed, err.value.free, err.value.num_pages) == (3, 2, 5)
    assert "b" not in cache and cache.num_free == 2  # all or nothing
    assert cache.free("a") == 3 and cache.num_free == 5
    assert sorted(cache.allocate("b", 3)) == [0, 1, 2]
    assert cache.usage()["reserved_pages"] == 3
    with pytest.raises(ValueError, match="seq_id"):
        cache.free("a")
    with pytest.raises(ValueError, match="seq_id"):
        cache.view(["nobody"], 1)


def test_view_uses_reserved_pages_then_free_ones_and_fails_atomically():
    model = scrambled("tiny-block", dtype=torch.float64)
    b = model.block_size
    cache = PagedKVCache.for_model(model, num_pages=4)
    seqs = Sequences(model, {"y": 13, "z": 2})
    reserved = cache.allocate("y", 2)
    cache.allocate("z", 1)
    with pytest.raises(KVCacheFullError, match="num_pages"):
        cache.view(["y", "z"], [4, 1])  # y: 2 reserved + 1 free < 4 (z holds the other page)
    assert cache.page_table("y") == reserved and cache.num_free == 1 and cache.committed_blocks("y") == 0
    cache.free("z")
    view = paged_forward(model, cache, seqs, ["y"], [4], 1e-10)
    assert cache.page_table("y")[:2] == reserved and cache.num_free == 0
    cache.commit(view, 3)
    with pytest.raises(ValueError, match="already committed"):
        cache.commit(view, 1)
    seqs.decode("y", 3, b, 0.5)
    paged_forward(model, cache, seqs, ["y"], [1], 1e-10)  # reuses its provisional page: no new one
    with pytest.raises(ValueError, match="n_blocks"):
        cache.commit(cache.view(["y"], 1), 2)
    stale = cache.view(["y"], 1)
    cache.free("y")  # preempted and re-admitted between the view and its commit
    cache.allocate("y")
    with pytest.raises(ValueError, match="changed"):
        cache.commit(stale, 0)


def test_bytes_per_page_matches_real_tensors():
    for name, dtype in [("tiny-block", torch.float32), ("tiny-shifted", torch.float32), ("tiny-block", torch.bfloat16)]:
        model = load_model(name, dtype=dtype)
        b = model.block_size
        page = bytes_per_page(model.config, b, dtype)
        # Keys/values the backbone itself produces for one block of tokens.
        produced = DynamicCache()
        with torch.no_grad():
            pos = torch.arange(b)[None]
            model.hidden_states(torch.arange(3, 3 + b)[None], position_ids=pos, cache=produced, use_cache=True,
                                attention_mask=masks.block_causal_mask(pos, b))
        tensors = [t for layer in produced.layers for t in (layer.keys, layer.values)]
        assert page == sum(t.numel() * t.element_size() for t in tensors)
        cache = PagedKVCache.for_model(model, budget_bytes=3 * page + page - 1)  # whole pages only
        assert cache.num_pages == 3
        pool = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        assert pool == 3 * page == cache.usage()["pool_bytes"]
        assert cache.usage()["bytes_per_token"] * b == page
    f32 = CacheGeometry.from_config(model.config, 4, torch.float32).bytes_per_page
    assert f32 == 4 * 2 * 2 * 32 * 4 * 4 == 2 * page  # layers * (k, v) * kv_heads * head_dim * block * 4 bytes


def test_sizing_errors_name_the_field():
    model = load_model("tiny-block")
    with pytest.raises(ConfigError, match="budget_bytes"):
        PagedKVCache.for_model(model, budget_bytes=100)
    with pytest.raises(ConfigError, match="num_pages, budget_bytes"):
        PagedKVCache.for_model(model)
    with pytest.raises(ConfigError, match="num_pages"):
        PagedKVCache.for_model(model, num_pages=0)
    with pytest.raises(ConfigError, match="attention"):
        PagedKVCache.for_model(load_model("tiny-full"), num_pages=4)


def test_in_place_view_refuses_a_forward_without_its_reader():
    """Without ``reading_keys_from(view)`` an in-place view's layers would attend only to the
    query's own keys: the view refuses instead."""
    model = scrambled("tiny-block", dtype=torch.float64)
    cache = PagedKVCache.for_model(model, num_pages=4)
    cache.allocate("a")
    view = cache.view(["a"], 1, in_place=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="reading_keys_from"):
        model.hidden_states(torch.zeros(1, model.block_size, dtype=torch.long), attention_mask=view.attention_mask(),
                            position_ids=view.query_positions, cache=view, use_cache=True)


def test_key_length_groups_pick_the_cheapest_split():
    """Every row in exactly one group; the split costs no more than one group or any split of the
    rows sorted by length into two or three runs; no overhead leaves nothing to group."""
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 9, (), generator=rng))
        lengths = torch.randint(1, 50, (n,), generator=rng).numpy() * 4
        overhead = int(torch.randint(0, 300, (), generator=rng))
        groups = key_length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(n)) and 1 <= len(groups) <= 3
        if len(groups) > 1:  # longest row first: the group's width
            assert all(lengths[g[0]] == lengths[g].max() for g in groups)

        def cost(parts):
            return sum(len(p) * lengths[p].max() for p in parts) + overhead * len(parts)

        order = sorted(range(n), key=lambda i: -lengths[i])
        candidates = [[order]] + [[order[:i], order[i:]] for i in range(1, n)]
        candidates += [[order[:i], order[i:j], order[j:]] for i in range(1, n) for j in range(i + 1, n)]
        best = min(cost(c) for c in candidates)
        assert cost([list(g) for g in groups]) == best
        # On equal cost, fewer groups (each is one more attention call per layer).
        assert len(groups) == min(len(c) for c in candidates if cost(c) == best)
    # Two and three groups cost the same here (672): two.
    assert len(key_length_groups(np.array([160, 64, 160, 128, 32]), 32)) == 2
    assert [g.tolist() for g in key_length_groups(lengths, None)] == [list(range(len(lengths)))]


def test_page_tables_survive_growth_of_the_shared_table(setup):
    """The cache keeps every sequence's pages as a row of one array that grows (rows and
    columns) while sequences hold pages: a short sequence growing past the array's width, with
    more sequences than its first rows, must leave the others' tables intact."""
    model, atol = setup
    b = model.block_size
    lengths = {f"r{i}": 3 + 3 * i for i in range(10)}  # 3..30 tokens: 1..8 pages after prefill
    cache = PagedKVCache.for_model(model, num_pages=80)
    seqs = Sequences(model, lengths)
    ids = list(lengths)
    for sid in ids:
        cache.allocate(sid)
    first = [lengths[s] // b for s in ids]
    cache.commit(paged_forward(model, cache, seqs, ids, [k + 1 for k in first], atol), first)
    before = {sid: cache.page_table(sid) for sid in ids}
    assert max(map(len, before.values())) == 8  # the longest table fills the array's first width
    for k in range(9):  # r0 (one page) decodes nine blocks and takes ten pages in one forward
        seqs.decode("r0", k, b)
    cache.commit(paged_forward(model, cache, seqs, ["r0"], [10], atol), 9)
    assert all(cache.page_table(sid) == before[sid] for sid in ids[1:])
    paged_forward(model, cache, seqs, ids, [1] * len(ids), atol)  # every table read back through a view
