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


def two_copy_mask(
    positions: torch.Tensor, segments: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The TraceRL / block-SFT training mask over ``[prompt | clean response | noisy response]``.

    ``segments`` holds PAD / PROMPT / CLEAN / NOISY per token; ``positions`` are absolute
    positions, the noisy copy repeating those of the clean copy.  With ``b = block(query)``:

    * prompt and clean queries: block-causal over prompt and clean keys (``block(key) <= b``);
    * noisy queries see the prompt up to their own block (a prompt tail that shares the first
      response block is part of that block's state, as in sampling), clean response blocks
      strictly before ``b``, and noisy keys of their own block only: never their own clean copy,
      never later blocks, never other noisy blocks;
    * padding is never attended.

    The layout is free: segments may be packed in any order, so packed sequences work too.
    """
    qb = block_ids(positions, block_size)[:, :, None]
    kb = block_ids(positions, block_size)[:, None, :]
    q_seg = segments[:, :, None]
    k_seg = segments[:, None, :]

    clean_query = (q_seg == PROMPT) | (q_seg == CLEAN)
    clean_key = (k_seg == PROMPT) | (k_seg == CLEAN)
    sees_clean_context = clean_query & clean_key & (kb <= qb)

    noisy_query = q_seg == NOISY
    noisy_sees_prompt = noisy_query & (k_seg == PROMPT) & (kb <= qb)
    noisy_sees_earlier_clean = noisy_query & (k_seg == CLEAN) & (kb < qb)
    noisy_sees_own_block = noisy_query & (k_seg == NOISY) & (kb == qb)

    allowed = sees_clean_context | noisy_sees_prompt | noisy_sees_earlier_clean | noisy_sees_own_block
    return _finish(allowed, segments != PAD, self_loop=True)
