"""What every training recipe (SFT, RL) shares: optimizer steps with explicit accumulation,
mixed precision, checkpoints with exact resume, metrics.

Exact resume: everything that decides the next step is in the checkpoint (weights, AdamW state,
RNG states, the data sampler's position, the step), and per-step noise is drawn from generators
seeded by ``(seed, step)``, so "N steps, kill -9, resume, N more" gives the same weights and the
same metrics rows as 2N steps straight.  Rows logged after the last checkpoint of a killed run
are dropped on resume and written again.  A fresh run seeds the global RNGs from its seed
(dropout, LoRA dropout), so it is a function of its config too.

Resume takes the newest *complete* checkpoint: one whose files are cut short (see
checkpoint.py) is skipped with a warning naming it and the reason, and set aside as
``step-N.incomplete``.  It refuses, before touching anything, a checkpoint past ``max_steps``,
one trained with(out) LoRA or with other trainable parameters than this run's, a config that
differs from the one the checkpoint was made with in anything that shapes the training
trajectory (see ``RESUME_MAY_CHANGE``), and (through the recipe's ``validate``) other data.  A
fresh run refuses an ``output_dir`` that already holds checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tracerl.errors import CheckpointError, ConfigError, OutputError, brief
from tracerl.models.model import DiffusionLM
from tracerl.train import checkpoint as ckpt
from tracerl.train import lora
from tracerl.train.distributed import (DistributedConfig, World, check_same_config, is_sharded, local_tensor, rank_seed,
                                       reshard, shard)
from tracerl.train.metrics import MetricsLogger, check_reporting
from tracerl.train.optim import OptimConfig, Optimizer, TrainingDiverged

log = logging.getLogger(__name__)

POLICY_FORWARDS = ("hidden_states", "lm_logits")  # the methods the objectives call (sharded: gathers)

MIXED_PRECISION = ("auto", "no", "bf16")
TRAIN_ATTENTION = ("sdpa", "flex")

# Config keys (dotted; a trailing "." covers a whole section) a resume may change: where the run
# lives and runs, how long it runs (a longer max_steps also stretches the LR schedule: that is the
# point of extending a run), what it logs and keeps, and evaluation (its sampler has its own
# generator).  Any other difference would silently make the resumed run a different experiment.
RESUME_MAY_CHANGE = ("resume", "output_dir", "model", "device", "max_steps", "save_every", "eval.",
                     "loop.keep_last", "loop.report_to", "loop.wandb_project",
                     "loop.tensorboard", "loop.wandb",  # the switches report_to replaced, in older runs' configs
                     "loop.gradient_checkpointing", "distributed.")


@dataclass
class LoopConfig:
    micro_batch: int = 4  # examples per forward/backward
    accumulation: int = 1  # micro-batches per optimizer step (effective batch = micro x accum x world)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    mixed_precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    keep_last: int = 0  # checkpoints to keep (0 = all)
    # Trackers beside metrics.jsonl, TRL's names: tensorboard, wandb (online when logged in, a local
    # run folder with WANDB_MODE=offline), all (every installed one), none.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "tracerl"  # W&B project name
    # flex: block masks built from positions, memory linear in the row length (torch has no flex backward on CPU)
    attention: str = "sdpa"  # training attention: sdpa (dense masks; CPU and GPU) | flex (FlexAttention; CUDA only)

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.accumulation < 1:
            raise ConfigError("loop.micro_batch and loop.accumulation must be >= 1")
        if self.keep_last < 0:
            raise ConfigError(f"loop.keep_last: must be >= 0 (0 = keep all), got {self.keep_last}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"loop.mixed_precision: {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISION)}")
        self.report_to = check_reporting(self.report_to)  # a missing package fails here, before any load
        if self.attention not in TRAIN_ATTENTION:
            raise ConfigError(f"loop.attention: {self.attention!r}; valid: {', '.join(TRAIN_ATTENTION)}")


def check_attention(loop: LoopConfig, device: str | torch.device) -> None:
    """``loop.attention=flex`` trains on CUDA only (before any weights load)."""
    if loop.attention == "flex" and torch.device(device).type != "cuda":
        raise ConfigError(f"loop.attention=flex: FlexAttention has no backward pass on {torch.device(device).type} "
                          f"(torch {torch.__version__.split('+')[0]}); train with loop.attention=sdpa there")


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


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _set_attention(module: torch.nn.Module, attention: str) -> None:
    """Every DiffusionLM in ``module`` trains with ``attention`` (rows.attention_mask_for reads it)."""
    for part in module.modules():
        if isinstance(part, DiffusionLM):
            part.train_attention = attention


def _slice_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` as this rank holds ``like``: its local shard when ``like`` is sharded and
    ``tensor`` is whole (sliced here, no communication), else its local tensor."""
    if hasattr(like, "device_mesh") and not hasattr(tensor, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.detach().to(like.device), like.device_mesh, like.placements,
                                 src_data_rank=None).to_local()
    return local_tensor(tensor)


