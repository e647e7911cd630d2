"""AdamW with warm-up/decay schedules, gradient clipping and a non-finite guard."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tracerl.errors import ConfigError, TracerlError
from tracerl.train.distributed import full_value
from tracerl.train.schedule import SCHEDULES, lr_factor


class TrainingDiverged(TracerlError):
    """A non-finite loss or gradient: training stops before touching the weights."""


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr: must be a finite number > 0, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.eps > 0 and self.weight_decay >= 0):
            raise ConfigError("optim.eps must be > 0 and optim.weight_decay >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: unknown {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


class Optimizer:
    """AdamW over the trainable parameters; ``step(i)`` sets the scheduled lr, clips, steps."""

    def __init__(self, params, config: OptimConfig, total_steps: int) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ConfigError("no trainable parameters")
        self.config = config
        self.total_steps = total_steps
        self.adamw = torch.optim.AdamW(
            self.params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
            weight_decay=config.weight_decay,
        )

    def lr_at(self, step: int) -> float:
        c = self.config
        return c.lr * lr_factor(step, total_steps=self.total_steps, warmup_steps=c.warmup_steps,
                                schedule=c.schedule, min_lr_ratio=c.min_lr_ratio)

    def step(self, step: int, loss: float) -> dict:
        """Apply the accumulated gradients as optimizer step ``step`` (0-based)."""
        if not math.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss {loss} at step {step + 1}")
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(self.params, clip)))  # global over shards
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at step {step + 1}")
        lr = self.lr_at(step)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        try:
            self.adamw.step()
        except RuntimeError as e:  # e.g. an lr so large that lr * update overflows the weights' dtype
            if "overflow" not in str(e):
                raise
            raise TrainingDiverged(f"the update overflows the weights at step {step + 1} (lr {lr:g}): {e}") from None
        self.adamw.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def state_dict(self) -> dict:
        return self.adamw.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state)
