"""Training checkpoints: written atomically, found again on resume.

Layout: ``OUTPUT/checkpoints/step-00000010/`` is an HF model folder (loadable by
``load_model``) plus ``trainer_state.pt`` (optimizer, RNG states, step, data position, ...)
and, with LoRA, the live adapter in ``adapter/`` (a peft folder; the model files then hold the
merged weights, or are left out with ``lora.merge_on_save: false``).  A checkpoint is written
into a temporary sibling folder and renamed into place, so a folder named ``step-*`` was written
to the end; a half-written one (a run killed mid-save) keeps its temporary name and is ignored and
removed.  Non-finite weights are never written.

Written last into each folder, ``manifest.json`` lists every file with its size (the files are
flushed to disk first).  A folder whose files do not match it (truncated by a crash after the
rename, a full disk, a copy cut short), or whose safetensors or trainer state do not read, is
not a complete checkpoint: resume skips it, says why, and takes the newest complete one.
A save that fails (a full disk) is one ``OutputError`` naming the folder; the previous
checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from tracerl.errors import OutputError, brief
from tracerl.models.model import DiffusionLM, atomic_folder
from tracerl.train import lora
from tracerl.train.optim import TrainingDiverged

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"  # {"files": {relative path: size in bytes}}, written last


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (dropout, LoRA dropout, anything not drawing from a step generator),
    so that a fresh run is a function of its config."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model: DiffusionLM, trainer_state: dict,
                    keep_last: int = 0) -> Path:
    bad = model.nonfinite_parameters()
    if bad:  # never persist a broken model
        raise TrainingDiverged(f"non-finite weights in {bad[0]} at step {step}; checkpoint not written")
    path = checkpoints_dir(output_dir) / f"step-{step:08d}"
    with writing(path):
        with atomic_folder(path) as tmp:
            write_model_files(model, tmp)
            # Through a Python file: a full disk then reaches us as an OSError (torch's own writer
            # reports it as "unexpected pos ..." twice over).
            with (tmp / "trainer_state.pt").open("wb") as f:
                torch.save({**trainer_state, "step": step, "rng": rng_state()}, f)
            write_manifest(tmp)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def write_model_files(model: DiffusionLM, folder: Path) -> None:
    """A checkpoint's model files: the HF folder, or for LoRA the merged weights (unless
    ``lora.merge_on_save`` is off) and the live adapter in ``adapter/`` (what resume restores)."""
    if not lora.is_lora(model):
        model.write_files(folder)
        return
    if lora.lora_config(model).merge_on_save:
        lora.merged_copy(model).write_files(folder)  # a plain HF folder: load_model reads it
    else:
        model.tokenizer.save_pretrained(folder)
    lora.save_adapter(model, folder / "adapter")


@contextlib.contextmanager
def writing(folder: Path):
    """Turn a failed write (a full disk, a read-only folder) into one ``OutputError`` naming
    ``folder``; anything else is raised as it is (a bug to see in full)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        reason = _os_reason(e)
        if reason is None:
            raise
        raise OutputError(f"{folder}: cannot write the checkpoint ({reason}); it is not kept, earlier ones "
                          "are untouched") from None


