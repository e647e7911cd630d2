"""RL objective pieces: rows, group advantages, the PPO-clip policy loss and its normaliser.

No training loop here; the RL loop composes these (reference notes §1.3, §2.6, §3.5, §5):

    rows = rl_rows(method, model.spec, examples, generator, ...)       # one RL step's rows
    adv, keep = group_advantages(rewards, group_ids, ...)              # per response
    rows = rows.select_examples(keep.nonzero().flatten())              # dropped groups: no rows
    old = target_logprobs(model, rows, policy=True) under no_grad   # before any update
    for each optimizer batch (a set of whole responses):
        n = rl_normaliser(normalisation, batch_examples, num_rows=...)
        for each micro-batch mb of its rows:
            logp = target_logprobs(model, mb, policy=True)
            loss, stats = policy_loss(logp, old[mb], adv[mb.target_example], normaliser=n,
                                      weights=mb.target_weight, ...)
            loss.backward()                                            # sums to the batch loss

Methods (``rl_rows``), every family:

| method           | rows per response                           | targets                        | weight |
|------------------|---------------------------------------------|--------------------------------|--------|
| ``tracerl``      | trace rounds (``build_trace_rows``)         | each token exactly once        | 1      |
| ``random_masking``| ``mask_samples`` random corruptions        | the masked tokens              | 1/m    |
| ``coupled``      | ``mask_samples`` x (mask, complement) pairs | each token once per pair       | 1/m    |

Weights.  In the policy loss a target counts once, multiplied by its advantage: the SFT
builders' ``1/t`` weights make the masked-diffusion NLL an ELBO estimate, which the PPO
surrogate is not, so they are dropped (upstream uses none, reference notes §5).  The one weight
kept is ``1/mask_samples``: it averages a response's ``m`` corruptions instead of summing them, so
the loss scale does not grow with ``m``; with ``m = 1`` (the default) every weight is exactly 1,
as upstream, and ``coupled`` then gives every response token total weight exactly 1, like
``tracerl``.

Noise (random_masking / coupled) follows the SFT builders: the block family draws one level
``t ~ U(low, high)`` per response block (two-copy rows: every block is an independent denoising
state, as in block SFT), the full and shifted families one level per row
(``sft.random_masking_rows`` itself); each token is then masked i.i.d. with probability ``t``.
Upstream draws a level per *position*, i.e. Bernoulli((low+high)/2) (reference notes §8.10).
Masks come from the caller's ``torch.Generator``; old log-probs must be computed on the same rows
(build the rows once per RL step, never redraw between the old and the new pass).

Normalisation (``rl_normaliser``): ``loss = Σ_targets w_j · (−surrogate_j + β k3_j) / N``.

* ``token_mean`` (default): ``N`` = number of response tokens of the responses whose rows form
  the optimizer batch (our SFT convention, loss.py).  Every response token of the batch counts
  the same whatever its length, its step size or the padding; ``N`` is a constant of the
  optimizer step, so the loss does not depend on micro-batching (sum the micro-batch losses;
  do not divide by the accumulation count).  Contract: an optimizer batch is a set of *whole*
  responses (all of their rows); rows may be shuffled freely inside it.
* ``upstream``: ``N = L1 · (rows in the optimizer batch)``: upstream's per-row ``Σ_T / L1`` with
  the constant padded response length ``L1`` (the longest response of the RL step, capped by
  ``max_gen_length``), averaged over rows (reference notes §2.6).  A token's weight then
  depends on how many rows its response was cut into and on the longest response of the step
  (§8.11).  Kept for reproducing upstream runs.

``token_mean`` is the default because it is invariant to padding, to micro-batching and to
response length, and it is the same normaliser as our SFT loss, so learning rates transfer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.objectives.examples import Example, as_examples
from tracerl.objectives.loss import check_normaliser
from tracerl.objectives.rows import (
    Rows,
    RowParts,
    build_trace_rows,
    check_block_size,
    collate,
    default_pad_id,
    model_spec,
    response_blocks,
    row_layout,
    single_row,
    two_copy_row,
)
from tracerl.objectives.sft import random_masking_rows

RL_METHODS = ("tracerl", "random_masking", "coupled")
NORMALISATIONS = ("token_mean", "upstream")
DEFAULT_NORMALISATION = "token_mean"


# -- rows -------------------------------------------------------------------------------------


def uniforms(generator: torch.Generator, n: int) -> np.ndarray:
    """``n`` float64 uniforms from the caller's generator (the draws every mask builder uses, as sft.py)."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()


