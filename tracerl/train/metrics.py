"""Run metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard events where
installed, optional Weights & Biases (offline mode works without network)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "tracerl", run_config: dict | None = None) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self._tb = None  # tensorboard not installed: metrics.jsonl only
        self._wandb = None
        if wandb:
            import wandb as wandb_lib  # an explicit request: fail loudly if it is missing

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb_lib.init(project=wandb_project, dir=str(self.dir), config=run_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (rows of a run killed after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = row.get("step", 0)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
