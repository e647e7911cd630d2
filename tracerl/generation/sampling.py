"""Turning logits into candidate tokens and the scores the unmasking rules rank them by."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# One generator for the whole batch, or one per row (None: the row draws nothing).
Generators = torch.Generator | Sequence[torch.Generator | None] | None


@dataclass
class Draw:
    """Per position of the block being denoised: the candidate token and its scores."""

    tokens: torch.Tensor  # (B, b) long
    confidence: torch.Tensor  # (B, b) probability of the candidate under the sampling distribution
    probs: torch.Tensor  # (B, b, V) the sampling distribution (for margin / entropy rules)

    @property
    def logprob(self) -> torch.Tensor:
        """(B, b) log of ``confidence`` (computed when read: the engine reads it only for
        requests that return log-probs)."""
        return self.confidence.clamp_min(1e-30).log()


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """softmax(logits / T) restricted to top-k and the top-p nucleus, renormalised.

    Temperature 0 means greedy; the distribution is then the untempered softmax (its argmax is the
    greedy token, and its probabilities are the confidences the rules need).
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1:  # dividing by 1 changes nothing
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
    generator: Generators,
) -> Draw:
    """Sample (or take the argmax of) a candidate for every position of ``logits`` (B, b, V).

    ``generator`` is one generator for the whole batch (one ``torch.multinomial`` over all rows),
    or a sequence of one generator per row, so that row r's draws come from row r's stream only
    (``_sample_per_row``: same distribution); a row whose entry is None draws nothing and gets a
    placeholder candidate (its argmax) that the caller must not use.
    """
    if banned_ids is not None and banned_ids.numel():
        logits = logits.index_fill(-1, banned_ids, float("-inf"))
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    if temperature == 0:
        tokens = argmax_last_dim(probs)
    elif is_per_row(generator):
        tokens = _sample_per_row(probs, generator)
    else:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return Draw(tokens, confidence, probs)


def is_per_row(generator: Generators) -> bool:
    return generator is not None and not isinstance(generator, torch.Generator)


def _drawing_rows(generators: Sequence[torch.Generator | None], rows: int) -> list[int]:
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} generators for {rows} rows")
    return [r for r, g in enumerate(generators) if g is not None]


def per_row_uniform(shape: torch.Size | tuple[int, ...], generators: Sequence[torch.Generator | None],
                    device: torch.device) -> torch.Tensor:
    """U[0, 1) noise of ``shape`` (B, ...): row r is filled by one ``uniform_`` call on
    ``generators[r]``; rows whose generator is None are 0 and consume nothing."""
    noise = torch.zeros(shape, device=device)
    for r in _drawing_rows(generators, shape[0]):
        noise[r].uniform_(generator=generators[r])
    return noise


def _sample_per_row(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per position of ``probs`` (B, b, V); row r's tokens use ``generators[r]`` only.

    Exponential race: token = argmax_v p_v / E_v with E_v iid Exp(1), which picks v with
    probability p_v / sum(p), exactly.  It is the algorithm ``torch.multinomial`` itself runs for
    one sample per distribution (with torch 2.13 row r's tokens equal ``torch.multinomial(probs[r],
    1, generator=generators[r])``); only the b*V exponentials are drawn per row, the division and
    argmax are vectorised over the batch.  Rows without a generator keep E = 1: their argmax.
    """
    rows = _drawing_rows(generators, probs.shape[0])
    if probs.device.type == "cpu" and len(rows) == probs.shape[0]:
        race = cpu_exponentials(probs.shape, generators)
        if probs.dtype == race.dtype:  # float32 (draw's): the race is a tensor of its own, divided in place
            return argmax_last_dim(torch.div(probs, race, out=race))
    elif probs.device.type == "cpu":
        race = torch.ones_like(probs)
        if rows:
            race[rows] = cpu_exponentials(probs[rows].shape, [generators[r] for r in rows])
    else:
        race = torch.ones_like(probs)
        for r in rows:
            race[r].exponential_(1.0, generator=generators[r])
    return argmax_last_dim(probs / race)


def argmax_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``; for a float32/64 CPU tensor numpy's argmax, the same index (the first
    maximum on ties, the first NaN if any, like torch) about 5x faster on a (64, 4, 260) batch,
    where torch's kernel spends its time on short rows."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.asarray(x.numpy().argmax(-1)))
    return x.argmax(-1)


def cpu_exponentials(shape: torch.Size | tuple[int, ...], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Exp(1) float32 noise of ``shape`` (B, ...), row r the numbers ``exponential_`` draws from
    CPU ``generators[r]``, bit for bit, in about half the time.

    On the CPU, ``exponential_`` on float32 draws one float64 u ~ U[0, 1) per element and returns
    ``float(-log1p(-u))`` with libm's log1p, one element at a time (about 13 ns per element, most
    of a tiny model's sampling time).  ``uniform_`` on float64 draws the same u from the same
    stream position, so one ``uniform_`` per row and one vectorised log1p over the batch give the
    same numbers, except that the vectorised log1p may differ from libm's in the last bit of the
    float64: that changes the float32 only for a value within a few ulps of a float32 rounding
    midpoint (about 1 element in 10^7), so those few are recomputed with libm (``math.log1p``).
    CUDA's Philox streams differ, so CUDA rows keep ``exponential_``."""
    shape = tuple(shape)
    chunk = max(1, CHUNK_ELEMENTS // max(math.prod(shape[1:]), 1))  # float64 temporaries of a few rows at a time
    if len(generators) <= chunk:  # the usual case, one chunk: no copy into a batch tensor
        return exponential_from_uniform_(_row_uniforms(shape, generators))
    out = torch.empty(shape, dtype=torch.float32)
    for lo in range(0, len(generators), chunk):
        part = generators[lo:lo + chunk]
        out[lo:lo + len(part)] = exponential_from_uniform_(_row_uniforms((len(part), *shape[1:]), part))
    return out


def _row_uniforms(shape: tuple[int, ...], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """float64 U[0, 1) of ``shape``, row r drawn from ``generators[r]``."""
    u = torch.empty(shape, dtype=torch.float64)
    for row, g in zip(u.unbind(0), generators):  # one op for the row views, not one each
        row.uniform_(generator=g)
    return u


CHUNK_ELEMENTS = 2**22  # cpu_exponentials' float64 working set: 32 MiB per temporary


def exponential_from_uniform_(u: torch.Tensor) -> torch.Tensor:
    """``float32(-log1p(-u))`` with libm's log1p for float64 ``u`` (see ``cpu_exponentials``);
    overwrites ``u`` (with ``-u``: one float64 temporary fewer)."""
    log = torch.log1p(u.neg_())  # -E in float64; negated after the cast (half the bytes)
    out = log.float().neg_()
    # float64 -> float32 drops the low 29 mantissa bits (the sign is not among them); a tie is
    # exactly 2**28 of them.  The two log1p differ by at most a couple of float64 ulps, so only
    # values within 16 of a tie can round apart: |dropped - 2**28| <= 16, computed as
    # ((bits + 16 - 2**28) mod 2**29) <= 32, and first as a minimum (one pass, almost always > 32).
    distance = log.view(torch.int64).add(16 - 2**28).bitwise_and_(2**29 - 1)
    if distance.numel() and int(distance.min()) <= 32:
        at = (distance <= 32).nonzero(as_tuple=True)
        out[at] = torch.tensor([-math.log1p(v) for v in u[at].tolist()], dtype=torch.float64).float()
    return out
