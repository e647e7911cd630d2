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


def _rank(score: torch.Tensor, masked: torch.Tensor, descending: bool) -> torch.Tensor:
    """0-based rank of each masked position by score (unmasked ones rank last; ties: leftmost)."""
    fill = float("-inf") if descending else float("inf")
    order = torch.sort(torch.where(masked, score, fill), dim=-1, descending=descending, stable=True).indices
    return order.argsort(dim=-1)  # the inverse permutation: rank[order[j]] = j


def _top_by_score(score: torch.Tensor, masked: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """The ``quota[r]`` masked positions of row r with the highest score."""
    return masked & (_rank(score, masked, descending=True) < quota[:, None])


def select(
    strategy: str,
    draw: Draw,
    masked: torch.Tensor,
    quota: torch.Tensor,
    *,
    threshold: float,
    eb_threshold: float,
    generator: Generators,
) -> torch.Tensor:
    """The positions to commit.  ``generator`` feeds the ``random`` rule: one generator for the
    batch, or one per row (row r's noise from row r's generator; None: the row draws nothing)."""
    quota = torch.minimum(quota, masked.sum(-1))
    if strategy == "static":
        return _top_by_score(draw.confidence, masked, quota)
    if strategy == "dynamic":
        confident = masked & (draw.confidence > threshold)
        enough = confident.sum(-1) >= quota
        return torch.where(enough[:, None], confident, _top_by_score(draw.confidence, masked, quota))
    if strategy == "sequential":
        order = masked.long().cumsum(-1)  # 1-based rank among masked positions, left to right
        return masked & (order <= quota[:, None])
    if strategy == "random":
        if is_per_row(generator):
            noise = per_row_uniform(masked.shape, generator, masked.device)
        else:
            noise = torch.rand(masked.shape, generator=generator, device=masked.device)
        return _top_by_score(noise, masked, quota)
    if strategy == "margin":
        top2 = torch.topk(draw.probs, 2, dim=-1).values
        return _top_by_score(top2[..., 0] - top2[..., 1], masked, quota)
    if strategy == "entropy_bounded":
        p = draw.probs
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        ranked = _rank(entropy, masked, descending=False)
        sorted_entropy = torch.sort(entropy.masked_fill(~masked, float("inf")), dim=-1).values
        within_budget = (sorted_entropy.cumsum(-1) < eb_threshold).sum(-1)
        count = torch.maximum(torch.minimum(within_budget, masked.sum(-1)), quota)
        return masked & (ranked < count[:, None])
    raise ValueError(f"unknown strategy {strategy!r}")
