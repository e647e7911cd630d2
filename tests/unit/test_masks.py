"""tracerl.masks: the defining properties of every mask, structurally and through a real model.

Structural tests compare each mask with its definition, entry by entry, on random layouts.
Behavioural tests run the real ``tiny-block`` preset (a stock Qwen3 backbone) and check what the
mask is *for*: which logits may depend on which tokens.
"""

from __future__ import annotations

import pytest
import torch

from tracerl import masks
from tracerl.masks import CLEAN, NOISY, PAD, PROMPT
from tracerl.models import load_model

ATOL = 1e-5  # "same logits" (float32, tiny model; observed differences are ~1e-7)
CHANGED = 1e-4  # "logits changed": a changed input moves tiny-block's logits by >= ~1e-3
BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-block")


def run(model, ids, mask, positions):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions)


def random_ids(generator, *shape):
    return torch.randint(0, 256, shape, generator=generator)


# --- positions and block ids -------------------------------------------------------------------


def test_positions_from_valid_counts_valid_tokens_only():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(masks.positions_from_valid(valid), expected)


def test_block_ids_are_floor_of_absolute_position():
    positions = torch.tensor([[0, 3, 4, 7, 8, 13]])
    assert torch.equal(masks.block_ids(positions, 4), torch.tensor([[0, 0, 1, 1, 2, 3]]))


# --- block-causal: the definition ---------------------------------------------------------------


def block_causal_by_definition(q_pos, k_pos, block_size, key_valid):
    """Entry (i, j) is True iff key j is valid and block(key j) <= block(query i); loops, no tricks."""
    batch, queries = q_pos.shape
    keys = k_pos.shape[1]
    out = torch.zeros(batch, 1, queries, keys, dtype=torch.bool)
    for r in range(batch):
        for i in range(queries):
            for j in range(keys):
                out[r, 0, i, j] = bool(key_valid[r, j]) and (
                    int(k_pos[r, j]) // block_size <= int(q_pos[r, i]) // block_size
                )
    return out


def with_self_loops_on_empty_rows(allowed):
    """The documented fallback: a query that may attend nothing attends only itself."""
    empty = ~allowed.any(-1, keepdim=True)
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool)
    return allowed | (empty & eye)


@pytest.mark.parametrize("seed", range(12))
def test_block_causal_mask_matches_definition_on_random_layouts(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 3
    length = int(torch.randint(1, 20, (1,), generator=g))
    block_size = int(torch.randint(1, 8, (1,), generator=g))
    if seed % 2:
        # arbitrary (unsorted, repeated) positions, e.g. a packed or two-copy layout
        positions = torch.randint(0, 30, (batch, length), generator=g)
    else:
        # contiguous positions starting at a random offset: the first block is partial
        positions = torch.randint(0, 9, (batch, 1), generator=g) + torch.arange(length)
    valid = torch.rand(batch, length, generator=g) > 0.25

    mask = masks.block_causal_mask(positions, block_size, key_valid=valid)

    expected = block_causal_by_definition(positions, positions, block_size, valid)
    assert mask.shape == (batch, 1, length, length) and mask.dtype == torch.bool
    assert torch.equal(mask, with_self_loops_on_empty_rows(expected))


def test_block_causal_mask_hand_written_partial_first_block():
    # Positions 2..6 with block size 4: blocks [0, 0, 1, 1, 1]; the first block is partial.
    mask = masks.block_causal_mask(torch.arange(2, 7)[None], 4)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("length", [1, 5, 13])
def test_block_size_one_is_causal(length):
    positions = torch.arange(length).repeat(2, 1)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, : length // 2] = False  # left padding on row 1
    positions[1] = masks.positions_from_valid(valid[1:])[0]

    block1 = masks.block_causal_mask(positions, 1, key_valid=valid)
    assert torch.equal(block1, masks.causal_mask(positions, key_valid=valid))
    # and causal really is lower-triangular on an unpadded row
    tril = torch.tril(torch.ones(length, length, dtype=torch.bool))
    assert torch.equal(block1[0, 0], tril)


@pytest.mark.parametrize("length,block_size", [(1, 1), (6, 6), (6, 7), (11, 64)])
def test_block_size_at_least_length_is_full_attention(length, block_size):
    positions = torch.arange(length)[None].repeat(2, 1)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, : length // 3] = False
    mask = masks.block_causal_mask(positions, block_size, key_valid=valid)
    assert torch.equal(mask, masks.full_mask(length, valid))
    assert mask[0].all()


def test_block_causal_with_separate_key_positions_is_the_matching_rows():
    # Denoising block 2 against a cache of blocks 0-1: the queries' rows of the whole-sequence mask.
    positions = torch.arange(12)[None]
    whole = masks.block_causal_mask(positions, 4)
    rows = masks.block_causal_mask(positions[:, 8:], 4, key_positions=positions)
    assert torch.equal(rows, whole[:, :, 8:, :])


def test_block_causal_rejects_block_size_below_one():
    with pytest.raises(ValueError, match="block_size"):
        masks.block_causal_mask(torch.arange(4)[None], 0)


def test_mask_for_attention_names_valid_kinds():
    with pytest.raises(ValueError, match="block, full, causal"):
        masks.mask_for_attention("sideways", torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), 4)


