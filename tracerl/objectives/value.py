"""Diffusion value model, GAE over trace steps and the clipped value loss (reference notes §4).

Value model.  A scalar head ``Linear(hidden, 1, bias=False)``, zero-initialised (every initial
value is exactly 0), on a diffusion backbone:

* ``share_backbone=False`` (default, upstream-compatible): a deep copy of the policy's backbone,
  trained by its own optimizer; ``ValueModel.parameters()`` = the copy + the head.
* ``share_backbone=True``: the policy's own backbone (no second copy in memory) + the head;
  ``ValueModel.parameters()`` = the head only (the backbone belongs to the policy and its
  optimizer).  Value-loss gradients still flow into the shared backbone: train with one
  combined loss (``policy_and_values`` gives both from one forward), or zero the backbone's
  gradients after a value-only backward.

A token's value is read where its log-prob is: at its target column in the row where it is a
target (same gather as ``rows.target_logprobs``), i.e. ``V(state before the token's step)`` at
its (masked) position.  The head runs in float32 whatever the backbone's dtype.

Saving: ``value_head.safetensors`` (key ``value_head.weight``) next to a checkpoint.  With a copied
backbone ``save_pretrained(folder)`` writes a whole HF folder (the copy, loadable by
``load_model``) with the head file in it; with a shared backbone it writes only the head file
into ``folder`` (normally the policy checkpoint folder, which the caller writes).

GAE over steps (§4.2).  Per response, with steps ``t_1 < … < t_S`` (distinct shrunk step ids of
its tokens, global across blocks, i.e. the decoding order), token rewards ``r_j`` (an outcome
reward sits on the tokens of the last step), step means ``r*_k``, ``V*_k``:

    R*_k = r*_k + γ R*_{k+1}
    A*_k = r*_k − V*_k + γ V*_{k+1} + γλ A*_{k+1}          (·_{S+1} = 0)
    Return_j = r_j + γ R*_{k+1},   A_j = r_j − V_j + γ V*_{k+1} + γλ A*_{k+1}   (j in step k)

With γ = λ = 1: ``Return_j = R`` and ``A_j = R − V_j``; with λ = 0: ``A_j = r_j − V_j + γ V*_{k+1}``.
Advantages must come from the value model *before* this RL step's value update (§4.2.8).

Value loss (§4.3): ``½ max((V − Return)², (V_clip − Return)²)`` with
``V_clip = V_old + clamp(V − V_old, −ε, ε)``, summed over targets and divided by the same
normaliser as the policy loss (``rl.rl_normaliser``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tracerl.errors import CheckpointError, ConfigError
from tracerl.models.model import DiffusionLM, atomic_folder
from tracerl.objectives.loss import check_normaliser
from tracerl.objectives.rows import Rows

HEAD_FILE = "value_head.safetensors"
HEAD_KEY = "value_head.weight"


class ValueModel(nn.Module):
    """Scalar value head on a diffusion backbone (module docstring)."""

    def __init__(self, model: DiffusionLM, share_backbone: bool = False, *, copy_backbone: bool = True) -> None:
        """``copy_backbone=False`` (with a backbone of its own): ``model`` is already a copy made
        for this value model and becomes its backbone, as it is (no second copy in memory)."""
        super().__init__()
        if not isinstance(model, DiffusionLM):
            raise TypeError(f"ValueModel needs a DiffusionLM, got {type(model)}")
        self.share_backbone = bool(share_backbone)
        if self.share_backbone:
            # Not registered as a submodule: the backbone's parameters belong to the policy.
            object.__setattr__(self, "_shared_lm", model)
        elif not copy_backbone:
            self.lm = model
        else:
            backbone = copy.deepcopy(model.backbone)  # keeps the policy's requires_grad flags
            for p in backbone.parameters():
                p.grad = None
            self.lm = DiffusionLM(backbone, model.tokenizer, model.spec)
        hidden = int(model.config.hidden_size)
        self.value_head = nn.Linear(hidden, 1, bias=False, device=model.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)

    # -- access ------------------------------------------------------------------------------
    @property
    def backbone_lm(self) -> DiffusionLM:
        """The DiffusionLM whose hidden states feed the head (the policy itself when shared)."""
        return self._shared_lm if self.share_backbone else self.lm

    @property
    def spec(self):
        return self.backbone_lm.spec

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    # -- forward -----------------------------------------------------------------------------
    def _target_hidden(self, rows: Rows) -> tuple[torch.Tensor, Rows]:
        lm = self.backbone_lm
        rows = rows.to(lm.device)
        hidden, _ = lm.hidden_states(
            rows.input_ids, attention_mask=rows.attention_mask_for(lm), position_ids=rows.position_ids
        )
        return hidden[rows.target_row, rows.target_col], rows

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values of any selection of hidden states ``(..., H) -> (...)``, float32."""
        w = self.value_head.weight
        return self.value_head(hidden.to(device=w.device, dtype=w.dtype)).squeeze(-1)

    def values(self, rows: Rows) -> torch.Tensor:
        """One value per target of ``rows``, shape ``(T,)`` float32."""
        if rows.num_targets == 0:
            return torch.zeros(0, device=self.device)
        selected, _ = self._target_hidden(rows)
        return self.head(selected)

    def policy_and_values(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target log-probs, target values)`` from one backbone forward (shared backbone)."""
        if not self.share_backbone:
            raise ConfigError("policy_and_values needs share_backbone=True (one forward for both)")
        if rows.num_targets == 0:
            z = torch.zeros(0, device=self.device)
            return z, z
        selected, rows = self._target_hidden(rows)
        logits = self.backbone_lm.lm_logits(selected)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logp = logits.log_softmax(-1).gather(-1, rows.target_label[:, None]).squeeze(-1)
        return logp, self.head(selected)

    # -- saving ------------------------------------------------------------------------------
    def save_head(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/value_head.safetensors`` (atomically: temporary file, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / HEAD_FILE
        tmp = folder / f".{HEAD_FILE}.tmp-{os.getpid()}"
        weight = self.value_head.weight.detach().to("cpu", torch.float32).contiguous()
        meta = {"format": "pt", "tracerl": "value_head", "hidden_size": str(weight.shape[1]),
                "share_backbone": str(self.share_backbone).lower()}
        try:
            save_file({HEAD_KEY: weight}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def load_head(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / HEAD_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no value head here")
        tensors = load_file(str(path))
        if HEAD_KEY not in tensors:
            raise CheckpointError(f"{path}: missing tensor {HEAD_KEY!r}")
        weight = tensors[HEAD_KEY]
        if tuple(weight.shape) != tuple(self.value_head.weight.shape):
            raise CheckpointError(
                f"{path}: value head of shape {tuple(weight.shape)}, the backbone needs "
                f"{tuple(self.value_head.weight.shape)}"
            )
        with torch.no_grad():
            self.value_head.weight.copy_(weight)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Copied backbone: an HF folder (backbone copy + head file), written atomically.
        Shared backbone: only the head file, into ``folder`` (e.g. the policy checkpoint)."""
        if self.share_backbone:
            self.save_head(folder)
            return Path(folder)
        with atomic_folder(folder) as tmp:
            self.write_files(tmp)
        return Path(folder)

    def write_files(self, folder: str | os.PathLike) -> None:
        """Write into an existing folder (no atomicity; for a caller-owned checkpoint folder)."""
        if not self.share_backbone:
            self.lm.write_files(Path(folder))
        self.save_head(folder)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        policy: DiffusionLM | None = None,
        *,
        share_backbone: bool = False,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> ValueModel:
        """Load what ``save_pretrained`` wrote.  Shared: ``policy`` is the backbone and ``folder``
        holds the head; copied: ``folder`` is a whole value-model checkpoint (``policy`` unused)."""
        if share_backbone:
            if policy is None:
                raise ConfigError("a shared-backbone value model needs the policy model")
            vm = cls(policy, share_backbone=True)
        else:
            from tracerl.models.loading import load_model

            lm = load_model(folder, dtype=dtype, device=device)
            vm = cls.__new__(cls)
            nn.Module.__init__(vm)
            vm.share_backbone = False
            vm.lm = lm
            vm.value_head = nn.Linear(int(lm.config.hidden_size), 1, bias=False, device=lm.device,
                                      dtype=torch.float32)
        vm.load_head(folder)
        return vm


