"""Real write failures for tests: a tiny tmpfs (a full disk: ENOSPC) or a read-only one (EROFS).

Mounting needs root (CI and the development machines run the tests as root); elsewhere the
tests that need it are skipped and say why."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "64k", readonly: bool = False):
    """``path`` (created) with a ``size`` tmpfs on it for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to make a full or read-only disk: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)
