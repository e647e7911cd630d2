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

      L = E[ 1/G Σ_i 1/|o_i| Σ_k min(ρ_i^k A_i, clip(ρ_i^k, 1−ε, 1+ε) A_i)
             − β KL(φ_θ(·|q') ‖ φ_ref(·|q')) ]

  where the public trainer (diffu_grpo_trainer.py, compute_loss) writes the KL per token with the
  k3 estimator ``exp(ref − logp) − (ref − logp) − 1``, and π_ref is the start model (the GRPO
  preliminaries: "typically the initial model"; the trainer reads it from the same network with its
  LoRA adapter disabled).  The loss is the base class's per-target PPO-clip + β k3
  (objectives/rl.py ``policy_loss``), so ``policy.rows_per_forward`` may split responses.

* Inner updates, Algorithm 1: μ gradient updates per rollout batch, each with a **new** random
  prompt mask ``q'``; the paper's point is that these perturbed views regularise the updates, so μ
  can be large (12 in every shipped script).  Old and reference log-probs of all μ masks are taken
  before the first update (trainer: ``_generate_and_score_completions``).

Defaults, and where they come from (paper text, and the public code at commit 837888f: the config
class ``diffu-grpo/diffu_grpo_config.py``, which the shipped recipe ``slurm_scripts/train.yaml`` and
``run.sh`` / ``slurm_scripts/*.sbatch`` override), each with our key:

* ``p_mask_prompt`` 0.15 (train.yaml; the class default is 0.3): ``policy.options.d1.p_mask_prompt``,
  default 0.15.
* ``num_iterations`` μ = 12 (run.sh and every .sbatch; class default 1): our shared
  ``policy.ppo_epochs``, whose default is 1, so **users set policy.ppo_epochs=12** for d1's μ.
* ``epsilon`` ε = 0.5 (train.yaml; class default 0.2): ``policy.eps`` (default 0.2).
* ``beta`` β = 0.04 (class default and train.yaml): ``policy.beta`` (default 0).
* reference = the start model (trainer: adapter disabled): ``policy.kl_reference=initial``; with
  ``lora.enabled=true`` it is the same adapter-off forward, with no second model in memory.
* advantage = r − mean, Eq. (2) (paper and trainer): ``std_normalise`` = false.
* ``random_masking`` = true, a new mask seed per inner update (class default, train.yaml):
  ``fresh_masks`` = true.
* optimiser (train.yaml): learning rate 3e-6, constant with warm-up (ratio 1e-4), AdamW betas
  (0.9, 0.99), weight decay 0.1, gradient clipping 0.2, bf16, LoRA r = 128 / alpha 64 on a 4-bit base.
* batch (train.yaml): 6 completions per prompt (``num_generations``), 6 per device x 2 accumulation
  steps x 8 GPUs.
* generation (train.yaml and the config class): 256 new tokens, block length 32, 128 denoising steps
  (2 tokens a step), low-confidence remasking, temperature 0.9 (class default; the recipe does not
  set it), no classifier-free guidance, prompts cut to their last 200 tokens.

So a d1 reproduction sets ``policy.method=d1 policy.ppo_epochs=12 policy.eps=0.5 policy.beta=0.04
policy.kl_reference=initial optim.lr=3e-6 policy.filter_equal=false`` (d1 keeps zero-advantage
groups: they still feel the KL term), and for its adapter ``lora.enabled=true lora.r=128 lora.alpha=64``
(the 4-bit base is not reproduced: the base stays in the model's dtype).

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

With ``p_mask_prompt = 0`` every token the sampler decoded in its first forward (block family: the
first forward of its block) gets exactly the log-prob the sampler recorded (tests/unit/rl/test_d1.py);
the other tokens get the mean-field estimate.

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
  only half of its μ seeds, each twice.  ``fresh_masks=false`` stands for d1's fixed-seed mode
  (``random_masking: false``) as one mask per RL step shared by its passes (d1: seed 42, so the
  same pattern for every step).
* ``policy.logratio_clamp`` caps ``|logp − old|`` at 10 before ``exp`` (d1: no cap); ``k3`` is
  clamped the same way (objectives/rl.py).
* The policy log-probs exclude the tokens the sampler cannot emit (``target_logprobs(policy=True)``),
  so ratios use the distribution the sampler drew from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracerl.errors import ConfigError
from tracerl.objectives import one_step_rows
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


@register_algorithm
class D1(Algorithm):
    """diffu-GRPO: one forward per response with the completion fully masked and the prompt
    randomly masked (a new mask per ``policy.ppo_epochs`` pass); PPO-clip + β k3 loss (base)."""

    name = "d1"
    Options = D1Options
    rows_per_epoch = True

    @property
    def scale_advantages(self) -> bool:
        return self.options.std_normalise

    def rows(self, model, examples, generator, *, block_size, pad_id):
        if not self.options.fresh_masks:  # the same draws on every call with this step's generator
            generator = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
        weights = None
        if self.options.sequence_mean:  # Eq. (4): each completion's tokens weigh mean_len / |o_i|
            lengths = [len(ex.response_ids) for ex in examples]
            mean_len = float(np.mean([n for n in lengths if n])) if any(lengths) else 1.0
            weights = [mean_len / n if n else 0.0 for n in lengths]
        return one_step_rows(model.spec, examples, generator, prompt_mask=self.options.p_mask_prompt,
                             block_size=block_size, pad_id=pad_id, weights=weights)
