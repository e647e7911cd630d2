"""d1 / diffu-GRPO (Zhao, Gupta, Zheng, Grover, "d1: Scaling Reasoning in Diffusion Large Language
Models via Reinforcement Learning", arXiv 2504.12216; code github:dllm-reasoning/d1).

GRPO for masked diffusion LMs with a *one-step* log-probability estimate.  The paper's pieces, with
its equation numbers:

* Advantage, Eq. (2): the group-centred reward **without** division by the group std (the paper
  follows Liu et al., "Dr. GRPO": the std normalisation biases the gradient),

      A_i = r_i − mean(r_1, ..., r_G),   the same for every token k of o_i.

* Log-probabilities, Section 3.1: a mean-field factorisation ``log π(o|q) ≈ Σ_k log π(o^k|q)``;
  each ``log π(o^k|q)`` is read from ONE forward of ``q' ⊕ [M] ⊕ ... ⊕ [M]``: the whole completion
  masked, and ``q'`` = the prompt with every token replaced by ``[M]`` independently with
  probability ``p_mask``.  Old, current and reference policies are all evaluated on the same ``q'``
  (Algorithm 1, line 9).

* Objective, Eq. (4) (Eq. (3) is the GRPO objective it adapts): with
  ``ρ_i^k = φ_θ(o_i^k|q') / φ_θold(o_i^k|q')``,

      L = E[ 1/G Σ_i 1/|o_i| Σ_k min(ρ_i^k A_i, clip(ρ_i^k, 1−ε, 1+ε) A_i) − β KL(φ_θ(·|q') ‖ φ_ref(·|q')) ]

  where the public trainer (diffu_grpo_trainer.py, compute_loss) writes the KL per token with the
  k3 estimator ``exp(ref − logp) − (ref − logp) − 1``, and π_ref is the start model (Section 2:
  "typically the initial model"; the trainer reads it from the same network with its LoRA adapter
  disabled).

* Inner updates, Algorithm 1: μ gradient updates per rollout batch, each with a **new** random
  prompt mask ``q'``; the paper's point is that these perturbed views regularise the updates, so μ
  can be large (12 in every shipped script).  Old and reference log-probs of all μ masks are taken
  before the first update (trainer: ``_generate_and_score_completions``).

Defaults, and where they come from (paper text, and the public code at commit 837888f: the config
class ``diffu-grpo/diffu_grpo_config.py``, which the shipped recipe ``slurm_scripts/train.yaml`` and
``run.sh`` / ``*.sbatch`` override):

| d1 name | value used | where | ours |
|---|---|---|---|
| ``p_mask_prompt`` | 0.15 (class default 0.3) | train.yaml | ``policy.options.d1.p_mask_prompt`` = 0.15 |
| ``num_iterations`` μ | 12 (class default 1) | run.sh, every .sbatch | ``policy.ppo_epochs`` (shared knob, default 1: **set it to 12**) |
| ``epsilon`` ε | 0.5 (class default 0.2) | train.yaml | ``policy.eps`` (default 0.2: set 0.5) |
| ``beta`` β | 0.04 | class default and train.yaml | ``policy.beta`` (default 0: set 0.04) |
| reference | start model (adapter off) | trainer | ``policy.kl_reference=initial`` |
| advantage | r − mean, Eq. (2) | paper, trainer | ``std_normalise`` = False |
| ``random_masking`` | True: a new mask seed per inner update | class default, train.yaml | ``fresh_masks`` = True |
| learning rate | 3e-6, constant with warmup (ratio 1e-4), AdamW β=(0.9, 0.99), weight decay 0.1, grad clip 0.2 | train.yaml | ``optim.*`` |
| group size | 6 (``num_generations``), 6 per device x 2 accumulation x 8 GPUs | train.yaml | ``rollout.group_size`` |
| generation | 256 new tokens, block 32, 128 steps (2 tokens a step), low-confidence remasking, temperature 0.9 (class default; the recipe does not set it), no CFG, prompts cut to 200 tokens | train.yaml, config class | ``rollout.sampling.*`` |

So a d1 reproduction sets ``policy.method=d1 policy.ppo_epochs=12 policy.eps=0.5 policy.beta=0.04
policy.kl_reference=initial optim.lr=3e-6 policy.filter_equal=false`` (d1 keeps zero-advantage
groups: they still feel the KL term).

Loss normalisation.  Eq. (4) averages per completion (``1/|o_i|``), then over completions.  The
public trainer instead sums the per-token terms of a micro-batch over its completion tokens (up to
and including the first EOS) and divides by their count, a token mean; HF's gradient accumulation
and DDP then average those micro-batch means.  Our ``policy.normalisation=token_mean`` (the
default) is that token mean taken over the whole optimizer batch (identical when the micro-batches
hold equally many tokens), and it is what we use by default since it is what produced the paper's
numbers.  ``sequence_mean=true`` gives Eq. (4)'s per-completion mean instead, through target
weights ``w = L̄ / |o_i|`` (``L̄`` = mean response length of the step's kept responses): with
``token_mean`` the weights of a step sum to its token count, so the loss is exactly Eq. (4) when an
optimizer batch is the whole step, and Eq. (4) times the constant ``L̄_step / L̄_batch`` otherwise.
``policy.normalisation=upstream`` (÷ L1 per row, one row per response here) is Dr. GRPO's constant
length, which is neither.

Rows, per model family (one row per kept response, rebuilt for every ``ppo_epochs`` pass:
``rows_per_epoch``):

* full and shifted (single-copy rows, the model's own attention): ``[q' | [M] x (response + tail)]``.
  The *tail* (the canvas after the stop token as the sampler left it: for full attention every
  later position up to ``max_new_tokens``) is masked too, so the masked canvas has the length the
  sampler started from, as in d1 where all ``max_completion_length`` positions are ``[M]``; the
  targets are the response tokens (through the stop token, d1's ``completion_mask``).  For the
  shifted family ``q'``'s last position predicts response token 0, and may itself be ``[M]``.
  With block attention (tiny-shifted's default) the estimate is taken literally as d1 states it:
  later blocks then see earlier blocks masked, a state the block sampler never visits.
* block (two-copy rows ``[q' | clean response | noisy copy]``): every response block is **fully
  masked in the noisy copy**, the clean stream holds ``q'`` and the clean response.  So token k of
  block b is scored as ``log f_θ(o^k | q', o_{<b}, block b all [M])``: d1's one-step estimate
  applied per block.  Why not one single-copy row with the whole completion masked: a block-causal
  model conditions block b on the *clean* earlier blocks (its KV cache in sampling, the clean
  stream in block SFT); a row whose earlier blocks are ``[M]`` is a state it was never trained on
  or sampled from, so its predictions there say little about the policy.  The block model's own
  likelihood factorises over blocks, and the mean-field approximation is needed only inside a
  block; the two-copy row gives every block that state in the same one forward per response.  Tail
  positions in the last response block stay in the noisy copy (all ``[M]``, as in the sampler's
  first step of that block); positions past the last response block cannot reach any target and
  are dropped.

Prompt masking needs ``[M]`` in prompt positions, which no other row builder writes: the rows are
built with the shared ``single_row`` / ``two_copy_row`` and the chosen prompt columns then get
``mask_token_id``.  In the two-copy layout a prompt position can occur twice (the prompt segment,
and the copy of the prompt tail that opens the noisy copy when the prompt length is not a multiple
of the block size); both occurrences follow the same draw, so every block sees one and the same
``q'``.  Segments (hence attention) are unchanged.  Draws: one float64 uniform per prompt token,
example after example, from the step's generator; ``[M]`` where it is ``< p_mask_prompt``.

Where we differ from the public code, and why:

* No left padding inside the model input: d1 left-pads prompts and feeds the padding, unmasked by
  any attention mask, as prompt tokens that can themselves be masked; our rows are left-padded
  with segment PAD, never attended.
* One distinct prompt mask per pass.  d1 picks the mask seed by ``_step % num_iterations`` with
  ``_step`` counting micro-batches, so with gradient accumulation 2 each micro-batch cycles through
  only half of its μ seeds, each twice; ``fresh_masks=false`` reproduces d1's fixed-seed mode as one
  mask per RL step shared by its passes (d1: seed 42 for every step).
* ``policy.logratio_clamp`` caps ``|logp − old|`` at 10 before ``exp`` (d1: no cap); ``k3`` is
  clamped the same way (objectives/rl.py).
* The policy log-probs exclude the tokens the sampler cannot emit (``target_logprobs(policy=True)``),
  so ratios use the distribution the sampler drew from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracerl import masks
from tracerl.errors import ConfigError
from tracerl.objectives.examples import Example, as_examples
from tracerl.objectives.rows import (
    RowParts,
    check_block_size,
    collate,
    default_pad_id,
    model_spec,
    single_row,
    two_copy_row,
)
from tracerl.rl.algorithms import register_algorithm
from tracerl.rl.algorithms.base import Algorithm


@dataclass
class D1Options:
    p_mask_prompt: float = 0.15  # each prompt token -> [M] with this probability (d1 train.yaml: 0.15)
    fresh_masks: bool = True  # a new prompt mask for every ppo_epochs pass (d1 random_masking); false: one per step
    std_normalise: bool = False  # divide advantages by the group std (GRPO); d1 Eq. (2): r - mean only
    sequence_mean: bool = False  # Eq. (4)'s per-completion mean (weights mean_len/|o_i|); false: d1 code's token mean

    def __post_init__(self) -> None:
        p = self.p_mask_prompt
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"p_mask_prompt: need 0 <= p_mask_prompt < 1 (1 would hide the whole question), "
                              f"got {p!r}")
        self.p_mask_prompt = float(p)


def _uniform(generator: torch.Generator, n: int) -> np.ndarray:
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()


def _centred(rewards, group_ids) -> torch.Tensor:
    """``r_i − mean`` of i's group (Eq. (2)); exactly 0 in a group whose rewards are all equal."""
    r = np.asarray(rewards.detach().cpu().numpy() if isinstance(rewards, torch.Tensor) else rewards,
                   dtype=np.float64).reshape(-1)
    g = np.asarray(group_ids.detach().cpu().numpy() if isinstance(group_ids, torch.Tensor) else group_ids)
    _, inv = np.unique(g.reshape(-1), return_inverse=True)
    inv = inv.reshape(-1)
    k = int(inv.max()) + 1 if inv.size else 0
    size = np.bincount(inv, minlength=k).astype(np.float64)
    mean = np.bincount(inv, weights=r, minlength=k) / np.maximum(size, 1.0)
    hi, lo = np.full(k, -np.inf), np.full(k, np.inf)
    np.maximum.at(hi, inv, r)
    np.minimum.at(lo, inv, r)
    adv = np.where((hi == lo)[inv], 0.0, r - mean[inv])
    return torch.from_numpy(adv.astype(np.float32))


