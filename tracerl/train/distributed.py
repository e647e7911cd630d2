"""Ranks: torchrun's environment -> one process group and one device per rank; FSDP2 sharding of
trained models; the handful of collectives the trainers use.

One process per device, started by ``torchrun`` (single node, or several nodes through its
rendezvous).  Without torchrun's environment a run is one process (world size 1, no process
group) and nothing here changes what it computes.  A process that is visibly one of several
(``WORLD_SIZE`` > 1, or an MPI/Slurm launcher's task count > 1) but lacks the variables torchrun
sets is refused: two copies training side by side into one folder is never what was meant.

Sharding is FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per transformer layer (the
classes transformers lists in ``_no_split_modules``), then the whole model (embeddings, final
norm, head) as the root unit.  The objectives call ``hidden_states`` and ``lm_logits`` rather
than ``forward``, so both are registered as forward methods of the root; otherwise the root's
parameters would never be gathered.  Gradients are *summed* over ranks
(``set_gradient_divide_factor(1)``): every loss is already divided by the token count of the
whole optimizer batch across ranks, so N ranks x accumulation A sums exactly the terms that
1 rank x accumulation N*A sums.  On GPU, FSDP2's mixed precision computes in bf16 and reduces
gradients in fp32; on CPU (gloo) everything stays fp32, which is how the tests check exactness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from tracerl.errors import ConfigError, TracerlError

BACKENDS = ("auto", "gloo", "nccl")
# Variables torchrun sets in every worker (torch.distributed.run).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Other launchers' "I am one of N tasks" variables: such a process without torchrun's variables is
# one of several independent copies.
LAUNCHER_TASK_COUNTS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


class RankFailure(TracerlError):
    """A collective did not complete: another rank died, hung or left."""


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    # A collective waiting longer than this fails the run (a rank hangs; a rank that dies is seen at
    # once).  Long: ranks wait in one while rank 0 evaluates.
    timeout_s: float = 1800.0
    cpu_offload: bool = False  # FSDP2: keep the sharded weights, gradients and optimizer state in CPU memory
    reshard_after_forward: bool = True  # FSDP2: free each layer's gathered weights after its forward (ZeRO-3)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"distributed.backend: {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if not self.timeout_s > 0:
            raise ConfigError(f"distributed.timeout_s: must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- collectives (no-ops in a single process) --------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            _collective("barrier", torch.distributed.barrier)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        _collective("all_reduce", torch.distributed.all_reduce, t)
        return t.cpu().tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (a CPU tensor; e.g. per-target values each rank filled in part)."""
        if not self.distributed:
            return t
        out = t.to(_comm_device()).contiguous()
        _collective("all_reduce", torch.distributed.all_reduce, out)
        return out.to(t.device)

    def broadcast_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` overwritten in place with rank 0's values (a tensor on this rank's device)."""
        if self.distributed:
            _collective("broadcast", torch.distributed.broadcast, t.data, 0)
        return t

    def max(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
        _collective("all_reduce", torch.distributed.all_reduce, t, torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def share(self, items: list) -> list:
        """This rank's part of ``items``: the r-th of ``size`` consecutive, near-equal runs."""
        if not self.distributed:
            return list(items)
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks take one branch)."""
        return bool(self.sum([float(flag)])[0]) if self.distributed else bool(flag)

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        _collective("all_gather_object", torch.distributed.all_gather_object, out, obj)
        return out


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _collective(name: str, fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        me, lost = torch.distributed.get_rank(), _lost_ranks()
        who = (f"rank {', '.join(map(str, lost))} died or stopped responding" if lost
               else "another rank died or stopped responding (torchrun's report names it)")
        text = " ".join(str(e).split())[:200]
        raise RankFailure(f"rank {me}: {name} across ranks failed: {who} ({text})") from None


def _lost_ranks(wait_s: float = 1.0) -> list[int]:
    """The ranks that do not answer after a failed collective ([] when unknown).  Survivors mark
    themselves in torchrun's store (hosted by its agent, so it outlives a worker) and wait
    briefly for the others: short, so that torchrun's own shutdown does not cut the report."""
    try:
        me, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if size == 2:
            return [1 - me]
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"tracerl/answering/{me}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            answering = {r for r in range(size) if store.check([f"tracerl/answering/{r}"])}
            if len(answering) == size or time.monotonic() > deadline:
                return sorted(set(range(size)) - answering)
            time.sleep(0.1)
    except Exception:  # the store is gone too: say what we know
        return []


def launch_environment() -> dict[str, str]:
    """Torchrun's variables of this process ({} when it was not started by torchrun); a process
    that looks like one of several copies started otherwise is refused (module docstring)."""
    present = {k: os.environ[k] for k in TORCHRUN_VARIABLES if k in os.environ}
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if present and world > 1 and len(present) < len(TORCHRUN_VARIABLES):
        missing = [k for k in TORCHRUN_VARIABLES if k not in present]
        raise ConfigError(f"launch: WORLD_SIZE={world} but {', '.join(missing)} not set; start the ranks with "
                          "torchrun (e.g. torchrun --nproc_per_node N -m tracerl sft ...)")
    if "RANK" not in present:
        for var in LAUNCHER_TASK_COUNTS:
            if int(os.environ.get(var, "1") or 1) > 1:
                raise ConfigError(f"launch: this process is one of {os.environ[var]} tasks ({var}) but has no "
                                  "torchrun environment (RANK, WORLD_SIZE, ...): each task would train alone; "
                                  "run one torchrun per node instead (README, Scaling)")
        return {}
    return present


def rank_device(device: str, world: World) -> str:
    """The device of this rank: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    if not world.distributed:
        return device
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"device: {device!r} under torchrun; give 'cuda' (each rank takes cuda:LOCAL_RANK)")
        return f"cuda:{world.local_rank}"
    if dev.type != "cpu":
        raise ConfigError(f"device: {device!r}: several ranks run on cuda or cpu devices")
    return device


def start(config: DistributedConfig, device: str) -> World:
    """Join the process group when started by torchrun; otherwise a world of one process."""
    env = launch_environment()
    if not env or int(env["WORLD_SIZE"]) == 1:
        return World()
    world = World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]))
    dev = torch.device(rank_device(device, world))
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and (dev.type != "cuda" or not torch.cuda.is_available()):
        raise ConfigError(f"distributed.backend: nccl needs CUDA devices; this run's device is {device} "
                          f"(use gloo, or auto)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return world


def master_dtype(world: World, device: str) -> str | None:
    """The dtype to load a model in that several ranks train: float32 on GPU (the shards are the
    fp32 master weights; FSDP2 gathers them in bf16 for compute), else the loader's default."""
    return "float32" if world.distributed and torch.device(device).type == "cuda" else None


def stop(world: World) -> None:
    """Leave the process group (every rank, at the end of a run)."""
    if world.distributed and torch.distributed.is_initialized():
        try:
            world.barrier()
        finally:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def ranks(config: DistributedConfig, device: str):
    """``start`` on entry, ``stop`` on exit (also after an error): the frame of a training run."""
    world = start(config, device)
    try:
        yield world
    finally:
        stop(world)


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(world: World, config: dict, changes) -> None:
    """Refuse a rank whose config differs from rank 0's (``changes(rank0, mine)`` names the keys)."""
    if not world.distributed:
        return
    configs = world.gather(config)
    for rank, other in enumerate(configs[1:], start=1):
        if config_digest(other) != config_digest(configs[0]):
            diff = changes(configs[0], other)
            raise ConfigError(f"launch: rank {rank}'s config differs from rank 0's in {'; '.join(diff[:5])}; "
                              "give every rank the same config and overrides")


def rank_seed(seed: int, world: World) -> int:
    """The seed of this rank's global RNGs (dropout): the run's seed on rank 0."""
    return seed if world.rank == 0 else (seed * 1_000_003 + world.rank * 7_919) % 2**63


# -- FSDP2 ------------------------------------------------------------------------------------
def layer_classes(module: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(module: nn.Module, world: World, config: DistributedConfig, *, bf16: bool,
          forward_methods: tuple[str, ...] = ()) -> nn.Module:
    """FSDP2 over ``module`` (in place): a unit per transformer layer, the rest as the root.

    Rank 0's weights are broadcast first, so every rank starts from the same model whatever
    its own initialisation drew."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            _collective("broadcast", torch.distributed.broadcast, tensor.data, 0)
    options = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
        else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy(),
    )
    classes = layer_classes(module)
    layers = [m for m in module.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(f"distributed: found no transformer layers to shard in {type(module).__name__}")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=config.reshard_after_forward, **options)
    fully_shard(module, **options)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    for unit in [*layers, module]:
        unit.set_gradient_divide_factor(1.0)  # a sum: the losses carry the global normaliser
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-scaled sum)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> nn.Module:
    """Put every FSDP2 unit of ``module`` back to its shards.  A forward without a backward (a
    frozen model's, under no_grad) leaves the root unit's weights gathered (FSDP2 keeps the
    root's until the backward that normally follows); weight arithmetic on the shards and
    checkpoints need them sharded."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return module


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local piece of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a plain tensor as it is): e.g. the global gradient norm."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
