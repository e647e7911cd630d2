"""Crash a real `tracerl` training process with SIGKILL right after a given checkpoint, for the
exact-resume tests of SFT and RL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from tracerl.train import checkpoint as ckpt


def kill_after_checkpoint(cli_args: list[str], output_dir: Path, step: int, timeout: float = 240) -> None:
    """Run ``python -m tracerl.cli *cli_args`` and SIGKILL it once checkpoint ``step`` is saved and
    step ``step + 1`` is logged (a metrics row the resume must drop).  If the process finishes
    before the poll sees that, the crash is simulated by deleting every later checkpoint."""
    # Same kernels as the caller, whose in-process runs are compared with this one bit for bit:
    # both have called torch.set_num_threads(n) (see the end of this module).  A fresh process
    # given only OMP_NUM_THREADS=n can still differ: once any test has called set_num_threads,
    # the caller's BLAS thread setting is no longer the process default (seen on AVX-512 CPUs).
    n = torch.get_num_threads()
    run_cli = "import sys, torch; torch.set_num_threads(int(sys.argv[1])); from tracerl.cli import main; " \
              "sys.exit(main(sys.argv[2:]))"
    env = {**os.environ, "OMP_NUM_THREADS": str(n)}
    proc = subprocess.Popen([sys.executable, "-c", run_cli, str(n), *cli_args, "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = ckpt.checkpoints_dir(output_dir) / f"step-{step:08d}"
    metrics, logged = output_dir / "metrics.jsonl", f'"step": {step + 1},'
    deadline, was_killed = time.time() + timeout, False
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_dir() and metrics.exists() and logged in metrics.read_text():
            proc.send_signal(signal.SIGKILL)
            was_killed = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if was_killed:
        assert proc.returncode == -signal.SIGKILL
        return
    assert proc.returncode == 0, err[-2000:]
    warnings.warn(f"the {cli_args[0]} subprocess finished before it could be killed; simulating the crash")
    for path in ckpt.checkpoints_dir(output_dir).iterdir():  # policy and value checkpoints alike
        if not path.name.endswith(f"{step:08d}"):
            shutil.rmtree(path)


# The callers' in-process runs get the explicit setting too, whatever ran before them.
torch.set_num_threads(torch.get_num_threads())