def _load_weights(model: DiffusionLM, path: Path) -> None:
    """Load ``path/model.safetensors`` into ``model``'s backbone, refusing another model's."""
    weights = load_file(str(path / "model.safetensors"))
    try:
        missing, unexpected = model.backbone.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch: another model
        raise ConfigError(f"{path}: checkpoint does not match the model: {str(e).splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


@dataclass
class _Trained:
    """A trained model besides the policy: its optimizer and how its weights are saved/loaded."""

    module: torch.nn.Module
    optimizer: Optimizer
    save: Callable[[Path], None]  # write the weights into a new folder
    load: Callable[[Path], None]  # restore them from that folder
    replicated: bool = False  # several ranks: whole on every rank, gradients summed before each step


class TrainingRun:
    """Owns every model of a training run and everything that makes it resumable.

    The *policy* (a ``DiffusionLM``) is the run's checkpoint: ``checkpoints/step-N`` is its HF
    folder plus ``trainer_state.pt``.  Further trained models (``add_trained``: RL's value
    model) have their own optimizer and a folder ``checkpoints/NAME-N`` written *before* the
    policy folder of the same step, which is renamed into place last and so marks the step
    complete; folders of steps without a policy checkpoint (pruned by ``loop.keep_last``, or a
    run killed between the saves) are removed.  Frozen models (``add_frozen_copy``: RL's KL
    reference) are copies of the policy as it was before resume: rebuilt from the run's starting
    model, unless they move toward the policy (``tracks_policy``, ``sync_frozen``): those are
    saved in ``checkpoints/NAME-N`` like trained models (no optimizer).  Optimizer steps
    (``update``) use the LR of the current step; ``advance`` ends the step.

    Several ranks (``world``, train/distributed.py): every model is sharded with FSDP2 when it
    joins the run, a checkpoint is ``shards/`` (DCP: every model's weights and optimizer state)
    plus the policy's HF folder gathered by rank 0, which alone writes metrics and files; with
    ``generates`` an unsharded inference copy serves generation (``sync_inference``)."""

    def __init__(self, model: DiffusionLM, *, output_dir: str | Path, max_steps: int, save_every: int,
                 seed: int, optim: OptimConfig, loop: LoopConfig, run_config: dict | None = None,
                 world: World | None = None, distributed: DistributedConfig | None = None,
                 generates: bool = True) -> None:
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
        self.world = world or World()
        self.distributed = distributed or DistributedConfig()
        check_same_config(self.world, run_config or {}, lambda a, b: config_changes(a, b, ()))
        check_attention(loop, model.device)
        _set_attention(model, loop.attention)
        if loop.gradient_checkpointing:
            # Non-reentrant: the reentrant variant drops the gradients of a checkpointed segment
            # whose inputs do not require grad, i.e. every LoRA adapter (frozen embeddings).
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.inference: DiffusionLM | None = None
        if self.world.distributed:
            # The "hybrid engine" of verl: an unsharded copy per rank for generation, refreshed from the
            # shards before each use (sync_inference).  Generation runs a different number of
            # forwards on every rank, which the sharded model cannot: its forwards are collectives.
            # It keeps the policy's requires_grad flags: models built from it (a value model's copy
            # of the backbone) train what the policy trains; generation runs under no_grad.
            # Made only for runs that generate or build models from the policy (``generates``), and
            # for LoRA, whose checkpoints merge the adapter into the weights on rank 0 from it.
            if generates or lora.is_lora(model):
                self.inference = (lora.lora_copy(model) if lora.is_lora(model) else deepcopy(model)).eval()
                if self._bf16():  # generation in bf16, as on one GPU (the fp32 masters stay in the shards)
                    self.inference.to(torch.bfloat16)
            self._shard(model, POLICY_FORWARDS)
        self.optimizer = Optimizer(model.backbone.parameters(), optim, max_steps)
        self.trained: dict[str, _Trained] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        self.tracking: list[str] = []  # frozen models that sync_frozen moves: saved in checkpoints
        self.run_config = run_config
        self.metrics = MetricsLogger(self.output_dir, report_to=loop.report_to,
                                     wandb_project=loop.wandb_project, run_config=run_config,
                                     enabled=self.world.is_main)
        self.last_checkpoint: Path | None = None
        self._lock: ckpt.OutputLock | None = None
        self._t_last = time.perf_counter()

    # -- models ---------------------------------------------------------------------------
    def add_trained(self, name: str, module: torch.nn.Module, params, optim: OptimConfig, *,
                    save: Callable[[Path], None], load: Callable[[Path], None],
                    forward_methods: tuple[str, ...] = (), replicated: bool = False) -> torch.nn.Module:
        """Train ``params`` of ``module`` with their own optimizer (same step count and schedule
        shape as the policy's), checkpointed in ``checkpoints/NAME-N`` by ``save``/``load``.
        Several ranks: ``module`` (built from ``unsharded_policy``) is sharded and all its
        trainable parameters are trained; it is checkpointed in the run's shards, and
        ``forward_methods`` are the methods its users call.  ``replicated``: a small module on top
        of the sharded policy (a value head on the shared backbone), not sharded: every rank holds
        it whole and its gradients are summed over the ranks before each step."""
        if name in ("step", "policy") or name in self.trained or "-" in name:
            raise ValueError(f"trained model name {name!r}: taken or invalid")
        _set_attention(module, self.loop.attention)
        if self.world.distributed and not replicated:  # sharded like the policy; its parameters are the shards now
            self._shard(module.to(self.model.dtype), forward_methods)
            params = [p for p in module.parameters() if p.requires_grad]
        elif replicated and self.world.distributed:
            with torch.no_grad():  # every rank starts from rank 0's weights
                for tensor in [*params, *module.buffers()]:
                    self.world.broadcast_tensor(tensor)
        self.trained[name] = _Trained(module, Optimizer(params, optim, self.max_steps), save, load, replicated)
        return module

    def add_frozen_copy(self, name: str, *, tracks_policy: bool = False) -> DiffusionLM:
        """A frozen copy of the policy as it is now (call before ``resume``: the starting model);
        a LoRA policy's copy is its base weights, a plain model (its adapter is zero at the start).
        ``tracks_policy``: ``sync_frozen`` moves it toward the policy, so it is part of every
        checkpoint (resume restores it, not the start)."""
        if self.step or self.last_checkpoint is not None:
            raise RuntimeError("add_frozen_copy: the copy must be made before the run resumes")
        if name in ("step", "policy") or name in self.trained or name in self.frozen or "-" in name:
            raise ValueError(f"frozen model name {name!r}: taken or invalid")
        copy = _frozen(self.policy_copy(base=True))
        _set_attention(copy, self.loop.attention)
        if self.world.distributed:
            self._shard(copy, POLICY_FORWARDS)
        self.frozen[name] = copy
        if tracks_policy:
            self.tracking.append(name)
        return copy

    def sync_frozen(self, name: str, alpha: float) -> None:
        """Move frozen model ``name`` toward the policy: ``w <- alpha * w_policy + (1 - alpha) * w``
        for every weight (TR-DPO's reference update, TRL's ``ref_model_mixup_alpha``); alpha = 1
        copies the policy.  A LoRA policy contributes its merged weights; several ranks: each
        rank mixes its own shards (the copy is sharded as the policy is)."""
        if name not in self.tracking:
            raise ValueError(f"sync_frozen: {name!r} was not added with tracks_policy=True")
        frozen = self.frozen[name]
        if self.sharded:
            reshard(frozen), reshard(self.model)
        if not lora.is_lora(self.model):
            policy = dict(self.model.named_parameters())
        else:  # merged one layer at a time; several ranks: from the gathered inference copy (bf16 on GPU)
            policy = lora.merged_parameters(self.sync_inference() if self.sharded else self.model)
        with torch.no_grad():
            for key, weight in frozen.named_parameters():
                source = policy[key]() if callable(policy[key]) else policy[key]
                w, p = local_tensor(weight), _slice_like(source, weight)
                if w.shape != p.shape:
                    raise RuntimeError(f"sync_frozen: {key} is sharded as {tuple(w.shape)} in {name!r} and as "
                                       f"{tuple(p.shape)} in the policy")
                w.lerp_(p.to(w.dtype), alpha)  # exact at alpha = 1 (torch's lerp)

    def policy_copy(self, *, base: bool = False) -> DiffusionLM:
        """A new unsharded copy of the policy's current weights in the policy's master precision
        (every rank calls it), e.g. a frozen reference or a value model's own backbone.  A LoRA
        policy gives a LoRA copy, or with ``base`` its base weights as a plain model.  Several
        ranks: built from the inference copy, then loaded with the full-precision weights
        gathered from the shards (the inference copy is bf16 on GPU)."""
        source = self.unsharded_policy()
        copy = lora.lora_copy(source) if lora.is_lora(source) else deepcopy(source)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            copy.to(self.model.dtype)
            copy.load_state_dict(get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True)))
        for param in copy.parameters():
            param.grad = None
        return lora.base_copy(copy) if base and lora.is_lora(copy) else copy

    def evaluate(self, fn: Callable[[DiffusionLM], dict]) -> dict:
        """``fn(model)`` with the current weights (periodic evaluation); several ranks: on rank 0
        with the inference copy, its figures handed to every rank (SFT stops on them)."""
        model = self.sync_inference()
        result = fn(model) if self.world.is_main else None
        return self.world.gather(result)[0]

    def unsharded_policy(self) -> DiffusionLM:
        """The policy as a plain module: itself on one rank; with several, the inference copy
        (build further models from it, e.g. a value model's copy of the backbone; add_trained
        and add_frozen_copy cast them to the policy's dtype)."""
        if not self.sharded:
            return self.model
        if self.inference is None:
            raise RuntimeError("unsharded_policy: this run was made with generates=False")
        return self.inference

    def sync_inference(self) -> DiffusionLM:
        """The model to generate with: the policy itself, or (several ranks) the inference copy
        loaded with the policy's current weights, gathered from the shards (every rank calls it)."""
        if not self.sharded:
            return self.model
        if self.inference is None:
            raise RuntimeError("sync_inference: this run was made with generates=False")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, tensor in self.inference.state_dict().items():
                tensor.copy_(full[name])
        return self.inference

    def _optimizer(self, name: str) -> Optimizer:
        return self.optimizer if name == "policy" else self.trained[name].optimizer

    def _folder(self, name: str, step: int) -> Path:
        return ckpt.checkpoints_dir(self.output_dir) / f"{name}-{step:08d}"

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def _shard(self, module: torch.nn.Module, forward_methods: tuple[str, ...]) -> None:
        shard(module, self.world, self.distributed, bf16=self._bf16(), forward_methods=forward_methods)

    # -- precision ------------------------------------------------------------------------
    def _bf16(self) -> bool:
        return self.loop.mixed_precision == "bf16" or (
            self.loop.mixed_precision == "auto" and self.model.device.type == "cuda")

    def autocast(self):
        """bf16 autocast where mixed precision is on; sharded models compute in bf16 through
        FSDP2's mixed-precision policy instead (bf16 weights, fp32 gradient reduction)."""
        if self._bf16() and not self.sharded:
            return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- resume ---------------------------------------------------------------------------
    def _begin(self) -> None:
        self.metrics.truncate_after(0)
        ckpt.seed_everything(rank_seed(self.seed, self.world))
        self.world.barrier()  # rank 0 has truncated the metrics before anyone reads them
        self._t_last = time.perf_counter()

    def _claim_output_dir(self) -> None:
        """Refuse a second run writing into this run's ``output_dir`` at the same time (e.g. two
        copies of one command started side by side): rank 0 holds a lock on it while it runs."""
        problem = None
        if self.world.is_main:
            self._lock = ckpt.OutputLock(self.output_dir)
            problem = self._lock.acquire()
        problem = self.world.gather(problem)[0]
        if problem:
            raise ConfigError(problem)

    def start_fresh(self) -> None:
        """A new run: refuse to mix with the checkpoints of an earlier one."""
        self._claim_output_dir()
        existing = ckpt.latest_checkpoint(self.output_dir)
        if existing is not None:
            raise ConfigError(f"output_dir {self.output_dir} already holds checkpoint {existing.name}; "
                              "pass resume=true to continue it, or choose another output_dir")
        self._begin()

    def _trainable(self) -> list[str]:
        return [name for name, p in self.model.backbone.named_parameters() if p.requires_grad]

    def resume(self, validate: Callable[[dict], None] | None = None, may_change: tuple[str, ...] = ()) -> dict | None:
        """Restore the latest complete checkpoint; returns its trainer state (None: fresh run).

        ``validate(state)`` runs before anything is restored or rewritten: the recipe's own
        checks and restores (e.g. the data sampler, which refuses other data).  ``may_change``:
        config keys the recipe checks itself, on top of ``RESUME_MAY_CHANGE``."""
        self._claim_output_dir()
        found = self._newest_complete_checkpoint()
        if found is None:  # nothing to resume: a fresh run
            self._begin()
            return None
        path, state, skipped = found
        step = int(state["step"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.size:
            raise ConfigError(f"resume: checkpoint {path.name} was written by {saved_world} rank(s), this run has "
                              f"{self.world.size}; a sharded checkpoint resumes on as many ranks as wrote it "
                              f"(nproc_per_node x nnodes = {saved_world})")
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
        if self.trained and not self.sharded and not all(n in state.get("optimizers", {}) for n in self.trained):
            raise ConfigError(f"resume: checkpoint {path.name} has no optimizer state for "
                              f"{', '.join(self.trained)} (made by an older tracerl?); start a new output_dir")
        for name in self._folder_models():
            if not self.sharded and not self._folder(name, step).is_dir():
                raise ConfigError(f"resume: {name} model of step {step} missing ({self._folder(name, step)})")
        if validate is not None:
            validate(state)
        if self.sharded:
            ckpt.load_sharded_checkpoint(path, self._sharded_modules())
        elif lora.is_lora(self.model):
            lora.load_adapter_weights(self.model, path / "adapter")
        else:
            _load_weights(self.model, path)
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
            for name, trained in self.trained.items():
                trained.load(self._folder(name, step))
                trained.optimizer.load_state_dict(state["optimizers"][name])
            for name in self.tracking:
                _load_weights(self.frozen[name], self._folder(name, step))
        ckpt.set_rng_state(state["rng_per_rank"][self.world.rank] if "rng_per_rank" in state else state["rng"])
        self.step = step
        self.metrics.truncate_after(self.step)
        self.world.barrier()
        self.last_checkpoint = path
        for broken, problem in skipped:  # out of the listing (keep_last would count it), kept to inspect
            kept = ckpt.set_aside(broken)
            log.warning("resume: checkpoint %s is incomplete (%s); continuing from %s (the incomplete one is "
                        "kept as %s)", broken.name, problem, path.name, kept.name)
        self._t_last = time.perf_counter()
        return state

    def _newest_complete_checkpoint(self) -> tuple[Path, dict, list[tuple[Path, str]]] | None:
        """(the newest checkpoint whose files are whole and read, its trainer state, the newer
        ones skipped with the reason); None when there is no checkpoint at all.  A run killed by
        a crash after the rename, a full disk or a copy cut short can leave a truncated file in
        the newest folder; the previous checkpoint is then the one to continue from."""
        checkpoints = ckpt.list_checkpoints(self.output_dir)
        skipped: list[tuple[Path, str]] = []
        for path in reversed(checkpoints):
            step = ckpt.step_of(path)
            problem = ckpt.checkpoint_problem(path)
            for name in self._folder_models():  # a missing folder is a config question: resume() names it
                folder = self._folder(name, step)
                if problem is None and folder.is_dir() and (bad := ckpt.checkpoint_problem(folder)):
                    problem = f"{folder.name}/{bad}"
            if problem is None:
                try:
                    state = ckpt.load_trainer_state(path)
                except Exception as e:  # torch reports a cut zip archive as a RuntimeError
                    problem = f"trainer_state.pt does not load ({brief(e)})"
            if problem is None:
                return path, state, skipped
            skipped.append((path, problem))
        if not checkpoints:
            return None
        raise CheckpointError(f"resume: no complete checkpoint in {ckpt.checkpoints_dir(self.output_dir)} "
                              f"({'; '.join(f'{p.name}: {why}' for p, why in skipped)}); start a new output_dir")

    # -- stepping -------------------------------------------------------------------------
    def update(self, loss_value: float, model: str = "policy") -> dict:
        """One optimizer step of ``model`` (its gradients are in ``.grad``), at this step's LR."""
        trained = self.trained.get(model)
        if trained is not None and trained.replicated and self.world.distributed:
            for param in trained.optimizer.params:  # each rank's share of the batch -> the batch's
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.copy_(self.world.sum_tensor(param.grad))
        try:
            return self._optimizer(model).step(self.step, loss_value)
        except TrainingDiverged as e:
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise TrainingDiverged(f"{e}; last good checkpoint: {last}") from None

    def advance(self) -> int:
        """End the current training step."""
        self.step += 1
        return self.step

    def should_save(self) -> bool:
        return self.step == self.max_steps or (self.save_every > 0 and self.step % self.save_every == 0)

    def _sharded_modules(self) -> dict:
        return {"policy": (self.model, self.optimizer.adamw),
                **{name: (t.module, t.optimizer.adamw) for name, t in self.trained.items()},
                **{name: (self.frozen[name], None) for name in self.tracking}}

    def _folder_models(self) -> list[str]:
        """The models besides the policy that one-rank checkpoints keep in ``NAME-N`` folders."""
        return [*self.trained, *self.tracking]

    def _save_sharded(self, extra_state: dict) -> Path:
        for module, _ in self._sharded_modules().values():
            reshard(module)
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p.to_local()).all()]
        if self.world.any(bool(bad)):  # never persist a broken model; every rank takes this branch
            raise TrainingDiverged(f"non-finite weights{' in ' + bad[0] if bad else ''} at step {self.step}; "
                                   f"checkpoint not written; last good checkpoint: {self.last_checkpoint or 'none'}")
        state = {"lora": lora.is_lora(self.model), "trainable": self._trainable(), "run_config": self.run_config,
                 **extra_state}
        full = ckpt.full_model_state(self.model)  # every rank takes part; rank 0 gets the weights
        prefix = "backbone."

        def write_main(folder: Path) -> None:  # an HF folder of the whole model, as one rank writes it
            if lora.is_lora(self.model):  # merged weights + adapter, from an fp32 CPU copy of the policy
                export = lora.lora_copy(self.inference).to("cpu", torch.float32)
                export.load_state_dict(full)
                ckpt.write_model_files(export, folder)
                return
            self.model.write_files(folder, {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})

        return ckpt.save_sharded_checkpoint(self.output_dir, self.step, self.world, self._sharded_modules(), state,
                                            write_main, keep_last=self.loop.keep_last)

    def save(self, extra_state: dict) -> Path:
        if self.sharded:
            self.last_checkpoint = self._save_sharded(extra_state)
            return self.last_checkpoint
        state = {"optimizer": self.optimizer.state_dict(), "lora": lora.is_lora(self.model),
                 "trainable": self._trainable(), "run_config": self.run_config,
                 "optimizers": {name: t.optimizer.state_dict() for name, t in self.trained.items()},
                 **extra_state}
        try:
            for name in self._folder_models():
                folder = self._folder(name, self.step)
                with ckpt.writing(folder):
                    if name in self.trained:
                        self.trained[name].save(folder)
                    else:
                        self.frozen[name].save_pretrained(folder)
                    ckpt.write_manifest(folder)
            path = ckpt.save_checkpoint(self.output_dir, self.step, self.model, state,
                                        keep_last=self.loop.keep_last)
        except (TrainingDiverged, OutputError) as e:  # the step is not saved; say what is
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise type(e)(f"{e}; last good checkpoint: {last}") from None
        self.last_checkpoint = path
        self._prune_trained_folders()
        return path

    def _prune_trained_folders(self) -> None:
        kept = {p.name.split("-")[1] for p in ckpt.list_checkpoints(self.output_dir)}
        for name in self._folder_models():
            for folder in ckpt.checkpoints_dir(self.output_dir).glob(f"{name}-*"):
                if folder.name.split("-")[1] not in kept:
                    shutil.rmtree(folder, ignore_errors=True)

    def log(self, row: dict) -> dict:
        now = time.perf_counter()
        row = {"step": self.step, **row, "seconds": now - self._t_last}
        self._t_last = now
        self.metrics.log(row)
        return row

    def close(self) -> None:
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
