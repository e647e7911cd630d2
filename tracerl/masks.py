"""Attention masks, the one place where who-sees-whom is decided.

All masks are boolean tensors of shape ``(batch, 1, queries, keys)`` with True = may attend, the
form transformers' Llama/Qwen2/Qwen3 accept as ``attention_mask`` (it overrides their built-in
causal mask).  Blocks are always computed from **absolute** token positions,
``block(i) = position(i) // block_size``, in sampling and in training alike, so the two can never
disagree (upstream aligns prompt blocks differently in its trainer, reference notes §8.3).

Padding is described by a boolean ``valid`` tensor (False = padding).  Padded keys are never
attended.  A query row that would attend nothing (a padding row) gets a self-loop so softmax never
sees an all-masked row (which gives NaN); such rows' outputs are garbage by construction and are
never read.

``flex_block_mask`` states the same rules for FlexAttention (GPU training, ``loop.attention=flex``):
a ``mask_mod`` reading per-token positions and segments, so memory grows with the tokens and the
128 x 128 tiles, not with a dense ``(L, L)`` mask per row.
"""

from __future__ import annotations

import torch

# Segment codes of the two-copy training layout [prompt | clean response | noisy response].
PAD, PROMPT, CLEAN, NOISY = 0, 1, 2, 3


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Position ids 0, 1, 2, ... over the valid tokens of each row (padding gets 0)."""
    pos = valid.long().cumsum(-1) - 1
    return pos.clamp_min(0) * valid.long()


def block_ids(positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(positions, block_size, rounding_mode="floor")


def _finish(allowed: torch.Tensor, key_valid: torch.Tensor | None, self_loop: bool) -> torch.Tensor:
    """Apply key padding, add self-loops to empty rows, and add the head axis."""
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    if self_loop:
        q, k = allowed.shape[-2:]
        empty = ~allowed.any(-1)  # (B, q)
        if empty.any():
            if q != k:
                raise ValueError("a query row attends nothing and queries != keys (no self-loop)")
            eye = torch.eye(q, dtype=torch.bool, device=allowed.device)
            allowed = allowed | (empty[:, :, None] & eye)
    return allowed[:, None, :, :]


def block_causal_mask(
    query_positions: torch.Tensor,
    block_size: int,
    *,
    key_positions: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query i may attend key j iff ``block(j) <= block(i)`` (causal across blocks, full inside).

    ``key_positions`` defaults to ``query_positions`` (self-attention over one sequence); give it
    separately when the keys include a KV cache of earlier blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    key_positions = query_positions if key_positions is None else key_positions
    qb = block_ids(query_positions, block_size)[:, :, None]
    kb = block_ids(key_positions, block_size)[:, None, :]
    return _finish(kb <= qb, key_valid, self_loop=key_positions is query_positions)


def causal_mask(
    query_positions: torch.Tensor,
    *,
    key_positions: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ordinary autoregressive mask: key position <= query position (block size 1)."""
    return block_causal_mask(
        query_positions, 1, key_positions=key_positions, key_valid=key_valid
    )