def _block_random_rows(spec, exs, generator, *, low, high, samples, coupled, block_size, pad_id) -> Rows:
    """Two-copy random-masking rows; per sample: one level per block, one uniform per token
    (the draw order of ``sft.block_sft_rows``), then the complement row when ``coupled``."""
    b = block_size
    parts: list[RowParts] = []
    weight = 1.0 / samples
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        if n == 0:
            continue
        blocks = response_blocks(p, n, b)
        for _ in range(samples):
            levels = low + (high - low) * uniforms(generator, int(blocks[-1] - blocks[0]) + 1)
            masked = uniforms(generator, n) < levels[blocks - blocks[0]]
            for m in ((masked, ~masked) if coupled else (masked,)):
                parts.append(two_copy_row(ex, i, b, spec.mask_token_id, m, m, 0, weight))
    return collate(parts, "two_copy", b, len(exs), default_pad_id(spec, pad_id))


def rl_rows(
    method: str,
    spec: Any,
    examples: Iterable[Any],
    generator: torch.Generator | None = None,
    *,
    shrink: int = 1,
    block_size: int | None = None,
    mask_samples: int = 1,
    low: float = 0.1,
    high: float = 0.9,
    pad_id: int | None = None,
) -> Rows:
    """The policy-loss rows of one RL step (see the module docstring for methods and weights).

    ``spec`` is a ``DiffusionSpec`` or a model carrying one.  ``tracerl`` uses ``shrink`` and is
    deterministic (``generator`` unused); ``random_masking`` and ``coupled`` use ``generator``,
    ``mask_samples``, ``low`` and ``high``.  Targets keep ``target_example`` = the index of the
    example in ``examples``, so per-response advantages broadcast as ``adv[rows.target_example]``.
    """
    if method not in RL_METHODS:
        raise ConfigError(f"unknown rl method {method!r}; valid: {', '.join(RL_METHODS)}")
    spec = model_spec(spec)
    if method == "tracerl":
        return build_trace_rows(spec, examples, shrink=shrink, block_size=block_size, pad_id=pad_id)
    if generator is None:
        raise ConfigError(f"rl method {method!r} draws masks: pass a torch.Generator")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator: pass a torch.Generator (masks must be reproducible)")
    if isinstance(mask_samples, bool) or not isinstance(mask_samples, int) or mask_samples < 1:
        raise ConfigError(f"mask_samples must be an integer >= 1, got {mask_samples!r}")
    coupled = method == "coupled"
    if not (0.0 < low <= high and (high < 1.0 if coupled else high <= 1.0)):
        bound = "< 1 (the complement would be empty)" if coupled else "<= 1"
        raise ConfigError(f"mask levels: need 0 < low <= high {bound}, got low={low!r}, high={high!r}")
    b = check_block_size(block_size, spec)
    exs = as_examples(examples)
    if spec.family == "block":
        return _block_random_rows(spec, exs, generator, low=low, high=high, samples=mask_samples,
                                  coupled=coupled, block_size=b, pad_id=pad_id)
    rows = random_masking_rows(spec, exs, generator, low=low, high=high, samples=mask_samples,
                               complementary=coupled, block_size=b, pad_id=pad_id)
    # Drop the SFT 1/t weights (see the module docstring); keep the 1/m average.
    return replace(rows, target_weight=torch.full_like(rows.target_weight, 1.0 / mask_samples))


