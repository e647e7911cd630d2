"""Turning logits into candidate tokens and the scores the unmasking rules rank them by."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draw:
    """Per position of the block being denoised: the candidate token and its scores."""

    tokens: torch.Tensor  # (B, b) long
    confidence: torch.Tensor  # (B, b) probability of the candidate under the sampling distribution
    logprob: torch.Tensor  # (B, b) log of that probability
    probs: torch.Tensor  # (B, b, V) the sampling distribution (for margin / entropy rules)


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """softmax(logits / T) restricted to top-k and the top-p nucleus, renormalised.

    Temperature 0 means greedy; the distribution is then the untempered softmax (its argmax is the
    greedy token, and its probabilities are the confidences the rules need).
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # Keep the shortest prefix reaching top_p: a token is dropped when the mass before it
        # already reaches top_p (the top-1 always stays).
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    banned_ids: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Draw:
    """Sample (or take the argmax of) a candidate for every position of ``logits`` (B, b, V)."""
    if banned_ids is not None and banned_ids.numel():
        logits = logits.index_fill(-1, banned_ids, float("-inf"))
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    if temperature == 0:
        tokens = probs.argmax(-1)
    else:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return Draw(tokens, confidence, confidence.clamp_min(1e-30).log(), probs)
