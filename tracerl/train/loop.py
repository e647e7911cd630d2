"""What every training recipe (SFT, RL) shares: optimizer steps with explicit accumulation,
mixed precision, checkpoints with exact resume, metrics.

Exact resume: everything that decides the next step is in the checkpoint (weights, AdamW state,
RNG states, the data sampler's position, the step), and per-step noise is drawn from generators
seeded by ``(seed, step)``, so "N steps, kill -9, resume, N more" gives the same weights and the
same metrics rows as 2N steps straight.  Rows logged after the last checkpoint of a killed run
are dropped on resume and written again.  A fresh run seeds the global RNGs from its seed
(dropout, LoRA dropout), so it is a function of its config too.

Resume refuses, before touching anything, a checkpoint past ``max_steps``, one trained with(out)
LoRA or with other trainable parameters than this run's, a config that differs from the one the
checkpoint was made with in anything that shapes the training trajectory (see
``RESUME_MAY_CHANGE``), and (through the recipe's ``validate``) other data.  A fresh run refuses
an ``output_dir`` that already holds checkpoints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tracerl.errors import ConfigError
from tracerl.models.model import DiffusionLM
from tracerl.train import checkpoint as ckpt
from tracerl.train import lora
from tracerl.train.metrics import MetricsLogger
from tracerl.train.optim import OptimConfig, Optimizer, TrainingDiverged

MIXED_PRECISION = ("auto", "no", "bf16")

# Config keys (dotted; a trailing "." covers a whole section) a resume may change: where the run
# lives and runs, how long it runs (a longer max_steps also stretches the LR schedule: that is the
# point of extending a run), what it logs and keeps, and evaluation (its sampler has its own
# generator).  Any other difference would silently make the resumed run a different experiment.
RESUME_MAY_CHANGE = ("resume", "output_dir", "model", "device", "max_steps", "save_every", "eval.",
                     "loop.keep_last", "loop.tensorboard", "loop.wandb", "loop.wandb_project",
                     "loop.gradient_checkpointing")


@dataclass
class LoopConfig:
    micro_batch: int = 4  # examples per forward/backward
    accumulation: int = 1  # micro-batches per optimizer step (effective batch = micro x accum x world)
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    keep_last: int = 0  # checkpoints to keep (0 = all)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "tracerl"

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.accumulation < 1:
            raise ConfigError("loop.micro_batch and loop.accumulation must be >= 1")
        if self.keep_last < 0:
            raise ConfigError(f"loop.keep_last: must be >= 0 (0 = keep all), got {self.keep_last}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"loop.mixed_precision: {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict, may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``"key: saved -> current"`` for every difference outside ``may_change``."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key in may_change or any(p.endswith(".") and key.startswith(p) for p in may_change):
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append(f"{key}: {'(absent)' if a is missing else repr(a)} -> {'(absent)' if b is missing else repr(b)}")
    return changes


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Noise for optimizer step ``step``: a pure function of (seed, step), hence resumable."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919) % (2**63 - 1))
    return g


class TrainingRun:
    def __init__(self, model: DiffusionLM, *, output_dir: str | Path, max_steps: int, save_every: int,
                 seed: int, optim: OptimConfig, loop: LoopConfig, run_config: dict | None = None) -> None:
        if max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1, got {max_steps}")
        if save_every < 0:
            raise ConfigError(f"save_every: must be >= 0 (0 = only at the end), got {save_every}")
        self.model = model
        self.output_dir = Path(output_dir)
        self.max_steps = max_steps
        self.save_every = save_every
        self.seed = seed
        self.loop = loop
        self.step = 0
        if loop.gradient_checkpointing:
            # Non-reentrant: the reentrant variant drops the gradients of a checkpointed segment
            # whose inputs do not require grad, i.e. every LoRA adapter (frozen embeddings).
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = Optimizer(model.backbone.parameters(), optim, max_steps)
        self.run_config = run_config
        self.metrics = MetricsLogger(self.output_dir, tensorboard=loop.tensorboard, wandb=loop.wandb,
                                     wandb_project=loop.wandb_project, run_config=run_config)
        self.last_checkpoint: Path | None = None
        self._t_last = time.perf_counter()

    # -- precision ------------------------------------------------------------------------
    def autocast(self):
        device = self.model.device
        use_bf16 = self.loop.mixed_precision == "bf16" or (
            self.loop.mixed_precision == "auto" and device.type == "cuda")
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- resume ---------------------------------------------------------------------------
    def start_fresh(self) -> None:
        """A new run: refuse to mix with the checkpoints of an earlier one."""
        existing = ckpt.latest_checkpoint(self.output_dir)
        if existing is not None:
            raise ConfigError(f"output_dir {self.output_dir} already holds checkpoint {existing.name}; "
                              "pass resume=true to continue it, or choose another output_dir")
        self.metrics.truncate_after(0)
        ckpt.seed_everything(self.seed)
        self._t_last = time.perf_counter()

    def _trainable(self) -> list[str]:
        return [name for name, p in self.model.backbone.named_parameters() if p.requires_grad]

    def resume(self, validate: Callable[[dict], None] | None = None, may_change: tuple[str, ...] = ()) -> dict | None:
        """Restore the latest complete checkpoint; returns its trainer state (None: fresh run).

        ``validate(state)`` runs before anything is restored or rewritten: the recipe's own
        checks and restores (e.g. the data sampler, which refuses other data).  ``may_change``:
        config keys the recipe checks itself, on top of ``RESUME_MAY_CHANGE``."""
        path = ckpt.latest_checkpoint(self.output_dir)
        if path is None:  # nothing to resume: a fresh run
            self.metrics.truncate_after(0)
            ckpt.seed_everything(self.seed)
            self._t_last = time.perf_counter()
            return None
        state = ckpt.load_trainer_state(path)
        step = int(state["step"])
        if step > self.max_steps:
            raise ConfigError(f"resume: checkpoint {path.name} is past max_steps={self.max_steps}; "
                              f"raise max_steps or start a new output_dir")
        saved_lora, live_lora = bool(state.get("lora", False)), lora.is_lora(self.model)
        if saved_lora != live_lora:
            raise ConfigError(f"resume: checkpoint {path.name} was trained "
                              f"{'with' if saved_lora else 'without'} LoRA, this run has lora.enabled="
                              f"{str(live_lora).lower()}")
        if "trainable" in state and state["trainable"] != self._trainable():
            raise ConfigError(f"resume: the trainable parameters differ from checkpoint {path.name}'s "
                              "(another model or LoRA configuration?)")
        if state.get("run_config") is not None and self.run_config is not None:
            changed = config_changes(state["run_config"], self.run_config, RESUME_MAY_CHANGE + may_change)
            if changed:
                raise ConfigError(f"resume: the config differs from checkpoint {path.name}'s in "
                                  f"{'; '.join(changed)}; resume with the checkpoint's values or start a new "
                                  f"output_dir (only {', '.join(RESUME_MAY_CHANGE + may_change)} may change)")
        if validate is not None:
            validate(state)
        if lora.is_lora(self.model):
            lora.load_adapter_weights(self.model, path / "adapter")
        else:
            weights = load_file(str(path / "model.safetensors"))
            try:
                missing, unexpected = self.model.backbone.load_state_dict(weights, strict=False)
            except RuntimeError as e:  # shape mismatch: another model
                raise ConfigError(f"{path}: checkpoint does not match the model: {str(e).splitlines()[-1].strip()}") from None
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if set(missing) - tied or unexpected:
                raise ConfigError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        self.step = step
        self.metrics.truncate_after(self.step)
        self.last_checkpoint = path
        self._t_last = time.perf_counter()
        return state

    # -- stepping -------------------------------------------------------------------------
    def optimizer_step(self, loss_value: float) -> dict:
        try:
            out = self.optimizer.step(self.step, loss_value)
        except TrainingDiverged as e:
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise TrainingDiverged(f"{e}; last good checkpoint: {last}") from None
        self.step += 1
        return out

    def should_save(self) -> bool:
        return self.step == self.max_steps or (self.save_every > 0 and self.step % self.save_every == 0)

    def save(self, extra_state: dict) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "lora": lora.is_lora(self.model),
                 "trainable": self._trainable(), "run_config": self.run_config, **extra_state}
        try:
            path = ckpt.save_checkpoint(self.output_dir, self.step, self.model, state,
                                        keep_last=self.loop.keep_last)
        except TrainingDiverged as e:
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise TrainingDiverged(f"{e}; last good checkpoint: {last}") from None
        self.last_checkpoint = path
        return path

    def log(self, row: dict) -> dict:
        now = time.perf_counter()
        row = {"step": self.step, **row, "seconds": now - self._t_last}
        self._t_last = now
        self.metrics.log(row)
        return row

    def close(self) -> None:
        self.metrics.close()
