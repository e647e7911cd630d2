"""wd1: weighted policy optimisation for diffusion LMs (Tang, Dolga, Yoon, Bogunovic, arXiv
2507.08838, ICLR 2026; public code github:xiaohangt/wd1).

A ratio-free objective: a weighted log-likelihood of the policy's own samples.  Only the current
policy's likelihood is estimated (no old-policy ratio, no clipping, no reference term), so the
estimation error of a diffusion model's log-likelihood is never exponentiated.

Objective, per prompt q with a group of G responses o_1..o_G and rewards r_i:

    A_i   = r_i − mean_j r_j                                     (group-centred, no std)
    w⁺_i  = exp(ψ A_i) / Σ_j exp(ψ A_j)                          (softmax over the group)
    w⁻_i  = exp(−ψ A_i) / Σ_j exp(−ψ A_j)
    L(θ)  = − Σ_i w⁺_i log π_θ(o_i|q) + Σ_i w⁻_i log π_θ(o_i|q)
          = − Σ_i (w⁺_i − w⁻_i) log π_θ(o_i|q)

Positive weights raise the likelihood of above-average responses (the paper's energy-guided /
advantage-weighted fit of π_old·exp(ψA)), negative weights lower that of below-average ones (the
"negative sample unlearning" term).  ``log π_θ(o|q)`` is d1's one-step estimate: one forward in
which every response token is ``[M]`` and each prompt token is replaced by ``[M]`` with
probability ``prompt_mask``; ``log π_θ(o|q) ≈ Σ_t log p_θ(o_t | masked state)`` summed over the
response's tokens (upstream sums up to and including the stop token, no length normalisation).
A new prompt mask is drawn for every inner update (``rows_per_epoch``).

Sources.  The paper body (its equation numbers) could not be read from this workplace; the
formulas above are the public code's (commit 0898985: wd1/trainers/rev_grpo_trainer.py,
``compute_loss``, the ``wll_d1_neg`` trainer that the README's wd1 scripts run/wll_NP_*.sh
launch), and they match the abstract's description (ratio-free weighted log-likelihood of
positive and negative samples, a single likelihood approximation).  Upstream facts and defaults:

* ψ: the code has no temperature, i.e. ψ = 1 (``torch.softmax(advantages)``): default ``psi = 1``.
* advantages: rewards minus the group mean; the std is computed but not used.
* negatives: on in wd1 (``wll_d1_neg``); ``wll_d1_pos_only`` (run/wll_P_*.sh) is the
  positive-only ablation: ``negative = false`` here.
* prompt masking: ``p_mask_prompt: 0.15`` (wd1/train.yaml; the config class default 0.3 is
  overridden), every completion token masked (``forward_process``), a new mask seed per inner
  iteration (``random_masking: True``): default ``prompt_mask = 0.15``.
* inner updates: ``num_iterations = 12`` (run scripts): set ``policy.ppo_epochs=12`` to match
  (this library's default is 1); other upstream settings: lr 3e-6, 6 responses per prompt,
  ``max_grad_norm`` 0.2, LoRA r=128 on a 4-bit LLaDA-8B-Instruct.
* no KL / reference term in the loss (``beta: 0.04`` in train.yaml only loads TRL's reference
  model; the ``wll_d1_neg_ref`` variant mixes reference logits into *sampling*, not the loss), and
  no clipping (train.yaml's ``epsilon: 0.5`` is unused by this loss).

Where we differ, and why:

* Per-response weights are ``c_i = G·(w⁺_i − w⁻_i)`` (returned by ``advantages``) and the loss is
  ``Σ_targets tw_j · (−c_{e(j)} · logp_j) / normaliser`` with ``tw_j`` the target weights (1) and the
  library's optimizer-batch normaliser (``policy.normalisation``), so micro-batching and
  ``rows_per_forward`` change nothing.  Within an optimizer batch every token of response i has
  the same weight ``c_i`` as upstream; only a per-step constant differs: with ``token_mean`` our
  loss is the mean over the batch's groups of upstream's per-group loss, divided by the batch's
  mean response length; with ``upstream`` (one row per response here), divided by ``L1``.  The factor G (constant: groups
  are whole) makes the weights O(1) like a z-scored advantage, so learning rates transfer between
  algorithms.  Σ_i c_i = 0 within a group.
* Upstream takes the softmax over a device micro-batch, which in its shipped configuration
  (per-device batch 6 = ``num_generations`` 6) is exactly one prompt's group; we take it over each
  group explicitly (``group_ids``).
* All-equal groups: every weight is exactly 1/G, so ``c = 0`` and they contribute no gradient
  (upstream keeps them: forwards for a zero gradient).  ``policy.filter_equal`` (default true) drops them like
  every other algorithm, which changes only the ``token_mean`` normaliser; with
  ``negative = false`` their ``c = 1`` (upstream's positive-only variant then fits them).
  ``policy.accuracy_band`` filters as for the base class.
* The one-step row keeps the sampler's post-stop tail (``Example.tail_ids``) as masked,
  never-targeted positions, as upstream feeds the whole masked completion canvas (block family:
  only the tail inside the last response block, the rest reaches no target); prompt masking never
  touches padding (upstream masks its left padding too; ours is never attended).
* Families.  ``full``/``shifted``: one single-copy row ``[prompt (randomly masked) | all [M]]``
  with the model's attention, d1's estimate as is (targets read one column left for ``shifted``).
  ``block``: a two-copy row whose noisy copy is entirely ``[M]``, so block k is predicted from the
  (randomly masked) prompt, the clean blocks before k and its own fully masked block: the state
  in which a block sampler starts each block.  Masking everything (earlier blocks too) would be a
  state a block-causal model never sees.  A masked prompt token is masked in both of its copies.
* ``policy.beta > 0`` adds ``β·k3`` against ``policy.kl_reference`` (the rollout policy's
  log-probs, or the frozen initial model's), an extension: upstream wd1 has none (default 0).
  ``policy.eps`` is unused (no ratio, no clipping); ``policy.logratio_clamp`` clamps k3.
* The loop computes old log-probs for every row set (before the first update); wd1 does not need
  them for its loss; they feed ``approx_kl`` (mean k3 of the current policy against the rollout
  policy on the pass's rows: how far the updates have moved it).  No ratio or clip fraction is
  reported: wd1 has neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tracerl.errors import ConfigError
from tracerl.objectives import k3, one_step_rows
from tracerl.objectives.rl import kl_penalty
from tracerl.objectives.loss import check_normaliser
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.base import Algorithm


@dataclass
class WD1Options:
    psi: float = 1.0  # weight temperature: w+ = softmax(psi * A), w- = softmax(-psi * A) over the group
    negative: bool = True  # the w- term (false: upstream's positive-only ablation, wll_d1_pos_only)
    prompt_mask: float = 0.15  # probability that a prompt token is [M] in the one-step estimate (p_mask_prompt)

    def __post_init__(self) -> None:
        if not (isinstance(self.psi, (int, float)) and math.isfinite(self.psi) and self.psi > 0):
            raise ConfigError(f"psi: must be a finite number > 0, got {self.psi!r}")
        if not (isinstance(self.prompt_mask, (int, float)) and 0.0 <= self.prompt_mask < 1.0):
            raise ConfigError(f"prompt_mask: must be in [0, 1), got {self.prompt_mask!r}")


# -- weights ------------------------------------------------------------------------------------


def wd1_weights(rewards, group_ids, *, psi: float = 1.0, negative: bool = True) -> torch.Tensor:
    """Per-response weights ``c_i = G_g·(w⁺_i − w⁻_i)`` (module docstring), aligned with the input.

    ``A_i = r_i − mean_g r`` over i's group g (exactly 0 when the group's rewards are all equal),
    ``w⁺ = softmax_g(ψ A)``, ``w⁻ = softmax_g(−ψ A)`` (0 without ``negative``), ``G_g`` the group's
    size.  Float64 inside, float32 out."""
    r = np.asarray(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards,
                   dtype=np.float64).reshape(-1)
    g = np.asarray(group_ids.detach().cpu() if isinstance(group_ids, torch.Tensor) else group_ids).reshape(-1)
    if r.shape != g.shape:
        raise ValueError(f"rewards ({r.size}) and group_ids ({g.size}) must have the same length")
    out = np.zeros_like(r)
    if r.size == 0:
        return torch.zeros(0)
    _, inv = np.unique(g, return_inverse=True)
    inv = inv.reshape(-1)
    for k in range(int(inv.max()) + 1):
        idx = np.flatnonzero(inv == k)
        rk = r[idx]
        adv = np.zeros_like(rk) if rk.max() == rk.min() else rk - rk.mean()
        pos = _softmax(psi * adv)
        neg = _softmax(-psi * adv) if negative else 0.0
        out[idx] = idx.size * (pos - neg)
    return torch.from_numpy(out.astype(np.float32))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# -- the algorithm -------------------------------------------------------------------------------


def _per_target(value, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()
    if t.dim() == 0:
        return t.expand_as(like)
    if t.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(like.shape)} (one per target)")
    return t


def wd1_loss(logprobs: torch.Tensor, old_logprobs, weights_per_target, *, normaliser: float,
             target_weights=None, beta: float = 0.0, ref_logprobs=None,
             logratio_clamp: float | None = 10.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ_j tw_j (−c_j logp_j + β k3(logp_j, ref_j)) / normaliser`` over the targets at hand.

    ``weights_per_target``: each target's response weight ``c`` (``wd1_weights``), constant.
    ``ref_logprobs`` defaults to ``old_logprobs``.  Stats (floats, over targets, unweighted):
    ``loss``, ``pg_loss`` (the weighted log-likelihood part), ``kl_loss``, ``approx_kl`` (mean k3
    against the old policy), ``ref_kl`` (mean k3 against the reference), ``weight_mean``,
    ``targets``, ``normaliser``."""
    n = check_normaliser(normaliser)
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D (one per target), got shape {tuple(logprobs.shape)}")
    c = _per_target(weights_per_target, logprobs, "advantages")
    old = _per_target(old_logprobs, logprobs, "old_logprobs")
    tw = torch.ones_like(logprobs) if target_weights is None else _per_target(target_weights, logprobs, "weights")
    ref = old if ref_logprobs is None else _per_target(ref_logprobs, logprobs, "ref_logprobs")
    pg_loss = -(tw * c * logprobs).sum() / n
    kl_loss, kl_ref = kl_penalty(logprobs, ref, tw, beta=beta, normaliser=n, clamp=logratio_clamp)
    loss = pg_loss + kl_loss
    with torch.no_grad():
        t = logprobs.numel()

        def mean(x: torch.Tensor) -> float:
            return float(x.float().mean()) if t else 0.0

        stats = {"loss": float(loss.detach()), "pg_loss": float(pg_loss.detach()), "kl_loss": float(kl_loss.detach()),
                 "approx_kl": mean(k3(logprobs, old, logratio_clamp)), "ref_kl": mean(kl_ref),
                 "weight_mean": mean(c), "targets": t, "normaliser": n}
    return loss, stats


@register_algorithm
class WD1(Algorithm):
    name = "wd1"
    Options = WD1Options
    rows_per_epoch = True  # a new random prompt mask for every inner update (upstream: one mask seed per iteration)

    def rows(self, model, examples, generator, *, block_size, pad_id):
        return one_step_rows(model.spec, examples, generator, prompt_mask=self.options.prompt_mask,
                             block_size=block_size, pad_id=pad_id)

    def advantages(self, rewards, group_ids, correct):
        _, keep = super().advantages(rewards, group_ids, correct)  # the shared group filters
        return wd1_weights(rewards, group_ids, psi=self.options.psi, negative=self.options.negative), keep

    def loss(self, logprobs, old_logprobs, advantages, *, normaliser, ref_logprobs, weights, rows):
        p = self.policy
        return wd1_loss(logprobs, old_logprobs, advantages, normaliser=normaliser, target_weights=weights,
                        beta=p.beta, ref_logprobs=ref_logprobs, logratio_clamp=p.logratio_clamp)