# -- GAE over trace steps ---------------------------------------------------------------------


def gae_over_steps(
    rewards: Any,
    values: torch.Tensor,
    steps: Any,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    token_rewards: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level returns and advantages of one response (module docstring, §4.2).

    ``rewards``: a scalar outcome reward (placed on the tokens of the last step) or one reward
    per token.  ``token_rewards``: a per-token (process) reward added to a scalar ``rewards``
    (both at once: the outcome on the last step, the process reward where it was given).  ``values``: ``V_j`` per token (the old value model).  ``steps``: each token's
    shrunk step id, global across blocks (any order of tokens; ties = tokens decoded together).
    Returns ``(returns, advantages)``, each ``(n,)`` in ``values``' float dtype.  Computed in
    float64; vectorised over tokens, one scalar loop over the distinct steps.
    """
    v = torch.as_tensor(values).detach()
    out_dtype = v.dtype if v.is_floating_point() else torch.float32
    device = v.device
    v = v.to("cpu", torch.float64).reshape(-1)
    s = torch.as_tensor(steps).to("cpu", torch.long).reshape(-1)
    n = v.numel()
    if s.numel() != n:
        raise ValueError(f"steps ({s.numel()}) and values ({n}) must have one entry per token")
    if n == 0:
        z = torch.zeros(0, dtype=out_dtype, device=device)
        return z, z.clone()
    uniq, k = torch.unique(s, sorted=True, return_inverse=True)
    num_steps = uniq.numel()
    r_in = (rewards.detach() if isinstance(rewards, torch.Tensor) else
            torch.as_tensor(rewards, dtype=torch.float64)).to("cpu", torch.float64)
    if r_in.dim() == 0:
        r = torch.where(k == num_steps - 1, r_in, torch.zeros((), dtype=torch.float64))
        if token_rewards is not None:
            extra = torch.as_tensor(token_rewards, dtype=torch.float64).reshape(-1)
            if extra.numel() != n:
                raise ValueError(f"token rewards ({extra.numel()}) and values ({n}) differ in length")
            r = r + extra
    else:
        r = r_in.reshape(-1)
        if r.numel() != n:
            raise ValueError(f"token rewards ({r.numel()}) and values ({n}) differ in length")
    count = torch.bincount(k, minlength=num_steps).to(torch.float64)
    r_star = (torch.zeros(num_steps, dtype=torch.float64).index_add_(0, k, r) / count).tolist()
    v_star = (torch.zeros(num_steps, dtype=torch.float64).index_add_(0, k, v) / count).tolist()
    # Step recursions, backwards; index num_steps holds the zeros after the last step.
    ret_s = [0.0] * (num_steps + 1)
    adv_s = [0.0] * (num_steps + 1)
    val_s = v_star + [0.0]
    gl = gamma * lam
    for m in range(num_steps - 1, -1, -1):
        ret_s[m] = r_star[m] + gamma * ret_s[m + 1]
        adv_s[m] = r_star[m] - v_star[m] + gamma * val_s[m + 1] + gl * adv_s[m + 1]
    nxt = k + 1
    ret_next = torch.tensor(ret_s, dtype=torch.float64)[nxt]
    adv_next = torch.tensor(adv_s, dtype=torch.float64)[nxt]
    val_next = torch.tensor(val_s, dtype=torch.float64)[nxt]
    returns = r + gamma * ret_next
    advantages = (r - v) + gamma * val_next + gl * adv_next
    return returns.to(device, out_dtype), advantages.to(device, out_dtype)


def gae_targets(
    rows: Rows,
    values: torch.Tensor,
    rewards: Any,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    token_rewards: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gae_over_steps`` for every response of trace rows, aligned with ``rows``' targets.

    ``values``: one per target (``ValueModel.values(rows)`` of the old value model).
    ``rewards``: per example (indexed by ``target_example``): a scalar outcome reward each, or a
    sequence of per-token reward vectors.  ``token_rewards``: per example, None or a per-token
    (process) reward vector added to its scalar outcome reward.  Needs rows where every response token is a target
    exactly once (trace rows of whole responses, ``rl_rows('tracerl', ...)``).
    Returns ``(returns, advantages)`` per target.
    """
    values = torch.as_tensor(values).detach()
    if values.shape != (rows.num_targets,):
        raise ValueError(f"values: shape {tuple(values.shape)}, expected ({rows.num_targets},)")
    returns = torch.empty_like(values, dtype=values.dtype if values.is_floating_point() else torch.float32)
    advantages = torch.empty_like(returns)
    ex = rows.target_example.to(values.device)
    index = rows.target_index.to(values.device)
    steps = rows.target_step.to(values.device)
    order = torch.argsort(ex * (int(index.max()) + 1 if index.numel() else 1) + index)
    ex_sorted = ex[order]
    bounds = torch.searchsorted(ex_sorted, torch.unique(ex_sorted), right=False).tolist() + [order.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = order[a:b]
        e = int(ex_sorted[a])
        if not torch.equal(index[sel].cpu(), torch.arange(b - a)):
            raise ValueError(
                f"example {e}: GAE needs every response token as a target exactly once "
                "(trace rows of whole responses)"
            )
        reward = rewards[e]
        ret, adv = gae_over_steps(reward, values[sel], steps[sel], gamma=gamma, lam=lam,
                                  token_rewards=token_rewards[e] if token_rewards is not None else None)
        returns[sel] = ret.to(returns)
        advantages[sel] = adv.to(returns)
    return returns, advantages


# -- value loss -------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    normaliser: float,
    eps: float | None = 0.2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``Σ_j w_j · ½ max((V_j − R_j)², (V_clip_j − R_j)²) / normaliser``
    with ``V_clip = V_old + clamp(V − V_old, −ε, ε)`` (``eps=None``: unclipped).

    ``old_values``, ``returns`` and ``weights`` are constants.  The max is a select (the clipped
    term only where it is strictly larger), so the gradient is never split between branches.
    Stats: ``loss``, ``value_mean``, ``return_mean``, ``mse`` (unclipped, per target),
    ``clip_fraction``, ``targets``, ``normaliser``.
    """
    n = check_normaliser(normaliser)
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D (one per target), got shape {tuple(values.shape)}")

    def const(x, name):
        t = torch.as_tensor(x, dtype=values.dtype, device=values.device).detach()
        if t.shape != values.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(values.shape)}")
        return t

    old, ret = const(old_values, "old_values"), const(returns, "returns")
    w = torch.ones_like(values) if weights is None else const(weights, "weights")
    unclipped = (values - ret) ** 2
    if eps is None:
        use_clip = torch.zeros_like(values, dtype=torch.bool)
        per = unclipped
    else:
        if not eps > 0:
            raise ConfigError(f"value clip eps must be > 0 (or None), got {eps!r}")
        v_clip = old + (values - old).clamp(-eps, eps)
        clipped = (v_clip - ret) ** 2
        use_clip = clipped > unclipped
        per = torch.where(use_clip, clipped, unclipped)
    loss = 0.5 * (w * per).sum() / n
    with torch.no_grad():
        t = values.numel()

        def mean(x: torch.Tensor) -> float:
            return float(x.float().mean()) if t else 0.0

        stats = {
            "loss": float(loss.detach()),
            "value_mean": mean(values),
            "return_mean": mean(ret),
            "mse": mean(unclipped),
            "clip_fraction": mean(use_clip),
            "targets": t,
            "normaliser": n,
        }
    return loss, stats
