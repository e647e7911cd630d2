"""SFT objectives: each builds ``Rows`` with per-target weights; ``loss.sft_loss`` does the rest.

| method           | families        | rows per example              | targets                   | weight        |
|------------------|-----------------|-------------------------------|---------------------------|---------------|
| ``block``        | block           | 1 two-copy row                | masked tokens, every block| 1/t_block     |
| ``trace``        | all             | trace rounds (rows.py)        | each token exactly once   | 1             |
| ``random_masking``| full, shifted  | ``samples`` (x2 complementary)| masked tokens             | 1/(m t) [*]   |
| ``semi_ar``      | full, shifted   | 1 per response block          | masked tokens of the block| 1/t           |
| ``ar``           | shifted         | 1 clean causal row            | every token               | 1             |

[*] with ``complementary``: 1/(2 m t) on the masked set and 1/(2 m (1 - t)) on its complement.

Weights are chosen so that every response token has **expected total weight 1** per pass
(``E[1{masked}/t] = 1``), which makes the loss of loss.py an unbiased estimate of the per-token
masked-diffusion ELBO-style NLL and comparable across objectives.

Noise.  Masking levels ``t ~ U(low, high)`` are drawn **per block** (block SFT), per row (random
masking) or per block row (semi-AR), then each token is masked i.i.d. with probability ``t``.
Upstream draws a level per *position*, which collapses to Bernoulli((low+high)/2) (reference
notes §8.10); we do not.  A block (or row) whose draw masks nothing simply contributes no
targets (a row without targets is dropped): forcing a masked token would bias the 1/t weights,
while an empty draw keeps the estimator unbiased.

All draws come from the ``torch.Generator`` the caller passes, example after example in list
order, so a batch's rows equal the rows of its examples built one by one with the same
generator, the caller redraws every time it sees a batch, and a resumed run that restores the
generator state draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from tracerl.errors import ConfigError
from tracerl.objectives.examples import as_examples
from tracerl.objectives.rows import (
    Rows,
    RowParts,
    build_trace_rows,
    check_block_size,
    collate,
    default_pad_id,
    model_spec,
    response_blocks,
    single_row,
    two_copy_row,
)

SFT_METHODS = ("block", "trace", "random_masking", "semi_ar", "ar")
METHOD_FAMILIES = {
    "block": ("block",),
    "trace": ("block", "full", "shifted"),
    "random_masking": ("full", "shifted"),
    "semi_ar": ("full", "shifted"),
    "ar": ("shifted",),
}


def _check_family(method: str, spec) -> None:
    allowed = METHOD_FAMILIES[method]
    if spec.family not in allowed:
        valid = [m for m, fams in METHOD_FAMILIES.items() if spec.family in fams]
        raise ConfigError(
            f"sft method {method!r} is for the {'/'.join(allowed)} famil{'y' if len(allowed) == 1 else 'ies'}, "
            f"not {spec.family!r}; valid for {spec.family!r}: {', '.join(valid)}"
        )


def _check_levels(low: float, high: float, *, complementary: bool = False) -> None:
    top_ok = high < 1.0 if complementary else high <= 1.0
    if not (0.0 < low <= high and top_ok):
        bound = "< 1" if complementary else "<= 1"
        raise ConfigError(f"mask levels: need 0 < low <= high {bound}, got low={low!r}, high={high!r}")


def _rand(generator: torch.Generator, n: int) -> np.ndarray:
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator: pass a torch.Generator (noise must be reproducible)")
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()


def _levels(generator: torch.Generator, n: int, low: float, high: float) -> np.ndarray:
    return low + (high - low) * _rand(generator, n)


def block_sft_rows(
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator,
    *,
    low: float = 0.1,
    high: float = 0.9,
    block_size: int | None = None,
    pad_id: int | None = None,
) -> Rows:
    """Block SFT (BD3-LM style): one two-copy row per example; each response block gets its own
    level ``t ~ U(low, high)``, its tokens are masked i.i.d. with probability ``t`` and the masked
    ones are targets with weight ``1/t``.  Draws per example: one level per block (block order),
    then one uniform per response token."""
    spec = model_spec(spec)
    _check_family("block", spec)
    _check_levels(low, high)
    b = check_block_size(block_size, spec)
    exs = as_examples(examples)
    parts = []
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        if n == 0:
            continue
        blocks = response_blocks(p, n, b)
        t = _levels(generator, int(blocks[-1] - blocks[0]) + 1, low, high)[blocks - blocks[0]]
        masked = _rand(generator, n) < t
        parts.append(two_copy_row(ex, i, b, spec.mask_token_id, masked, masked, 0, 1.0 / t))
    return collate(parts, "two_copy", b, len(exs), default_pad_id(spec, pad_id))


def trace_sft_rows(
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator | None = None,
    *,
    shrink: int = 1,
    block_size: int | None = None,
    pad_id: int | None = None,
) -> Rows:
    """Trace SFT: the trace rows of rows.py as supervised targets, weight 1 (each token exactly
    once).  Deterministic; ``generator`` is accepted for a uniform signature and unused."""
    return build_trace_rows(spec, examples, shrink=shrink, block_size=block_size, pad_id=pad_id)


def random_masking_rows(
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator,
    *,
    low: float = 0.1,
    high: float = 0.9,
    samples: int = 1,
    complementary: bool = False,
    block_size: int | None = None,
    pad_id: int | None = None,
) -> Rows:
    """Random-masking SFT (LLaDA/Dream style): ``samples`` rows per example, each with its own
    ``t ~ U(low, high)`` and i.i.d. Bernoulli(t) masks over the response; weight ``1/(samples t)``.
    ``complementary`` adds the row with the complementary masked set, weights
    ``1/(2 samples t)`` and ``1/(2 samples (1-t))``.  Draws per row: the level, then one uniform
    per response token."""
    spec = model_spec(spec)
    _check_family("random_masking", spec)
    _check_levels(low, high, complementary=complementary)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be an integer >= 1, got {samples!r}")
    b = check_block_size(block_size, spec)
    exs = as_examples(examples)
    parts: list[RowParts] = []
    for i, ex in enumerate(exs):
        n = len(ex.response_ids)
        if n == 0:
            continue
        for _ in range(samples):
            t = float(_levels(generator, 1, low, high)[0])
            masked = _rand(generator, n) < t
            if complementary:
                rows = [(masked, 1.0 / (2 * samples * t)), (~masked, 1.0 / (2 * samples * (1 - t)))]
            else:
                rows = [(masked, 1.0 / (samples * t))]
            for m, w in rows:
                parts.append(single_row(ex, i, spec.logit_shift, spec.mask_token_id, m, m, 0, w,
                                        where=f"example {i}"))
    return collate(parts, spec.attention, b, len(exs), default_pad_id(spec, pad_id))


def semi_ar_rows(
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator,
    *,
    low: float = 0.1,
    high: float = 0.9,
    block_size: int | None = None,
    pad_id: int | None = None,
) -> Rows:
    """Semi-autoregressive SFT: one row per response block (absolute-position blocks): earlier
    blocks clean, the current block masked i.i.d. with ``t ~ U(low, high)``, later blocks all
    ``[M]``; targets = the current block's masked tokens, weight ``1/t``.  Draws per block row:
    the level, then one uniform per token of the block."""
    spec = model_spec(spec)
    _check_family("semi_ar", spec)
    _check_levels(low, high)
    b = check_block_size(block_size, spec)
    exs = as_examples(examples)
    parts: list[RowParts] = []
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        blocks = response_blocks(p, n, b)
        for k in np.unique(blocks):
            in_block = blocks == k
            t = float(_levels(generator, 1, low, high)[0])
            current = np.zeros(n, dtype=bool)
            current[in_block] = _rand(generator, int(in_block.sum())) < t
            masked = current | (blocks > k)
            parts.append(single_row(ex, i, spec.logit_shift, spec.mask_token_id, masked, current,
                                    int(k), 1.0 / t, where=f"example {i}"))
    return collate(parts, spec.attention, b, len(exs), default_pad_id(spec, pad_id))


def ar_rows(
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator | None = None,
    *,
    pad_id: int | None = None,
) -> Rows:
    """Plain autoregressive SFT (shifted family): causal attention, clean input, every response
    token a target with weight 1 (the loss is then the ordinary next-token NLL)."""
    spec = model_spec(spec)
    _check_family("ar", spec)
    exs = as_examples(examples)
    parts = []
    for i, ex in enumerate(exs):
        n = len(ex.response_ids)
        none, every = np.zeros(n, dtype=bool), np.ones(n, dtype=bool)
        parts.append(single_row(ex, i, spec.logit_shift, spec.mask_token_id, none, every,
                                where=f"example {i}"))
    return collate(parts, "causal", spec.block_size, len(exs), default_pad_id(spec, pad_id))


_BUILDERS: dict[str, Callable[..., Rows]] = {
    "block": block_sft_rows,
    "trace": trace_sft_rows,
    "random_masking": random_masking_rows,
    "semi_ar": semi_ar_rows,
    "ar": ar_rows,
}

METHOD_OPTIONS = {
    "block": ("low", "high", "block_size", "pad_id"),
    "trace": ("shrink", "block_size", "pad_id"),
    "random_masking": ("low", "high", "samples", "complementary", "block_size", "pad_id"),
    "semi_ar": ("low", "high", "block_size", "pad_id"),
    "ar": ("pad_id",),
}


def build_sft_rows(
    method: str,
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator | None = None,
    **options: Any,
) -> Rows:
    """Dispatch to the SFT row builder ``method`` (one of ``SFT_METHODS``)."""
    if method not in _BUILDERS:
        raise ConfigError(f"unknown sft method {method!r}; valid: {', '.join(SFT_METHODS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ConfigError(
            f"sft method {method!r}: unknown option(s) {unknown}; valid: {', '.join(METHOD_OPTIONS[method])}"
        )
    if generator is None and method in ("block", "random_masking", "semi_ar"):
        raise ConfigError(f"sft method {method!r} draws noise: pass a torch.Generator")
    return _BUILDERS[method](spec, examples, generator, **options)