@register_algorithm
class D1(Algorithm):
    """diffu-GRPO: one forward per response with the completion fully masked and the prompt
    randomly masked (a new mask per ``policy.ppo_epochs`` pass); PPO-clip + β k3 loss (base)."""

    name = "d1"
    Options = D1Options
    rows_per_epoch = True

    def advantages(self, rewards, group_ids, correct):
        z, keep = super().advantages(rewards, group_ids, correct)  # z-scores and the shared group filters
        return (z if self.options.std_normalise else _centred(rewards, group_ids)), keep

    def rows(self, model, examples, generator, *, block_size, pad_id):
        spec = model_spec(model)
        b = check_block_size(block_size, spec)
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator: pass a torch.Generator (prompt masks must be reproducible)")
        if not self.options.fresh_masks:  # the same draws on every call with this step's generator
            generator = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
        exs = as_examples(examples)
        mask_id, two_copy = spec.mask_token_id, spec.family == "block"
        lengths = [len(ex.response_ids) for ex in exs if ex.response_ids]
        mean_len = float(np.mean(lengths)) if lengths else 1.0
        parts: list[RowParts] = []
        for i, ex in enumerate(exs):
            p, n = len(ex.prompt_ids), len(ex.response_ids)
            if n == 0:
                continue
            hidden = _uniform(generator, p) < self.options.p_mask_prompt  # q': prompt positions -> [M]
            tail = ex.tail_ids or []
            if two_copy:  # only the last response block's tail can reach a target
                tail = tail[: (p + n + b - 1) // b * b - (p + n)]
            canvas = Example(ex.prompt_ids, ex.response_ids + tail)
            masked = np.ones(n + len(tail), dtype=bool)  # the whole completion
            target = np.arange(n + len(tail)) < n  # the response through its stop token
            weight = mean_len / n if self.options.sequence_mean else 1.0
            if two_copy:
                part = two_copy_row(canvas, i, b, mask_id, masked, target, 0, weight)
                _, _, source = masks.two_copy_layout(p, n + len(tail), b)
                source = source.numpy()
                in_prompt = np.flatnonzero(source < p)  # the prompt and the noisy copy's prompt tail
                part.ids[in_prompt[hidden[source[in_prompt]]]] = mask_id
            else:
                part = single_row(canvas, i, spec.logit_shift, mask_id, masked, target, 0, weight,
                                  where=f"example {i}")
                part.ids[:p][hidden] = mask_id
            parts.append(part)
        return collate(parts, "two_copy" if two_copy else spec.attention, b, len(exs), default_pad_id(spec, pad_id))
