"""Unmasking rules: which masked positions of the current block to commit at one step.

One mechanism, pluggable rules.  Every rule gets the still-masked positions of the block, the
static quota of this step (the block's masked tokens spread evenly over its steps), and the
candidates' scores, and returns a boolean selection.  Every rule commits at least the quota, so a
block always finishes within its step budget; none can select a position that is not masked, so
fixed (prompt or already decoded) tokens are never overwritten.

Rules (reference notes upstream-inference.md §1.5, §2.1):
  static           top-quota by confidence (probability of the candidate)
  dynamic          every candidate with confidence > threshold, at least the top-quota
  sequential       the quota leftmost masked positions (AR order inside the block)
  entropy_bounded  lowest-entropy positions while their summed entropy stays below eb_threshold
                   (EB-sampler, arXiv 2505.24857), at least the quota
  random           quota random masked positions (LLaDA's random remasking)
  margin           top-quota by p(top1) - p(top2)
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tracerl.generation.sampling import Draw, Generators, is_per_row, per_row_uniform


def step_quota(masked_at_start, step, steps: int):
    """Tokens to commit at ``step`` (0-based) for each row: ``M`` masks spread over ``min(T, M)``
    steps as ``M // T' + (step < M % T')`` (upstream-inference.md §1.3, without its bug of
    scheduling a full block when the block starts with prompt tokens).  Integer tensors or numpy
    arrays (``quota_schedule`` tabulates it per block with numpy for the engine)."""
    m = masked_at_start
    t = m.clip(1, steps)  # min(M, T) steps, at least one
    quota = m // t + (step < m % t)
    return quota + (m - quota) * (step >= t)  # past the budget (never expected): everything left


@functools.lru_cache(maxsize=4096)
def quota_schedule(masked_at_start: int, steps: int) -> tuple[int, ...]:
    """``step_quota`` of a block with ``masked_at_start`` masks at each of its steps, as Python
    ints (the engine reads a request's quota per step without array work; few distinct pairs)."""
    budget = min(max(masked_at_start, 1), steps)
    return tuple(step_quota(np.full(budget, masked_at_start), np.arange(budget), steps).tolist())


def _rank(score, masked, descending: bool):
    """0-based rank of each masked position by score (unmasked ones rank last; ties: leftmost);
    torch tensors or numpy arrays (see ``select``)."""
    if isinstance(score, np.ndarray):  # a stable ascending sort of the negated scores: the same order
        keyed = np.where(masked, -score if descending else score, np.inf)
        if descending and np.isnan(score).any():  # torch sorts NaN as the largest: first when descending
            order = np.lexsort((keyed, ~(masked & np.isnan(score))), axis=-1)
        else:
            order = np.argsort(keyed, axis=-1, kind="stable")
        return np.argsort(order, axis=-1, kind="stable")
    fill = float("-inf") if descending else float("inf")
    order = torch.sort(torch.where(masked, score, fill), dim=-1, descending=descending, stable=True).indices
    return order.argsort(dim=-1)  # the inverse permutation: rank[order[j]] = j


def _top_by_score(score, masked, quota):
    """The ``quota[r]`` masked positions of row r with the highest score."""
    return masked & (_rank(score, masked, descending=True) < quota[:, None])


def select(
    strategy: str,
    draw: Draw,
    masked: torch.Tensor | np.ndarray,
    quota: torch.Tensor | np.ndarray,
    *,
    threshold: float,
    eb_threshold: float,
    generator: Generators,
) -> torch.Tensor | np.ndarray:
    """The positions to commit.  ``generator`` feeds the ``random`` rule: one generator for the
    batch, or one per row (row r's noise from row r's generator; None: the row draws nothing).

    ``masked`` and ``quota`` are tensors, or numpy arrays for a draw on the CPU: then every rule
    runs on numpy views of the draw and returns an array, with the same selection (the engine
    on the CPU: a rule is a handful of operations on a (B, b) block, and numpy's per-operation
    cost is a fraction of torch's)."""
    host = isinstance(masked, np.ndarray)
    xp = np if host else torch
    # Python floats: numpy would compare float32 scores with a numpy float64 threshold in float64,
    # torch rounds any float threshold to the scores' float32.
    threshold, eb_threshold = float(threshold), float(eb_threshold)
    on_host = np.asarray if host else lambda t: t  # a tensor of the draw, as the rule's array type
    quota = xp.minimum(quota, masked.sum(-1))
    if strategy == "static":
        return _top_by_score(on_host(draw.confidence), masked, quota)
    if strategy == "dynamic":
        confidence = on_host(draw.confidence)
        confident = masked & (confidence > threshold)
        enough = confident.sum(-1) >= quota
        return xp.where(enough[:, None], confident, _top_by_score(confidence, masked, quota))
    if strategy == "sequential":
        order = masked.cumsum(-1)  # 1-based rank among masked positions, left to right (int64)
        return masked & (order <= quota[:, None])
    if strategy == "random":
        device = draw.tokens.device
        if is_per_row(generator):
            noise = per_row_uniform(tuple(masked.shape), generator, device)
        else:
            noise = torch.rand(tuple(masked.shape), generator=generator, device=device)
        return _top_by_score(on_host(noise), masked, quota)
    if strategy == "margin":
        top2 = torch.topk(draw.probs, 2, dim=-1).values
        return _top_by_score(on_host(top2[..., 0] - top2[..., 1]), masked, quota)
    if strategy == "entropy_bounded":
        p = draw.probs
        entropy = on_host(-(p * p.clamp_min(1e-30).log()).sum(-1))
        ranked = _rank(entropy, masked, descending=False)
        sorted_entropy = xp.sort(xp.where(masked, entropy, float("inf")), -1)
        sorted_entropy = sorted_entropy if host else sorted_entropy.values
        # torch sums float32 in float64 and rounds each partial sum: numpy must do the same
        summed = sorted_entropy.cumsum(-1, dtype=np.float64).astype(np.float32) if host else sorted_entropy.cumsum(-1)
        within_budget = (summed < eb_threshold).sum(-1)
        count = xp.maximum(xp.minimum(within_budget, masked.sum(-1)), quota)
        return masked & (ranked < count[:, None])
    raise ValueError(f"unknown strategy {strategy!r}")
