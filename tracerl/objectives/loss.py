"""The shared weighted-NLL loss and its normalisation.

    loss = Σ_targets w_j · (−log p_θ(y_j | state_j)) / N

* The sum runs over the targets of the rows at hand (a micro-batch).
* ``w_j`` is the per-target weight the row builder chose (sft.py): every response token has
  **expected total weight 1** per pass over its example (1 for trace/AR rows, 1/t for a token
  masked with probability t, ...).
* ``N`` is the number of real response tokens in the whole **optimizer batch**
  (``count_response_tokens`` of all the examples whose rows make up one optimizer step), passed
  in by the caller.  It is a constant of the optimizer step, not of the micro-batch, so
  the loss is independent of micro-batching and gradient accumulation: summing the losses of
  micro-batches computed with the same global N gives exactly the full-batch loss (and
  gradient).  Do *not* additionally divide by the number of accumulation steps.  With data
  parallelism, N is the all-reduced count over ranks and gradients must be *summed* across
  ranks (DDP/FSDP average them, so multiply the loss by the world size, or all-reduce N and
  scale accordingly).

Why a per-token mean over the optimizer batch.  Upstream normalises block models by the constant
padded response length L1 of the whole file and LLaDA/Dream by the target count of each row
(reference notes §8.11), so a token's weight depends on padding, on the size of the step it was
decoded in or on how rows were grouped into micro-batches.  Here every response token of the
optimizer batch counts the same, and for AR rows the loss is exactly the ordinary causal-LM
loss (mean NLL over response tokens).
"""

from __future__ import annotations

import torch

from tracerl.objectives.rows import Rows, target_logprobs


def check_normaliser(normaliser: float) -> float:
    n = float(normaliser)
    if not n > 0:
        raise ValueError(f"normaliser must be > 0 (the response-token count of the optimizer batch), got {normaliser!r}")
    return n


def weighted_nll(logprobs: torch.Tensor, weights: torch.Tensor, normaliser: float) -> torch.Tensor:
    """``Σ w_j · (−logprob_j) / N``."""
    n = check_normaliser(normaliser)
    return -(weights.to(logprobs) * logprobs).sum() / n


def _zero_loss(model) -> torch.Tensor:
    # A zero that is still connected to the weights, so backward() works on an empty micro-batch.
    head = model.backbone.get_output_embeddings().weight
    return head.sum() * 0.0


def sft_loss(model, rows: Rows, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch of rows (see the module docstring) and detached statistics."""
    n = check_normaliser(normaliser)
    if rows.num_targets == 0:
        loss = _zero_loss(model)
        return loss, {"loss": 0.0, "nll_sum": 0.0, "targets": 0, "rows": rows.num_rows,
                      "weight_sum": 0.0, "normaliser": n}
    logp = target_logprobs(model, rows)
    weights = rows.target_weight.to(logp.device)
    loss = weighted_nll(logp, weights, n)
    with torch.no_grad():
        stats = {
            "loss": float(loss),
            "nll_sum": float(-logp.sum()),  # unweighted, for a per-target mean NLL
            "targets": rows.num_targets,
            "rows": rows.num_rows,
            "weight_sum": float(weights.sum()),
            "normaliser": n,
        }
    return loss, stats
