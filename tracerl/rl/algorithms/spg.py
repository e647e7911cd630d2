"""SPG, Sandwiched Policy Gradient (Wang, Rashidinejad, Su, Jiang, Wang, Zhao, Zhou, Shen, Chen,
Jaakkola, Tian, Liu, "SPG: Sandwiched Policy Gradient for Masked Diffusion Language Models",
arXiv 2510.09541; code github:facebookresearch/SPG, ``spg/spg_trainer.py``).

The sequence log-likelihood ``log π_θ(o|q)`` of a masked diffusion LM is intractable.  SPG
replaces it, per response, by a *lower* bound (the ELBO) when the response's advantage is positive
and by an *upper* bound (an evidence upper bound, EUBO, from a Rényi-type variational bound of
order β) when it is negative.  Since ``A·ELBO ≤ A·log π`` for ``A > 0`` and ``A·EUBO ≤ A·log π``
for ``A < 0``, the surrogate is a lower bound of the policy-gradient objective, with the
likelihood "sandwiched" between the two bounds (paper Section 3).  The Monte-Carlo estimates use
block-wise masks.  ``β ≥ 1`` is required: ``(1/β) log E_q[(p/q)^β] ≥ log E_q[p/q]`` (the
power-mean inequality) holds for ``β ≥ 1``, and the public runs use β ∈ {1, 1.5, 2}.

Equation numbers.  The paper's body could not be read from this machine (only its abstract and
third-party summaries), so the formulas below are stated as the public trainer computes them
(``SPGTrainer._get_per_seq_logps`` and ``compute_loss`` in spg/spg_trainer.py, commit a1c7120);
no equation numbers are given rather than guessed.

Notation: response ``o_i`` of ``L_i`` tokens (through its stop token: the trainer's
``completion_mask``), ``m`` mask samples ``j`` per response, each with a masked set ``M_ij`` of
response positions (state ``z_ij``), empirical mask level ``t_ij = |M_ij| / L_i``, and
``ℓ_ijk = log π_θ(o_i^k | z_ij, q)`` for ``k ∈ M_ij``.

* Advantage (``_generate_and_score_completions``): ``A_i = r_i − mean(r of i's group)``, *not*
  divided by the group std (``std_normalise=true`` gives the GRPO z-score).
* ELBO (``per_seq_logps_positive``: a per-token mean over each sample's masked tokens, averaged
  over samples, then multiplied by ``L_i`` in ``compute_loss``):

      ELBO_i = (1/m) Σ_j (1/t_ij) Σ_{k∈M_ij} ℓ_ijk

  i.e. the masked-diffusion ELBO ``E_t[(1/t) Σ_k 1{masked} log π]`` with the empirical level.
* EUBO (``logp_estimation='eubo'``): per response *token* k the bound averages over the mask
  samples inside the log, so it is nonlinear across the samples of a response:

      S_ik   = (1/m) Σ_j 1{k∈M_ij} exp(β ℓ_ijk) / t_ij
      EUBO_i = (L_i / |K_i|) · (1/β) Σ_{k∈K_i} log S_ik,        K_i = ∪_j M_ij

  (the trainer averages ``log S_ik / β`` over the tokens masked in at least one sample, the ones
  with ``S_ik > 0``, and multiplies by ``L_i``; a token never masked has no estimate).
* Mixture for negative advantages (``logp_estimation='mix'``, weight ω = ``mix_weight``):
  ``B_i⁻ = ω EUBO_i + (1 − ω) ELBO_i``; ``negative_bound`` also offers ``eubo`` (ω = 1), ``elbo``
  (no upper bound: plain ELBO policy gradient) and ``zero`` (negatives ignored), the trainer's
  other ``logp_estimation`` values.  Positive advantages always use the ELBO; ``A_i = 0`` goes to
  the negative branch as in the trainer (``reward_mask = A > 0``) and contributes nothing.
* Loss (``compute_loss``): no importance ratio, no clipping, no KL (the trainer raises for
  ``beta != 0``):

      loss = − Σ_i A_i · (1{A_i>0} ELBO_i + 1{A_i≤0} B_i⁻) / N,    N = Σ_i L_i

  The trainer divides by the completion tokens of its micro-batch; ``policy.normalisation=
  token_mean`` (the default) is that token count taken over the whole optimizer batch, so the
  loss is a sum over responses divided by a batch constant and does not depend on micro-batching.

Block-wise masking (``forward_process``, ``forward_type='block_random'``): per mask sample, pick a
response block ``c`` (the trainer: a random permutation of the blocks, so the ``m`` samples of a
response use distinct blocks when it has ``≥ m``; we cycle permutations when it has fewer), mask
``k`` of its ``n_c`` response tokens chosen uniformly at random, with ``k`` uniform on
``[max(⌊n_c·low⌋, 1), min(⌊n_c·high⌋, n_c)]`` (``min_t``/``max_t``), mask every response token
of every later block, keep earlier blocks clean.  Every masked response token is a target (the
trainer's ``perturb_mask``; its ``block_mask``, which would keep only the current block, is
computed but unused).  Positions after the stop token are always ``[M]`` and never targets.
Blocks follow absolute positions, ``(prompt_len + j) // block_size`` with the rollout's
``block_size``, as in our sampler.  Each prompt token is also replaced by ``[M]`` with probability
``prompt_mask`` per sample (d1's ``p_mask_prompt``, on in SPG's train.yaml).

Defaults and their sources (spg/slurm_scripts/spg_mix/*.sbatch, spg_eubo/*.sbatch, train.yaml,
diffu_grpo_config.py):

| upstream | value | ours |
|---|---|---|
| ``logp_estimation`` | ``mix`` ("SPG w/ Mixture", the paper's headline runs) | ``negative_bound`` = ``mix`` |
| ``mix_weight`` ω | 0.5 (every mix script; class default) | ``mix_weight`` = 0.5 |
| ``eubo_beta`` β | 1.5 (class default; mix: GSM8K, MATH500, Countdown; EUBO: GSM8K, MATH500); | ``eubo_beta`` = 1.5 |
| | 2.0 (EUBO: Countdown); 1.0 (Sudoku, both) | |
| ``num_t`` | 2 mask samples per response (every script) | ``mask_samples`` = 2 |
| ``min_t``, ``max_t`` | 0, 1 | ``mask_low`` = 0, ``mask_high`` = 1 |
| ``forward_type`` | ``block_random`` | always |
| ``use_mask_prompt``, ``p_mask_prompt`` | true, 0.15 (train.yaml) | ``prompt_mask`` = 0.15 |
| ``random_masking`` | true: new masks for each of the ``num_iterations`` updates | ``rows_per_epoch`` |
| ``num_iterations`` | 4 | ``policy.ppo_epochs`` (shared, default 1: set 4) |
| ``beta`` (KL) | 0 (nonzero raises) | ``policy.beta`` must be 0 |
| advantage | ``r − mean`` | ``std_normalise`` = false |
| ``block_length`` | 32 (256 new tokens, 128 steps) | ``rollout.sampling.block_size`` |
| optimiser | lr 3e-6 constant, AdamW (0.9, 0.99), wd 0.1, grad clip 0.2 | ``optim.*`` |
| ``num_generations`` | 6 responses per prompt | ``rollout.group_size`` |

So an upstream-like run sets ``policy.method=spg policy.ppo_epochs=4 optim.lr=3e-6``.

Per model family (all rows built with the shared ``single_row`` / ``two_copy_row``, one row per
mask sample, then the chosen prompt columns set to ``[M]``):

* full, shifted: single-copy ``[prompt | response + tail]`` with the sample's mask, exactly the
  trainer's input (the tail, the canvas after the stop token, all ``[M]``).  The shifted family's
  targets are read one column earlier (``single_row``).  With block attention (tiny-shifted) the
  later blocks then see a partially masked current block, as in the trainer's literal scheme.
* block (two-copy rows ``[prompt | clean response | noisy copy]``): the same masked set in the
  noisy copy.  A block-causal model conditions block ``b`` on clean earlier blocks, so a fully
  masked later block is scored in the state the sampler starts that block from (clean prefix,
  block all ``[M]``) rather than behind a partially masked current block; the targets, levels and
  weights are the same as for the other families.

With block-causal attention (the block family, and the shifted family's default) tail positions
past the last response block cannot reach a target and are dropped (exact, and cheaper).

Rows carry ``target_weight = 1/(m t_ij) = L_i / (m |M_ij|)``, so ``Σ w ℓ`` over a response's
targets is ``ELBO_i``; ``loss`` recovers ``L_i`` and ``m`` from the rows (targets per row, rows per
response).  The EUBO needs every mask sample of a response in one ``loss`` call: ``check``
refuses ``policy.rows_per_forward > 0``, which could split a response's rows over forwards.

Where we differ from the public code, and why:

* Mask positions come from the step's ``torch.Generator`` (resumable), not ``set_seed`` of a
  small random integer.
* Prompt masking covers the prompt only: the trainer's ``block_random`` draws its "prompt" mask
  over every position outside the current and later blocks, so earlier *response* blocks get
  ~15% ``[M]`` too and those tokens join the targets and ``t``; we treat that as unintended.
* Block selection cycles fresh permutations of the response's blocks; the trainer takes a
  permutation of the fixed generation's blocks modulo the completion's block count (repeats
  when the completion is short).
* The policy log-probs exclude the tokens the sampler cannot emit (``target_logprobs(policy=True)``).
* One distinct set of masks per ``ppo_epochs`` pass.  The trainer indexes its mask seeds by
  ``_step % num_iterations`` with ``_step`` counting micro-batches, so with gradient accumulation
  a micro-batch does not see every seed.
* Old log-probs (the loop computes them for every pass) are used only for the ``ratio_mean`` /
  ``approx_kl`` drift diagnostics; SPG's loss has no ratio, hence no ``clip_fraction``.  As in the
  trainer, ``ppo_epochs > 1`` reuses the rollout without any off-policy correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracerl.errors import ConfigError
from tracerl.objectives import k3, prompt_masked_row
from tracerl.objectives.rl import uniforms
from tracerl.objectives.examples import Example, as_examples
from tracerl.objectives.loss import check_normaliser
from tracerl.objectives.rows import (
    Rows,
    RowParts,
    collate,
    default_pad_id,
    model_spec,
    response_blocks,
    row_layout,
)
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.base import Algorithm

NEGATIVE_BOUNDS = ("mix", "eubo", "elbo", "zero")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    return float(value)


@dataclass
class SPGOptions:
    negative_bound: str = "mix"  # bound for A <= 0: mix (ω EUBO + (1-ω) ELBO) | eubo | elbo | zero
    mix_weight: float = 0.5  # ω, the EUBO's share in `mix` (upstream mix_weight)
    eubo_beta: float = 1.5  # β >= 1, the Rényi order of the upper bound (upstream eubo_beta)
    mask_samples: int = 2  # block-wise mask samples per response (upstream num_t)
    mask_low: float = 0.0  # current block: masked count uniform on [max(floor(n*low),1), floor(n*high)] (min_t)
    mask_high: float = 1.0  # the upper end of that range (upstream max_t)
    prompt_mask: float = 0.15  # each prompt token -> [M] with this probability, per sample (p_mask_prompt)
    std_normalise: bool = False  # divide advantages by the group std (GRPO); upstream: r - mean only

    def __post_init__(self) -> None:
        if self.negative_bound not in NEGATIVE_BOUNDS:
            raise ConfigError(f"negative_bound: {self.negative_bound!r}; valid: {', '.join(NEGATIVE_BOUNDS)}")
        self.mix_weight = _number(self.mix_weight, "mix_weight")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ConfigError(f"mix_weight: need 0 <= mix_weight <= 1, got {self.mix_weight}")
        self.eubo_beta = _number(self.eubo_beta, "eubo_beta")
        if not (np.isfinite(self.eubo_beta) and self.eubo_beta >= 1.0):
            raise ConfigError(f"eubo_beta: need a finite beta >= 1 (the Rényi bound is an upper bound only "
                              f"for beta >= 1), got {self.eubo_beta}")
        m = self.mask_samples
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"mask_samples: must be an integer >= 1, got {m!r}")
        self.mask_low = _number(self.mask_low, "mask_low")
        self.mask_high = _number(self.mask_high, "mask_high")
        if not 0.0 <= self.mask_low <= self.mask_high <= 1.0:
            raise ConfigError(f"mask_low, mask_high: need 0 <= mask_low <= mask_high <= 1, got "
                              f"{self.mask_low}, {self.mask_high}")
        self.prompt_mask = _number(self.prompt_mask, "prompt_mask")
        if not 0.0 <= self.prompt_mask < 1.0:
            raise ConfigError(f"prompt_mask: need 0 <= prompt_mask < 1 (1 would hide the whole question), "
                              f"got {self.prompt_mask}")


# -- rows ---------------------------------------------------------------------------------------


def _perm(generator: torch.Generator, n: int) -> np.ndarray:
    return torch.randperm(n, generator=generator, device=generator.device).cpu().numpy()


def spg_rows(spec, examples, generator: torch.Generator, *, samples: int = 2, low: float = 0.0,
             high: float = 1.0, prompt_mask: float = 0.0, block_size: int | None = None,
             pad_id: int | None = None) -> Rows:
    """SPG's block-wise Monte-Carlo rows (module docstring): ``samples`` rows per response, each
    with one current block partially masked, every later block masked, earlier blocks clean; the
    masked response tokens are the targets with weight ``L / (samples · |M|)``.

    Draws per response, from ``generator``: the blocks (permutations of the response's blocks,
    as many as needed), then per sample the masked count (one float64 uniform), the positions (a
    permutation of the current block's tokens) and, when ``prompt_mask > 0``, one float64
    uniform per prompt token."""
    spec, b, two_copy = row_layout(spec, block_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator: pass a torch.Generator (masks must be reproducible)")
    exs = as_examples(examples)
    mask_id = spec.mask_token_id
    parts: list[RowParts] = []
    for i, ex in enumerate(exs):
        p, n = len(ex.prompt_ids), len(ex.response_ids)
        if n == 0:
            continue
        tail = list(ex.tail_ids or [])
        if spec.attention == "block":  # block-causal: positions past the last response block reach no target
            tail = tail[: (p + n + b - 1) // b * b - (p + n)]
        canvas = Example(ex.prompt_ids, ex.response_ids + tail)
        total = n + len(tail)
        blocks = response_blocks(p, total, b)
        own = np.unique(blocks[:n])  # blocks holding response tokens
        order = np.concatenate([own[_perm(generator, own.size)] for _ in range(-(-samples // own.size))])
        is_response = np.arange(total) < n
        for current in order[:samples]:
            in_block = np.flatnonzero(blocks[:n] == current)
            size = in_block.size
            lo = max(int(np.floor(size * low)), 1)
            hi = max(lo, min(int(np.floor(size * high)), size))
            count = lo + min(int(uniforms(generator, 1)[0] * (hi - lo + 1)), hi - lo)
            masked = ~is_response | (blocks > current)  # the tail and every later block
            masked[in_block[_perm(generator, size)[:count]]] = True
            target = masked & is_response
            weight = n / (samples * int(target.sum()))  # 1 / (m t), t = |M| / L
            hidden = uniforms(generator, p) < prompt_mask if prompt_mask > 0 else np.zeros(p, dtype=bool)
            parts.append(prompt_masked_row(spec, canvas, i, b, masked, target, weight, hidden))
    return collate(parts, "two_copy" if two_copy else spec.attention, b, len(exs), default_pad_id(spec, pad_id))


# -- loss ---------------------------------------------------------------------------------------


def spg_loss(logprobs: torch.Tensor, advantages: torch.Tensor, *, weights: torch.Tensor, rows: Rows,
             normaliser: float, negative_bound: str = "mix", mix_weight: float = 0.5, eubo_beta: float = 1.5,
             old_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SPG's loss over the targets of whole responses (module docstring):
    ``− Σ_i A_i (1{A_i>0} ELBO_i + 1{A_i≤0} B_i⁻) / normaliser``.

    ``weights`` are the rows' ``1/(m t)`` target weights (``spg_rows``); ``rows`` the Rows the
    targets come from (``target_example`` / ``target_row`` / ``target_index`` group them per
    response, mask sample and token).  ``advantages`` per target (the response's).  ``old_logprobs``
    only feed the ``ratio_mean`` / ``approx_kl`` diagnostics."""
    if negative_bound not in NEGATIVE_BOUNDS:
        raise ConfigError(f"negative_bound: {negative_bound!r}; valid: {', '.join(NEGATIVE_BOUNDS)}")
    n = check_normaliser(normaliser)
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D (one per target), got shape {tuple(logprobs.shape)}")
    t = logprobs.numel()
    if weights is None or rows is None:
        raise ValueError("spg loss: needs the rows and their target weights (L / (m |M|) per target)")
    dev, dtype = logprobs.device, logprobs.dtype
    w = torch.as_tensor(weights, device=dev).detach().to(dtype).reshape(-1)
    adv = torch.as_tensor(advantages, device=dev).detach().to(dtype).reshape(-1)
    if rows.num_targets != t or w.numel() != t or adv.numel() != t:
        raise ValueError(f"spg loss: {t} log-probs, {w.numel()} weights, {adv.numel()} advantages, "
                         f"{rows.num_targets} row targets: all must match")
    if t == 0:
        return logprobs.sum() * 0.0, {"loss": 0.0, "targets": 0, "normaliser": n}
    example = rows.target_example.to(dev)
    row = rows.target_row.to(dev)
    index = rows.target_index.to(dev)

    # Group targets: responses (inv), mask samples = rows (rinv), response tokens (tinv).
    responses, inv = torch.unique(example, return_inverse=True)
    r = responses.numel()
    a = torch.zeros(r, dtype=dtype, device=dev).scatter(0, inv, adv)
    elbo = torch.zeros(r, dtype=dtype, device=dev).index_add(0, inv, w * logprobs)
    positive = a > 0

    stats_extra: dict[str, float] = {}
    with torch.no_grad():  # L_i = w · m_i · |M_ij| (any target of the response gives it)
        _, rinv = torch.unique(row, return_inverse=True)
        per_row = torch.bincount(rinv)
        row_response = torch.zeros(per_row.numel(), dtype=torch.long, device=dev).scatter(0, rinv, inv)
        samples = torch.bincount(row_response, minlength=r)
        length_t = w.double() * samples[inv].double() * per_row[rinv].double()
        length = torch.zeros(r, dtype=torch.float64, device=dev).scatter(0, inv, length_t).round()
        if not torch.allclose(length_t, length[inv], rtol=0, atol=1e-3 * float(length.max())):
            raise ValueError("spg loss: the target weights are not L / (m |M|) per response (rows from "
                             "another builder, or a response split over calls?)")
        length = length.to(dtype)

    if negative_bound in ("mix", "eubo") and bool((~positive).any()):
        on = (~positive)[inv]  # only the negative responses' targets need the upper bound
        stride = int(index.max()) + 1
        tokens, tinv = torch.unique(inv[on] * stride + index[on], return_inverse=True)
        x = w[on].log() + eubo_beta * logprobs[on]  # log(w p^β): S_ik = Σ_j w p^β = (1/m) Σ_j 1{k∈M_j} p^β / t_j
        top = torch.full((tokens.numel(),), -torch.inf, dtype=dtype, device=dev)
        top = top.scatter_reduce(0, tinv, x.detach(), reduce="amax", include_self=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        summed = torch.zeros(tokens.numel(), dtype=dtype, device=dev).index_add(0, tinv, (x - top[tinv]).exp())
        log_s = summed.log() + top  # log S_ik, a logsumexp per (response, token)
        token_response = torch.div(tokens, stride, rounding_mode="floor")
        covered = torch.bincount(token_response, minlength=r).to(dtype)  # |K_i|
        eubo = torch.zeros(r, dtype=dtype, device=dev).index_add(0, token_response, log_s)
        eubo = eubo * length / covered.clamp_min(1) / eubo_beta
        negative = eubo if negative_bound == "eubo" else mix_weight * eubo + (1.0 - mix_weight) * elbo
        with torch.no_grad():
            neg = ~positive
            stats_extra["eubo_per_token"] = float(eubo[neg].sum() / length[neg].sum())
            stats_extra["elbo_per_token_negative"] = float(elbo[neg].sum() / length[neg].sum())
    elif negative_bound == "elbo":
        negative = elbo
    else:  # "zero", or no negative response here
        negative = torch.zeros_like(elbo)
    bound = torch.where(positive, elbo, negative)
    loss = -(a * bound).sum() / n

    with torch.no_grad():
        stats = {
            "loss": float(loss.detach()),
            "adv_mean": float(a.float().mean()),
            "positive_fraction": float(positive.float().mean()),
            "elbo_per_token": float(elbo.sum() / length.sum()),
            **stats_extra,
            "targets": t,
            "normaliser": n,
        }
        if old_logprobs is not None:
            old = torch.as_tensor(old_logprobs, device=dev).detach().to(dtype).reshape(-1)
            stats["ratio_mean"] = float((logprobs - old).clamp(-10, 10).exp().float().mean())
            stats["approx_kl"] = float(k3(logprobs, old).float().mean())
    return loss, stats


# -- the algorithm ------------------------------------------------------------------------------


@register_algorithm
class SPG(Algorithm):
    """Sandwiched Policy Gradient: the ELBO for positive advantages, an EUBO (or its mixture with
    the ELBO) for negative ones, block-wise masks, fresh masks for every ``ppo_epochs`` pass."""

    name = "spg"
    Options = SPGOptions
    rows_per_epoch = True

    def check(self, config, model) -> None:
        p = config.policy
        if p.rows_per_forward:
            raise ConfigError(f"policy.rows_per_forward: {p.rows_per_forward}; spg's upper bound combines all mask "
                              "samples of a response in one loss call, so a forward must hold whole responses "
                              "(set 0)")
        if p.beta:
            raise ConfigError(f"policy.beta: {p.beta}; spg has no KL term (the public trainer refuses beta != 0); "
                              "set 0")

    @property
    def scale_advantages(self) -> bool:  # upstream: A = r - mean (no division by the group std)
        return self.options.std_normalise

    def rows(self, model, examples, generator, *, block_size, pad_id):
        o = self.options
        return spg_rows(model_spec(model), examples, generator, samples=o.mask_samples, low=o.mask_low,
                        high=o.mask_high, prompt_mask=o.prompt_mask, block_size=block_size, pad_id=pad_id)

    def loss(self, logprobs, old_logprobs, advantages, *, normaliser, ref_logprobs, weights, rows):
        o = self.options
        return spg_loss(logprobs, advantages, weights=weights, rows=rows, normaliser=normaliser,
                        negative_bound=o.negative_bound, mix_weight=o.mix_weight, eubo_beta=o.eubo_beta,
                        old_logprobs=old_logprobs)