# --- block-causal: behaviour of a real model ---------------------------------------------------


@pytest.mark.parametrize("offset", [0, 3, 6])
def test_block_causal_later_block_never_changes_earlier_logits(model, offset):
    """Changing a token of block k+1 leaves blocks <= k alone and changes all of block k+1.

    Positions start at ``offset`` so the first block is partial: blocks must come from absolute
    positions, not from token indices.
    """
    g = torch.Generator().manual_seed(offset)
    length = 14
    positions = (offset + torch.arange(length))[None]
    blocks = masks.block_ids(positions[0], BLOCK)
    ids = random_ids(g, 1, length)
    mask = masks.block_causal_mask(positions, BLOCK)
    base = run(model, ids, mask, positions)[0]

    for block in blocks.unique()[1:].tolist():
        in_block = (blocks == block).nonzero().flatten()
        for index in (in_block[0], in_block[-1]):  # a block's first and last token
            changed = ids.clone()
            changed[0, index] = (ids[0, index] + 17) % 256
            out = run(model, changed, mask, positions)[0]

            earlier = blocks < block
            torch.testing.assert_close(out[earlier], base[earlier], atol=ATOL, rtol=0)
            moved = (out[blocks == block] - base[blocks == block]).abs().amax(-1)
            # bidirectional inside the block: every position of the block sees the change
            assert (moved > CHANGED).all(), f"block {block} position moves {moved.tolist()}"


# --- left padding ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["block", "full", "causal"])
def test_left_padding_is_invisible(model, kind):
    g = torch.Generator().manual_seed(1)
    pad = 5  # not a multiple of the block size
    short = random_ids(g, 7)
    long = random_ids(g, pad + 7)
    ids = torch.stack([torch.cat([torch.full((pad,), 256), short]), long])
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, :pad] = False
    positions = masks.positions_from_valid(valid)
    mask = masks.mask_for_attention(kind, positions, valid, BLOCK)

    # padded keys are never attended, by any query row
    assert not mask[0, 0][:, ~valid[0]].any()
    assert mask.any(-1).all(), "a query row attends nothing"

    out = run(model, ids, mask, positions)
    assert not out.isnan().any(dim=-1).any(), "NaN logits"
    assert out.isfinite().all()

    for row, seq in ((0, short), (1, long)):
        alone_pos = torch.arange(len(seq))[None]
        alone_mask = masks.mask_for_attention(kind, alone_pos, torch.ones(1, len(seq), dtype=torch.bool), BLOCK)
        alone = run(model, seq[None], alone_mask, alone_pos)[0]
        torch.testing.assert_close(out[row, valid[row]], alone, atol=ATOL, rtol=0)

    # what sits in the padded slots cannot matter
    garbage = ids.clone()
    garbage[0, :pad] = random_ids(g, pad)
    out2 = run(model, garbage, mask, positions)
    torch.testing.assert_close(out2[0, pad:], out[0, pad:], atol=ATOL, rtol=0)