def prompt_masked_row(spec, canvas: Example, index: int, block_size: int, masked, target, weight: float,
                      hidden_prompt: np.ndarray) -> RowParts:
    """A row of ``canvas`` (two-copy for the block family, else single-copy) whose prompt positions
    where ``hidden_prompt`` is True hold ``[M]``: in both copies of the two-copy layout (the prompt
    and the copy of its tail that opens the noisy copy), so every block sees the same prompt."""
    p, m = len(canvas.prompt_ids), len(canvas.response_ids)
    if spec.family == "block":
        part = two_copy_row(canvas, index, block_size, spec.mask_token_id, masked, target, 0, weight)
        source = masks.two_copy_layout(p, m, block_size)[2].numpy()
    else:
        part = single_row(canvas, index, spec.logit_shift, spec.mask_token_id, masked, target, 0, weight,
                          where=f"example {index}")
        source = np.arange(p + m)
    cols = np.flatnonzero(source < p)
    part.ids[cols[hidden_prompt[source[cols]]]] = spec.mask_token_id
    return part


def one_step_rows(spec, examples, generator: torch.Generator, *, prompt_mask: float = 0.15,
                  block_size: int | None = None, pad_id: int | None = None,
                  weights: Sequence[float] | None = None) -> Rows:
    """d1's one-step log-likelihood estimate (arXiv 2504.12216 §3.1; d1, wd1 and others use it).

    One row per response: every response token ``[M]`` and a target (weight ``weights[i]``, default 1), each prompt
    token ``[M]`` with probability ``prompt_mask`` (one float64 uniform per prompt token from
    ``generator``, example after example), the sampler's post-stop tail kept as masked
    non-target positions (block family: those of the last response block, the rest reach no
    target).  Block family: a two-copy row (noisy copy all ``[M]``; a masked prompt
    token is masked in both copies); full / shifted: a single-copy row with the model's
    attention.  Targets keep ``target_example`` = the example's index."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator: pass a torch.Generator (prompt masks must be reproducible)")
    spec, b, two_copy = row_layout(spec, block_size)
    exs = as_examples(examples)
    parts = []
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        if n == 0:
            continue
        hidden_prompt = uniforms(generator, p) < prompt_mask
        tail = ex.tail_ids
        if two_copy:  # tail positions past the last response block reach no target: left out
            tail = tail[: (p + n + b - 1) // b * b - (p + n)]
        canvas = Example(ex.prompt_ids, ex.response_ids + tail)
        m = len(canvas.response_ids)
        masked, target = np.ones(m, dtype=bool), np.arange(m) < n
        weight = 1.0 if weights is None else float(weights[i])
        parts.append(prompt_masked_row(spec, canvas, i, b, masked, target, weight, hidden_prompt))
    return collate(parts, "two_copy" if two_copy else spec.attention, b, len(exs), default_pad_id(spec, pad_id))


# -- advantages -------------------------------------------------------------------------------


def _numpy(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def group_advantages(
    rewards: Sequence[float] | np.ndarray | torch.Tensor,
    group_ids: Sequence[Any] | np.ndarray | torch.Tensor,
    *,
    filter_equal: bool = True,
    accuracy_band: tuple[float, float] | None = None,
    correct: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    scale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised advantages (GRPO style, reference notes §1.3) and a keep mask.

    ``A_i = (r_i − mean_g) / std_g`` over the responses of i's group g, with the population
    std (divide by the group size); ``A_i = 0`` when the group's rewards are all equal (checked
    exactly, not by a float std that rounding can make tiny but non-zero).  ``scale=False``:
    ``A_i = r_i − mean_g`` (Dr. GRPO, d1's Eq. (2): no division by the std).

    ``keep[i]`` is False when i's group is dropped: with ``filter_equal``, groups whose rewards
    are all equal (they carry no signal); with ``accuracy_band = (lo, hi)``, groups whose
    fraction of ``correct`` responses lies outside ``[lo, hi]`` (upstream math: (0.2, 0.8)).
    ``correct`` defaults to the rewards themselves when they are all 0/1.

    Both outputs are aligned with the input: ``advantages[i]`` is always response i's
    advantage, dropped or not (computed from its whole group).  Nothing is re-indexed; select
    with ``keep`` (e.g. ``rows.select_examples(keep.nonzero().flatten())``).
    Returns ``(advantages float32 (n,), keep bool (n,))``.
    """
    r = _numpy(rewards, np.float64)
    g = _numpy(group_ids)
    if r.shape != g.shape:
        raise ValueError(f"rewards ({r.size}) and group_ids ({g.size}) must have the same length")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite")
    n = r.size
    if n == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    _, inv = np.unique(g, return_inverse=True)
    inv = inv.reshape(-1)
    k = int(inv.max()) + 1
    size = np.bincount(inv, minlength=k).astype(np.float64)
    mean = np.bincount(inv, weights=r, minlength=k) / size
    var = np.bincount(inv, weights=(r - mean[inv]) ** 2, minlength=k) / size
    std = np.sqrt(var)
    gmax = np.full(k, -np.inf)
    gmin = np.full(k, np.inf)
    np.maximum.at(gmax, inv, r)
    np.minimum.at(gmin, inv, r)
    equal = gmax == gmin
    safe_std = np.where(equal, 1.0, std)
    adv = np.where(equal[inv], 0.0, (r - mean[inv]) / (safe_std[inv] if scale else 1.0))

    keep_group = np.ones(k, dtype=bool)
    if filter_equal:
        keep_group &= ~equal
    if accuracy_band is not None:
        lo, hi = (float(x) for x in accuracy_band)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"accuracy_band: need 0 <= lo <= hi <= 1, got {accuracy_band!r}")
        if correct is None:
            if not np.isin(r, (0.0, 1.0)).all():
                raise ConfigError("accuracy_band needs `correct` (the rewards are not all 0/1)")
            c = r
        else:
            c = _numpy(correct, np.float64)
            if c.shape != r.shape:
                raise ValueError(f"correct ({c.size}) and rewards ({n}) must have the same length")
        acc = np.bincount(inv, weights=c, minlength=k) / size
        tol = 1e-9
        keep_group &= (acc >= lo - tol) & (acc <= hi + tol)
    return torch.from_numpy(adv.astype(np.float32)), torch.from_numpy(keep_group[inv].copy())


