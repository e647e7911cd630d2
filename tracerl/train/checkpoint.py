"""Training checkpoints: written atomically, found again on resume.

Layout: ``OUTPUT/checkpoints/step-00000010/`` is an HF model folder (loadable by
``load_model``) plus ``trainer_state.pt`` (optimizer, RNG states, step, data position, ...)
and, with LoRA, the live adapter in ``adapter/`` (a peft folder; the model files then hold the
merged weights, or are left out with ``lora.merge_on_save: false``).  A checkpoint is written
into a temporary sibling folder and renamed into place, so a folder named ``step-*`` is always
complete; a half-written one (a run killed mid-save) keeps its temporary name and is ignored and
removed.  Non-finite weights are never written.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tracerl.models.model import DiffusionLM, atomic_folder
from tracerl.train import lora
from tracerl.train.optim import TrainingDiverged

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    for name, p in model.backbone.named_parameters():
        if not torch.isfinite(p).all():  # never persist a broken model
            raise TrainingDiverged(f"non-finite weights in {name} at step {step}; checkpoint not written")
    path = checkpoints_dir(output_dir) / f"step-{step:08d}"
    with atomic_folder(path) as tmp:
        if lora.is_lora(model):
            if lora.lora_config(model).merge_on_save:
                lora.merged_copy(model).write_files(tmp)  # a plain HF folder: load_model reads it
            else:
                model.tokenizer.save_pretrained(tmp)
            lora.save_adapter(model, tmp / "adapter")  # the live adapter: what resume restores
        else:
            model.write_files(tmp)
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; removes leftovers of interrupted saves."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") and ".tmp-" in child.name:
            shutil.rmtree(child, ignore_errors=True)  # a save killed half-way
            continue
        m = _STEP_DIR.match(child.name)
        if m and (child / "trainer_state.pt").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_trainer_state(path: Path) -> dict:
    # Our own file (optimizer tensors, RNG states, python scalars): not untrusted input.
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