def _os_reason(e: BaseException | None) -> str | None:
    """The operating system's reason behind ``e``, which torch and safetensors wrap: torch as a
    RuntimeError raised while handling the OSError of its file object, safetensors (Rust) as
    "... (os error 28)" in its message."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return os.strerror(int(m.group(1)))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_manifest(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, then record their sizes in ``MANIFEST`` (last)."""
    sizes = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with f.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[f.relative_to(folder).as_posix()] = f.stat().st_size
    with (folder / MANIFEST).open("w") as out:
        json.dump({"files": sizes}, out, indent=1)
        out.flush()
        os.fsync(out.fileno())


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint folder, or None.  Checks the sizes in its
    manifest (folders written before manifests have none: then only the reads below) and that
    every safetensors file reads (its header must match the file's length)."""
    if not folder.is_dir():
        return "missing"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sizes.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written (truncated?)"
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:
            return f"{f.relative_to(folder).as_posix()} does not read ({brief(e)})"
    return None


class OutputLock:
    """An exclusive lock on a run's output folder (``.tracerl.lock``, flock: released by the
    kernel when the holder dies, so a killed run never leaves it stale)."""

    NAME = ".tracerl.lock"

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / self.NAME
        self._file = None

    def acquire(self) -> str | None:
        """None once held; else why not (another live run holds it)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = self.path.open("a+")
        except OSError as e:
            return f"output_dir {self.path.parent}: cannot write there ({e.strerror or e})"
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            return (f"output_dir {self.path.parent} is in use by another run (pid {holder}); wait for it to "
                    "end or choose another output_dir (several ranks: launch with torchrun)")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders, oldest first (``checkpoint_problem`` says whether their files are
    whole); removes leftovers of interrupted saves."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") and ".tmp-" in child.name:
            shutil.rmtree(child, ignore_errors=True)  # a save killed half-way
            continue
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():  # one without its trainer state is listed too: resume says so
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(path: Path) -> dict:
    # Our own file (optimizer tensors, RNG states, python scalars): not untrusted input.
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


def set_aside(path: Path) -> Path:
    """Rename an incomplete checkpoint out of the listing (``step-N.incomplete``), keeping it."""
    target, n = path.with_name(path.name + ".incomplete"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.incomplete-{n}")
    return path.rename(target)


def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


# -- sharded checkpoints (several ranks) -------------------------------------------------------
SHARDS = "shards"  # torch.distributed.checkpoint (DCP) folder inside a checkpoint of a several-rank run


def _dcp_state(modules: dict) -> dict:
    """``{name: {"model": ..., "optimizer": ...}}`` of FSDP2 modules and their optimizers (None:
    weights only), as DCP state dicts (each rank holds its shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    out = {}
    for name, (module, optimizer) in modules.items():
        if optimizer is None:  # a frozen model that changes (RL's synced KL reference): weights only
            out[name] = {"model": get_model_state_dict(module)}
            continue
        model_sd, optim_sd = get_state_dict(module, optimizer)
        out[name] = {"model": model_sd, "optimizer": optim_sd}
    return out


def save_sharded_checkpoint(output_dir: str | Path, step: int, world, modules: dict, trainer_state: dict,
                            write_main: Callable[[Path], None], keep_last: int = 0) -> Path:
    """The checkpoint of a several-rank run, written by every rank: ``shards/`` (DCP: every
    trained module's weights and optimizer state, each rank its shards), and by rank 0
    ``trainer_state.pt`` (with every rank's RNG states) and what ``write_main(folder)`` writes
    (config, tokenizer, HF weights gathered from the shards).  Atomic as ``save_checkpoint``:
    written into a temporary sibling, renamed by rank 0 once every rank has finished."""
    import torch.distributed.checkpoint as dcp

    path = checkpoints_dir(output_dir) / f"step-{step:08d}"
    tmp = path.with_name(f".{path.name}.tmp-sharded")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    problem = None
    try:
        dcp.save(_dcp_state(modules), checkpoint_id=str(tmp / SHARDS))
    except Exception as e:  # a full disk on any rank: every rank stops with the same message
        problem = _os_reason(e) or brief(e)
    rngs = world.gather(rng_state())
    if world.is_main and problem is None:
        try:
            write_main(tmp)
            with (tmp / "trainer_state.pt").open("wb") as f:
                torch.save({**trainer_state, "step": step, "world_size": world.size, "rng": rngs[0],
                            "rng_per_rank": rngs}, f)
            write_manifest(tmp)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
            if keep_last > 0:
                for old in list_checkpoints(output_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        except Exception as e:
            problem = _os_reason(e) or brief(e)
    problems = [p for p in world.gather(problem) if p]
    if problems:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{path}: cannot write the checkpoint ({problems[0]}); it is not kept, earlier ones "
                          "are untouched")
    return path


def load_sharded_checkpoint(path: Path, modules: dict) -> None:
    """Restore ``modules`` (as for ``save_sharded_checkpoint``) from ``path/shards`` in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _dcp_state(modules)
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    for name, (module, optimizer) in modules.items():
        if optimizer is None:
            set_model_state_dict(module, state[name]["model"])
            continue
        set_state_dict(module, optimizer, model_state_dict=state[name]["model"],
                       optim_state_dict=state[name]["optimizer"])


def full_model_state(module) -> dict:
    """The whole (unsharded) state dict of an FSDP2 module on rank 0, on the CPU ({} elsewhere);
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