# -- policy loss ------------------------------------------------------------------------------


def rl_normaliser(
    normalisation: str,
    examples: Iterable[Any],
    *,
    num_rows: int | None = None,
    response_length: int | None = None,
) -> float:
    """The constant ``N`` of one optimizer batch (module docstring).

    ``examples``: the responses whose rows form the optimizer batch.  ``token_mean``: their
    number of response tokens.  ``upstream``: ``response_length · num_rows`` with ``num_rows`` the
    rows of the optimizer batch and ``response_length`` upstream's ``L1`` (pass the longest
    response of the whole RL step, capped by ``max_gen_length``, to match upstream; default: the
    longest response among ``examples``).
    """
    if normalisation not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
    lengths = [len(ex.response_ids) for ex in as_examples(examples)]
    if normalisation == "token_mean":
        return check_normaliser(sum(lengths))
    if num_rows is None:
        raise ConfigError("normalisation 'upstream' needs num_rows (rows in the optimizer batch)")
    length = max(lengths, default=0) if response_length is None else int(response_length)
    return check_normaliser(length * int(num_rows))


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float | None = 10.0) -> torch.Tensor:
    """The k3 KL estimator per token, ``exp(d) − 1 − d`` with ``d = ref − logp`` (≥ 0, 0 iff equal).

    ``d`` is clamped to ``[−clamp, clamp]`` in both terms (upstream clamps only the exponent),
    which keeps the estimate finite and non-negative; beyond the clamp it has no gradient."""
    d = ref_logprobs - logprobs
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    return d.exp() - 1.0 - d


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, weights: torch.Tensor, *, beta: float,
               normaliser: float, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(β Σ_j w_j k3_j / normaliser, k3 per target)``: the KL term every policy loss adds (a
    zero without gradient when ``β = 0``)."""
    kl = k3(logprobs, ref_logprobs, clamp)
    loss = beta * (weights * kl).sum() / normaliser if beta else torch.zeros((), dtype=logprobs.dtype,
                                                                              device=logprobs.device)
    return loss, kl


def _as_targets(value: Any, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()
    if t.dim() == 0:
        return t.expand_as(like)
    if t.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(like.shape)} (one per target)")
    return t


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor | float,
    *,
    normaliser: float,
    eps: float = 0.2,
    logratio_clamp: float | None = 10.0,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss over the targets at hand (a micro-batch), reference notes §2.6:

        ρ_j   = exp(clamp(logp_j − old_j, −c, c))
        s_j   = min(ρ_j A_j, clip(ρ_j, 1−ε, 1+ε) A_j)
        k3_j  = exp(ref_j − logp_j) − 1 − (ref_j − logp_j)
        loss  = Σ_j w_j (−s_j + β k3_j) / normaliser

    ``ref_logprobs`` defaults to ``old_logprobs`` (upstream: a proximal penalty, 0 at the first
    micro-batch); pass a frozen initial model's log-probs to anchor the policy instead.
    ``normaliser`` comes from ``rl_normaliser``.  ``weights`` default 1 (pass
    ``rows.target_weight``).  ``old_logprobs``, ``advantages``, ``ref_logprobs`` and ``weights``
    are treated as constants (detached).

    The min is written as a select: clipped (no gradient) exactly when ``A > 0`` and
    ``ρ > 1+ε`` or ``A < 0`` and ``ρ < 1−ε``; on the boundary the unclipped branch is used (the
    two are equal there), so the gradient is never split between branches.

    Stats (floats, over targets, unweighted): ``loss``, ``pg_loss``/``kl_loss`` (the two parts
    of the loss), ``ratio_mean``, ``clip_fraction``, ``approx_kl`` (mean k3 against the old
    policy: how far this update has moved), ``ref_kl`` (mean k3 against the reference: the
    penalised quantity), ``adv_mean``, ``targets``, ``normaliser``.
    """
    n = check_normaliser(normaliser)
    if not eps > 0:
        raise ConfigError(f"eps must be > 0, got {eps!r}")
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D (one per target), got shape {tuple(logprobs.shape)}")
    old = _as_targets(old_logprobs, logprobs, "old_logprobs")
    adv = _as_targets(advantages, logprobs, "advantages")
    w = torch.ones_like(logprobs) if weights is None else _as_targets(weights, logprobs, "weights")
    ref = old if ref_logprobs is None else _as_targets(ref_logprobs, logprobs, "ref_logprobs")

    logratio = logprobs - old
    if logratio_clamp is not None:
        logratio = logratio.clamp(-logratio_clamp, logratio_clamp)
    ratio = logratio.exp()
    clipped = ((adv > 0) & (ratio > 1.0 + eps)) | ((adv < 0) & (ratio < 1.0 - eps))
    surrogate = torch.where(clipped, ratio.clamp(1.0 - eps, 1.0 + eps) * adv, ratio * adv)
    pg_loss = -(w * surrogate).sum() / n
    kl_loss, kl_ref = kl_penalty(logprobs, ref, w, beta=beta, normaliser=n, clamp=logratio_clamp)
    loss = pg_loss + kl_loss

    with torch.no_grad():
        t = logprobs.numel()

        def mean(x: torch.Tensor) -> float:
            return float(x.float().mean()) if t else 0.0

        stats = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg_loss.detach()),
            "kl_loss": float(kl_loss.detach()),
            "ratio_mean": mean(ratio),
            "clip_fraction": mean(clipped),
            "approx_kl": mean(k3(logprobs, old, logratio_clamp)),
            "ref_kl": mean(kl_ref),
            "adv_mean": mean(adv),
            "targets": t,
            "normaliser": n,
        }
    return loss, stats
