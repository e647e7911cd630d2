"""Run metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard events where
installed, optional Weights & Biases (offline mode works without network).

The TensorBoard writer (and the W&B run) are opened on the first ``log``, not when the logger is
made, so a run that fails its checks (e.g. a fresh run into an ``output_dir`` that holds
checkpoints) leaves no event file behind in somebody else's run.  After a resume, TensorBoard is
told to purge the events of the steps that are being redone (``purge_step``), the counterpart of
``truncate_after`` for ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tracerl.errors import OutputError
from tracerl.files import write_text


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "tracerl", run_config: dict | None = None, enabled: bool = True) -> None:
        self.enabled = enabled  # False on ranks other than 0: one writer per run
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.wandb = wandb
        self.wandb_project = wandb_project
        self.run_config = run_config
        self._opened = False
        self._purge_step: int | None = None
        self._tb = None
        self._wandb = None

    def _open(self) -> None:
        self._opened = True
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = None  # tensorboard not installed: metrics.jsonl only
            else:
                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=self._purge_step)
        if self.wandb:
            import wandb as wandb_lib  # an explicit request: fail loudly if it is missing

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb_lib.init(project=self.wandb_project, dir=str(self.dir),
                                         config=self.run_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (rows of a run killed after its last checkpoint).

        A run killed during a write can leave a half-written last line; it is dropped too.
        """
        self._purge_step = step + 1 if step > 0 else None
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write of a killed run
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        write_text(self.path, "".join(line + "\n" for line in kept))

    def last_logged(self, prefix: str) -> dict:
        """``{key less prefix: value}`` of the last row holding ``prefix*`` keys ({} if none): after a
        resume, e.g. the latest evaluation (``eval_``), which a run resumed at its last step reports
        without evaluating again."""
        rows = read_metrics(self.path) if self.path.exists() else []
        for row in reversed(rows):
            found = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            if found:
                return found
        return {}

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a torn last line is dropped on resume (truncate_after)
            raise OutputError(f"{self.path}: cannot write the metrics row of step {row.get('step')} "
                              f"({e.strerror or e})") from None
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
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
