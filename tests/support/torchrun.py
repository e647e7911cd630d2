"""Launch real ``torchrun`` processes (gloo, CPU) running the ``tracerl`` command, for the
distributed tests: one node, several simulated nodes, and a rank killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(cli_args: list[str], *, nproc: int = 2, nodes: tuple[int, int] | None = None, port: int | None = None,
            script: Path | None = None) -> list[str]:
    """``torchrun ... -m tracerl CMD --no-progress ARGS`` (or ``torchrun ... SCRIPT ARGS``);
    ``nodes=(nnodes, node_rank)`` with ``port``: one node of a static rendezvous on 127.0.0.1."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes is None:
        launch += ["--standalone"]
    else:
        launch += [f"--nnodes={nodes[0]}", f"--node_rank={nodes[1]}", f"--rdzv-endpoint=127.0.0.1:{port}"]
    if script is not None:
        return [*launch, str(script), *cli_args]
    return [*launch, "-m", "tracerl", cli_args[0], "--no-progress", *cli_args[1:]]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cli_args: list[str], *, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(cli_args, **kw), env=env(), capture_output=True, text=True, timeout=timeout)


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` started by the torchrun process ``launcher_pid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def kill_rank_after(cli_args: list[str], output_dir: Path, *, checkpoint_step: int, rank: int = 1,
                    timeout: float = 240) -> tuple[subprocess.Popen, float, str]:
    """Run a 2-rank launch and SIGKILL ``rank`` once checkpoint ``checkpoint_step`` exists and the
    next step is logged.  Returns (the finished launcher, seconds from the kill to its exit, its
    stderr)."""
    proc = subprocess.Popen(command(cli_args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = output_dir / "checkpoints" / f"step-{checkpoint_step:08d}"
    metrics, logged = output_dir / "metrics.jsonl", f'"step": {checkpoint_step + 1},'
    deadline = time.time() + timeout
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_dir() and metrics.exists() and logged in metrics.read_text():
            pid = worker_pid(proc.pid, rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                break
        time.sleep(0.005)
    if killed_at is None:
        proc.kill()
        raise AssertionError(f"the run ended or timed out before rank {rank} could be killed: "
                             f"{proc.communicate()[1][-2000:]}")
    _, err = proc.communicate(timeout=120)
    return proc, time.monotonic() - killed_at, err
