"""Process and file-descriptor helpers shared by J, C and S (shipped to S with the harness)."""

from __future__ import annotations

import os


def _max_fd():
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY and soft < (1 << 20) else 1 << 16
    except Exception:  # noqa: BLE001
        return 1 << 16


def _reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
