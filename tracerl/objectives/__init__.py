"""Training objectives shared by every model family: rows (trace rows, two-copy layout), SFT
row builders, and the shared weighted-NLL loss with its optimizer-batch normalisation."""

from tracerl.objectives.examples import Example, as_example, as_examples, count_response_tokens, example_from_mapping
from tracerl.objectives.loss import sft_loss, weighted_nll
from tracerl.objectives.rows import (
    MASK_KINDS,
    Rows,
    build_trace_rows,
    response_blocks,
    shrink_steps,
    target_logprobs,
)
from tracerl.objectives.rl import (
    DEFAULT_NORMALISATION,
    NORMALISATIONS,
    RL_METHODS,
    group_advantages,
    k3,
    one_step_rows,
    policy_loss,
    prompt_masked_row,
    rl_normaliser,
    rl_rows,
)
from tracerl.objectives.value import ValueModel, gae_over_steps, gae_targets, value_loss
from tracerl.objectives.sft import (
    METHOD_FAMILIES,
    SFT_METHODS,
    ar_rows,
    block_sft_rows,
    build_sft_rows,
    random_masking_rows,
    semi_ar_rows,
    trace_sft_rows,
)

__all__ = [
    "DEFAULT_NORMALISATION",
    "NORMALISATIONS",
    "RL_METHODS",
    "ValueModel",
    "gae_over_steps",
    "gae_targets",
    "group_advantages",
    "k3",
    "one_step_rows",
    "prompt_masked_row",
    "policy_loss",
    "rl_normaliser",
    "rl_rows",
    "value_loss",
    "MASK_KINDS",
    "METHOD_FAMILIES",
    "SFT_METHODS",
    "Example",
    "Rows",
    "ar_rows",
    "as_example",
    "as_examples",
    "example_from_mapping",
    "block_sft_rows",
    "build_sft_rows",
    "build_trace_rows",
    "count_response_tokens",
    "random_masking_rows",
    "response_blocks",
    "semi_ar_rows",
    "sft_loss",
    "shrink_steps",
    "target_logprobs",
    "trace_sft_rows",
    "weighted_nll",
]