def full_mask(
    query_len: int, key_valid: torch.Tensor, *, query_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Bidirectional attention over every valid key (full-attention models such as LLaDA)."""
    batch, keys = key_valid.shape
    allowed = torch.ones(batch, query_len, keys, dtype=torch.bool, device=key_valid.device)
    return _finish(allowed, key_valid, self_loop=query_len == keys)


def mask_for_attention(
    attention: str,
    positions: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """The self-attention mask of one (possibly padded) sequence batch for an attention kind."""
    if attention == "block":
        return block_causal_mask(positions, block_size, key_valid=valid)
    if attention == "full":
        return full_mask(positions.shape[1], valid)
    if attention == "causal":
        return causal_mask(positions, key_valid=valid)
    raise ValueError(f"unknown attention kind {attention!r}; valid: block, full, causal")


def two_copy_layout(
    prompt_len: int, response_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns of one two-copy row: ``[prompt | clean response | noisy copy]``.

    The noisy copy starts at the first response block, so when the prompt length is not a
    multiple of the block size it begins with a copy of the prompt tail that shares that block:
    in sampling those prompt tokens are part of the block being denoised (they attend the
    block's masked tokens), so in training they must be too.  Returns ``positions`` (absolute),
    ``segments`` and ``source``: the index into ``prompt + response`` whose token fills each column
    (the trainer then replaces the masked ones in the noisy copy with the mask token).
    """
    tail = prompt_len % block_size if response_len else 0
    total = prompt_len + response_len
    sequence = torch.arange(total)
    noisy_src = torch.arange(prompt_len - tail, total)
    source = torch.cat([sequence, noisy_src])
    segments = torch.cat([
        torch.full((prompt_len,), PROMPT),
        torch.full((response_len,), CLEAN),
        torch.full((len(noisy_src),), NOISY),
    ])
    return source.clone(), segments, source


def two_copy_mask(
    positions: torch.Tensor, segments: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The TraceRL / block-SFT training mask over ``[prompt | clean response | noisy copy]``.

    ``segments`` holds PAD / PROMPT / CLEAN / NOISY per token and ``positions`` absolute
    positions, the noisy copy repeating those of the tokens it copies (see ``two_copy_layout``:
    the noisy copy covers whole blocks, so it includes a prompt tail sharing the first response
    block).  With ``b = block(query)``:

    * prompt and clean queries: block-causal over prompt and clean keys (``block(key) <= b``),
      i.e. the ordinary block-causal forward of the clean sequence;
    * noisy queries: prompt and clean keys of blocks strictly before ``b`` and the noisy keys of
      block ``b``, so noisy block b sees exactly the state the sampler saw when denoising it:
      never its own clean copy, never later blocks, never other noisy blocks;
    * padding is never attended.

    The layout is free: segments may come in any order, so packed sequences work too.
    """
    qb = block_ids(positions, block_size)[:, :, None]
    kb = block_ids(positions, block_size)[:, None, :]
    q_seg = segments[:, :, None]
    k_seg = segments[:, None, :]

    clean_query = (q_seg == PROMPT) | (q_seg == CLEAN)
    clean_key = (k_seg == PROMPT) | (k_seg == CLEAN)
    clean_stream = clean_query & clean_key & (kb <= qb)

    noisy_query = q_seg == NOISY
    noisy_sees_earlier_blocks = noisy_query & clean_key & (kb < qb)
    noisy_sees_own_block = noisy_query & (k_seg == NOISY) & (kb == qb)

    allowed = clean_stream | noisy_sees_earlier_blocks | noisy_sees_own_block
    return _finish(allowed, segments != PAD, self_loop=True)


def _flex_rule(kind: str, positions: torch.Tensor, segments: torch.Tensor, block_size: int):
    """``mask_mod(b, h, q, kv)`` of a mask kind: the dense builders' rule for one (query, key)
    pair, read from ``positions``/``segments`` ``(B, L)``; padding keys are never attended."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    def block(b, i):
        return torch.div(positions[b, i], block_size, rounding_mode="floor")

    def key_valid(b, kv):
        return segments[b, kv] != PAD

    if kind == "two_copy":
        def rule(b, h, q, kv):
            qs, ks, qb, kb = segments[b, q], segments[b, kv], block(b, q), block(b, kv)
            clean_key = (ks == PROMPT) | (ks == CLEAN)
            clean_stream = ((qs == PROMPT) | (qs == CLEAN)) & clean_key & (kb <= qb)
            noisy = (qs == NOISY) & ((clean_key & (kb < qb)) | ((ks == NOISY) & (kb == qb)))
            return clean_stream | noisy
    elif kind == "block":
        def rule(b, h, q, kv):
            return (block(b, kv) <= block(b, q)) & key_valid(b, kv)
    elif kind == "causal":
        def rule(b, h, q, kv):
            return (positions[b, kv] <= positions[b, q]) & key_valid(b, kv)
    elif kind == "full":
        def rule(b, h, q, kv):
            return key_valid(b, kv)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; valid: two_copy, block, full, causal")
    return rule


def flex_block_mask(kind: str, positions: torch.Tensor, segments: torch.Tensor, block_size: int):
    """The self-attention mask of a training batch as a FlexAttention ``BlockMask``: the same
    who-sees-whom as ``two_copy_mask`` / ``mask_for_attention`` for every valid query (tested
    pair by pair).  Padding query rows get no self-loop: FlexAttention returns zeros for a row
    that attends nothing, and those rows are never read."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = positions.shape
    return create_block_mask(_flex_rule(kind, positions, segments, block_size), batch, None, length, length,
                             device=positions.device)


def flex_rule_dense(kind: str, positions: torch.Tensor, segments: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flex_block_mask``'s rule evaluated at every (query, key) pair, ``(B, 1, L, L)``: what the
    BlockMask means, to compare with the dense masks (tests, debugging)."""
    batch, length = positions.shape
    rule = _flex_rule(kind, positions, segments, block_size)
    b = torch.arange(batch)[:, None, None]
    q = torch.arange(length)[None, :, None]
    kv = torch.arange(length)[None, None, :]
    return rule(b, 0, q, kv).expand(batch, length, length)[:, None]