# --- two-copy mask: structure ------------------------------------------------------------------


def two_copy_layout(prompt_len, response_len, pad=0, block_size=4):
    """Positions and segments of ``[pad | prompt | clean response | noisy copy]``."""
    positions, segments, _ = masks.two_copy_layout(prompt_len, response_len, block_size)
    positions = torch.cat([torch.zeros(pad, dtype=torch.long), positions])
    segments = torch.cat([torch.full((pad,), PAD), segments])
    return positions[None], segments[None]


def test_two_copy_mask_hand_written():
    # prompt p0 p1 p2 | clean c3 c4 | noisy copy t2 n3 n4, block size 2: blocks p[0 0 1] c[1 2]
    # and noisy [1 1 2].  The prompt tail p2 shares block 1 with the first response token, so the
    # noisy copy starts with a copy of it (t2), which belongs to noisy block 1.
    positions, segments = two_copy_layout(3, 2, block_size=2)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4]
    mask = masks.two_copy_mask(positions, segments, 2)
    expected = torch.tensor(
        [  # p0 p1 p2 c3 c4 t2 n3 n4
            [1, 1, 0, 0, 0, 0, 0, 0],  # p0
            [1, 1, 0, 0, 0, 0, 0, 0],  # p1
            [1, 1, 1, 1, 0, 0, 0, 0],  # p2
            [1, 1, 1, 1, 0, 0, 0, 0],  # c3
            [1, 1, 1, 1, 1, 0, 0, 0],  # c4
            [1, 1, 0, 0, 0, 1, 1, 0],  # t2: the earlier prompt block and its own noisy block
            [1, 1, 0, 0, 0, 1, 1, 0],  # n3: same; not c3 (its clean copy), not p2 (clean stream)
            [1, 1, 1, 1, 0, 0, 0, 1],  # n4: prompt, clean block 1 (p2 c3), itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize(
    "prompt_len,response_len,block_size,pad",
    [
        (8, 8, 4, 0),  # aligned
        (5, 9, 4, 0),  # prompt tail shares the first response block; last block partial
        (3, 10, 4, 2),  # left padding
        (6, 7, 3, 3),
        (1, 5, 8, 0),  # whole response in the prompt's block
        (7, 4, 1, 1),  # block size 1
    ],
)
def test_two_copy_mask_properties(prompt_len, response_len, block_size, pad):
    positions, segments = two_copy_layout(prompt_len, response_len, pad, block_size)
    mask = masks.two_copy_mask(positions, segments, block_size)[0, 0]
    pos, seg = positions[0], segments[0]
    blk = masks.block_ids(pos, block_size)
    qb, kb = blk[:, None], blk[None, :]
    q_seg, k_seg = seg[:, None], seg[None, :]
    is_noisy_q = q_seg == NOISY
    is_context_q = (q_seg == PROMPT) | (q_seg == CLEAN)

    # noisy queries ...
    own_clean_copy = is_noisy_q & (k_seg != NOISY) & (k_seg != PAD) & (pos[:, None] == pos[None, :])
    assert own_clean_copy.sum() == (seg == NOISY).sum() and not mask[own_clean_copy].any()
    assert not mask[is_noisy_q & (kb > qb)].any(), "noisy query sees a later block"
    assert not mask[is_noisy_q & (k_seg == NOISY) & (kb != qb)].any(), "sees another noisy block"
    assert not mask[is_noisy_q & (k_seg == CLEAN) & (kb >= qb)].any(), "sees clean of its own block"
    assert mask[is_noisy_q & (k_seg == NOISY) & (kb == qb)].all(), "misses its own noisy block"
    assert not mask[is_noisy_q & (k_seg == PROMPT) & (kb >= qb)].any(), "sees the clean prompt tail"
    assert mask[is_noisy_q & (k_seg == PROMPT) & (kb < qb)].all(), "misses the earlier prompt"
    assert mask[is_noisy_q & (k_seg == CLEAN) & (kb < qb)].all(), "misses earlier clean blocks"

    # prompt and clean queries: block-causal over prompt + clean, never noisy
    context_k = (k_seg == PROMPT) | (k_seg == CLEAN)
    rows = is_context_q.expand_as(mask)
    assert torch.equal(mask[rows], (context_k & (kb <= qb)).expand_as(mask)[rows])
    assert not mask[is_context_q & (k_seg == NOISY)].any()

    # padding is never attended by real queries, pad rows only attend themselves, no row is empty
    real_q = (seg != PAD)[:, None]
    assert not mask[real_q & (k_seg == PAD)].any()
    eye = torch.eye(len(seg), dtype=torch.bool)
    assert torch.equal(mask[seg == PAD], eye[seg == PAD])
    assert mask.any(-1).all()


def test_two_copy_mask_partial_first_block_noisy_sees_prompt_tail():
    positions, segments = two_copy_layout(prompt_len=5, response_len=6)  # block 1 = p4 | r5 r6 r7
    mask = masks.two_copy_mask(positions, segments, 4)[0, 0]
    tail_copy, noisy_r5 = 11, 12  # the noisy copy starts with the copy of p4
    assert positions[0, tail_copy] == 4 and positions[0, noisy_r5] == 5
    assert mask[noisy_r5, tail_copy], "noisy query of the shared block must see the prompt tail"
    assert mask[noisy_r5, :4].all() and not mask[noisy_r5, 4:11].any()
    assert mask[tail_copy, noisy_r5], "the tail copy attends the block's noisy tokens, as in sampling"


# --- two-copy mask: behaviour of a real model (the property the TraceRL trainer relies on) -----

def noisy_copy(response, mask_id):
    """Mask every other response token (first one included), deterministically."""
    noisy = response.clone()
    noisy[0::2] = mask_id
    return noisy


def reference_noisy_logits(model, prompt, response, noisy, block_size, block):
    """Ordinary block-causal forward over [prompt | clean blocks < k | noisy block k]."""
    p = len(prompt)
    resp_pos = torch.arange(p, p + len(response))
    resp_blk = masks.block_ids(resp_pos, block_size)
    earlier, current = resp_blk < block, resp_blk == block
    ids = torch.cat([prompt, response[earlier], noisy[current]])[None]
    positions = torch.cat([torch.arange(p), resp_pos[earlier], resp_pos[current]])[None]
    out = run(model, ids, masks.block_causal_mask(positions, block_size), positions)[0]
    return out[-int(current.sum()) :]


def two_copy_batch(rows, pad_id):
    """Left-pad rows of (prompt, response, noisy) into one two-copy batch."""
    ids, positions, segments = [], [], []
    for prompt, response, noisy in rows:
        pos, seg, source = masks.two_copy_layout(len(prompt), len(response), BLOCK)
        tokens = torch.cat([prompt, response])[source]
        noisy_cols = (seg == NOISY).nonzero().flatten()
        is_response = source[noisy_cols] >= len(prompt)
        tokens[noisy_cols[is_response]] = noisy  # the prompt-tail copy stays clean
        ids.append(tokens)
        positions.append(pos)
        segments.append(seg)
    width = max(len(x) for x in ids)

    def left_pad(x, value):
        return torch.cat([torch.full((width - len(x),), value, dtype=x.dtype), x])

    return (
        torch.stack([left_pad(x, pad_id) for x in ids]),
        torch.stack([left_pad(x, 0) for x in positions]),
        torch.stack([left_pad(x, PAD) for x in segments]),
    )


@pytest.mark.parametrize(
    "prompt_len",
    [8, 5],
)
def test_two_copy_noisy_logits_equal_blockwise_forwards(model, prompt_len):
    g = torch.Generator().manual_seed(prompt_len)
    prompt, response = random_ids(g, prompt_len), random_ids(g, 10)  # last block partial
    noisy = noisy_copy(response, model.mask_token_id)
    ids, positions, segments = two_copy_batch([(prompt, response, noisy)], 256)
    out = run(model, ids, masks.two_copy_mask(positions, segments, BLOCK), positions)[0]

    noisy_out = out[(segments[0] == NOISY) & (positions[0] >= prompt_len)]  # not the tail copy
    resp_blk = masks.block_ids(torch.arange(prompt_len, prompt_len + 10), BLOCK)
    for block in resp_blk.unique().tolist():
        ref = reference_noisy_logits(model, prompt, response, noisy, BLOCK, block)
        torch.testing.assert_close(noisy_out[resp_blk == block], ref, atol=ATOL, rtol=0,
                                   msg=lambda m: f"block {block}: {m}")


@pytest.mark.parametrize(
    "prompt_len",
    [8, 5],
)
def test_two_copy_noisy_block_never_depends_on_its_clean_copy(model, prompt_len):
    """Rewriting the clean copy of block k leaves noisy block k alone but moves noisy block k+1."""
    g = torch.Generator().manual_seed(prompt_len)
    prompt, response = random_ids(g, prompt_len), random_ids(g, 10)
    noisy = noisy_copy(response, model.mask_token_id)
    ids, positions, segments = two_copy_batch([(prompt, response, noisy)], 256)
    mask = masks.two_copy_mask(positions, segments, BLOCK)
    base = run(model, ids, mask, positions)[0]
    clean_at = (segments[0] == CLEAN).nonzero().flatten()
    noisy_at = ((segments[0] == NOISY) & (positions[0] >= prompt_len)).nonzero().flatten()
    resp_blk = masks.block_ids(positions[0, clean_at], BLOCK)

    blocks = resp_blk.unique().tolist()
    for block, next_block in zip(blocks, blocks[1:] + [None]):
        changed = ids.clone()
        changed[0, clean_at[resp_blk == block]] = (ids[0, clean_at[resp_blk == block]] + 17) % 256
        out = run(model, changed, mask, positions)[0]
        own = noisy_at[resp_blk == block]
        torch.testing.assert_close(out[own], base[own], atol=ATOL, rtol=0,
                                   msg=lambda m: f"noisy block {block} sees its clean copy: {m}")
        if next_block is not None:
            nxt = noisy_at[resp_blk == next_block]
            assert (out[nxt] - base[nxt]).abs().max() > CHANGED, "later noisy block ignores clean"


def test_two_copy_with_left_padding_in_the_batch(model):
    g = torch.Generator().manual_seed(3)
    rows = []
    for prompt_len, response_len in ((5, 8), (8, 11), (10, 6)):  # aligned and unaligned prompts
        prompt, response = random_ids(g, prompt_len), random_ids(g, response_len)
        rows.append((prompt, response, noisy_copy(response, model.mask_token_id)))
    ids, positions, segments = two_copy_batch(rows, 256)
    assert (segments[:, 0] == PAD).sum() == 2, "two rows are left-padded"
    mask = masks.two_copy_mask(positions, segments, BLOCK)
    out = run(model, ids, mask, positions)
    assert out.isfinite().all()

    for row, (prompt, response, noisy) in enumerate(rows):
        p = len(prompt)
        noisy_out = out[row, (segments[row] == NOISY) & (positions[row] >= p)]
        resp_blk = masks.block_ids(torch.arange(p, p + len(response)), BLOCK)
        for block in resp_blk.unique().tolist():
            ref = reference_noisy_logits(model, prompt, response, noisy, BLOCK, block)
            torch.testing.assert_close(noisy_out[resp_blk == block], ref, atol=ATOL, rtol=0,
                                       msg=lambda m: f"row {row} block {block}: {m}")
