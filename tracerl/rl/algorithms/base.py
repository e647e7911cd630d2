"""What an RL algorithm is: how it turns rollouts into training rows, its advantages, its loss,
and whether it can use a value model.  The RL loop (rl/loop.py) is generic over this interface.

A new algorithm is a subclass with a ``name``, an ``Options`` dataclass (its own config section,
``policy.options.<name>`` in YAML, typed and checked like every config key) and ``rows``; it inherits
group-normalised advantages and the PPO-clip loss unless it overrides them.  Register it with
``@register_algorithm`` (rl/algorithms/__init__.py); a module outside the library is loaded with
``plugins: [my_module]`` (or a ``.py`` path) in the RL config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tracerl.objectives import Rows, group_advantages, policy_loss

VALUE_MODEL_USES = ("unsupported", "optional", "required")


@dataclass
class NoOptions:
    """An algorithm without keys of its own."""


class Algorithm:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Whether the run may (optional) or must (required) train a value model; with one, the loop
    # gives every target the GAE advantage over its response's trace steps, which needs rows whose
    # targets are the trace steps (every response token a target once per decoding step).
    value_model: ClassVar[str] = "unsupported"
    # True: ``rows`` is called once per ``policy.ppo_epochs`` pass (with the same generator, so each
    # call draws new masks) and pass e trains on the e-th rows; every set gets its old log-probs
    # before the first update (d1: a new random prompt mask for each inner update).
    rows_per_epoch: ClassVar[bool] = False

    def __init__(self, options: Any, policy) -> None:
        self.options = options  # an instance of ``Options``
        self.policy = policy  # the shared PolicyConfig (eps, beta, filters, ...)

    def check(self, config, model) -> None:
        """Refuse incompatible settings (raise ConfigError naming the key) before any work."""

    def rows(self, model, examples: list, generator: torch.Generator, *, block_size: int | None,
             pad_id: int | None) -> Rows:
        """The policy-loss rows of one RL step's kept responses (``Example``s, in order); targets
        carry ``target_example`` = the response's index, so advantages broadcast per target."""
        raise NotImplementedError

    def advantages(self, rewards, group_ids, correct) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-response advantages and a keep mask, aligned with the responses (default: the
        group z-score, dropping groups per ``policy.filter_equal`` / ``policy.accuracy_band``)."""
        band = self.policy.accuracy_band
        return group_advantages(rewards, group_ids, filter_equal=self.policy.filter_equal,
                                accuracy_band=tuple(band) if band else None, correct=correct,
                                scale=self.scale_advantages)

    @property
    def scale_advantages(self) -> bool:
        """Divide group-centred rewards by the group's std (GRPO); False: r - mean (Dr. GRPO)."""
        return True

    def loss(self, logprobs, old_logprobs, advantages, *, normaliser: float, ref_logprobs, weights, rows: Rows):
        """(loss of a micro-batch's targets, stats) (default: PPO-clip + beta * k3, objectives/rl.py).

        All per-target tensors are aligned with ``rows``' targets (the micro-batch's rows: its
        ``target_example`` / ``target_row`` group targets per response or per row).  A micro-batch
        holds whole responses unless ``policy.rows_per_forward`` splits one."""
        p = self.policy
        return policy_loss(logprobs, old_logprobs, advantages, normaliser=normaliser, eps=p.eps,
                           logratio_clamp=p.logratio_clamp, beta=p.beta, ref_logprobs=ref_logprobs,
                           weights=weights)
