"""One memory cgroup per sandbox: a single limit for all of a program's processes and pages.

``RLIMIT_AS`` binds one process's address space, so a program could hold ``max_processes`` x
``memory_mb``, and pages of a memfd or a tmpfs file are outside it altogether.  A memory cgroup
counts everything the program's processes charge: their anonymous memory, and the shmem pages
of memfds, ``/tmp`` and ``/dev/shm``.  J creates one per sandbox, under its own cgroup (the
unified hierarchy, v2, or the v1 ``memory`` controller, whichever is writable), moves S into
it before S receives the program, and removes it when the sandbox ends.  Where neither is available (no
write access, no controller), the report says ``memory_scope: "per-process"``: the limits are
then RLIMIT_AS per process, RLIMIT_NPROC on the number of processes, RLIMIT_FSIZE on every
file and memfd, and the tmpfs sizes.

Exceeding the cgroup's limit makes the kernel kill a process of the program (the OOM killer);
J reads the cgroup's OOM-kill count to report that as ``memory``, not as a crash.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

from .syscalls import _write_file

_PREFIX = "tracerl-sandbox-"
_COUNTER = itertools.count()


def _mountinfo():
    """(mount root, mount point, fs type, super options) for every mount."""
    out = []
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if len(fields) >= 5 and len(rfields) >= 3:
                    out.append((fields[3], fields[4].replace("\\040", " "), rfields[0],
                                rfields[2].split(",")))
    except OSError:
        pass
    return out


def _own_dirs():
    """Candidate parent directories for a new memory cgroup: [(version, directory)]."""
    try:
        with open("/proc/self/cgroup") as fh:
            entries = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return []
    mounts = _mountinfo()
    found = []
    for hid, controllers, path in (e for e in entries if len(e) == 3):
        if hid == "0" and controllers == "":
            version, match = 2, lambda fs, opts: fs == "cgroup2"
        elif "memory" in controllers.split(","):
            version, match = 1, lambda fs, opts: fs == "cgroup" and "memory" in opts
        else:
            continue
        for root, point, fs, opts in mounts:
            if match(fs, opts) and (path == root or path.startswith(root.rstrip("/") + "/")):
                rel = path[len(root.rstrip("/")):] if root != "/" else path
                found.append((version, point.rstrip("/") + rel))
                break
    # v2 first where its memory controller is available (a hybrid host may have it in v1 only);
    # v1's memory controller otherwise.
    usable = [(v, d) for v, d in found if v == 1 or "memory" in _controllers(d)]
    return sorted(usable, key=lambda vd: -vd[0])


def _controllers(directory):
    try:
        return _read(os.path.join(directory, "cgroup.controllers")).split()
    except OSError:
        return []


def _read(path):
    with open(path) as fh:
        return fh.read()


def _sweep_stale(parent):
    """Remove empty cgroups left by judges that were killed (their pid is in the name)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        try:
            pid = int(name[len(_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass


class MemoryCgroup:
    """A memory cgroup with a hard limit, for one sandbox."""

    def __init__(self, version, path):
        self.version = version
        self.path = path
        self._oom_seen = 0

    @classmethod
    def create(cls, limit_bytes):
        """A new cgroup limited to ``limit_bytes`` (swap included), or None where none can be
        made; ``errors`` collects why not (for the report)."""
        errors = []
        for version, parent in _own_dirs():
            path = os.path.join(parent, f"{_PREFIX}{os.getpid()}-{next(_COUNTER)}")
            try:
                _sweep_stale(parent)
                os.mkdir(path)
            except OSError as exc:
                errors.append(f"cgroup v{version} {parent}: {exc.strerror}")
                continue
            group = cls(version, path)
            try:
                group._limit(parent, limit_bytes)
                return group, errors
            except OSError as exc:
                errors.append(f"cgroup v{version} memory limit: {exc.strerror or exc}")
                group.remove()
        return None, errors

    def _limit(self, parent, limit_bytes):
        if self.version == 2:
            if not os.path.exists(os.path.join(self.path, "memory.max")):
                # Enable the controller for children (refused where the parent has processes).
                _write_file(os.path.join(parent, "cgroup.subtree_control"), "+memory")
            _write_file(os.path.join(self.path, "memory.max"), str(limit_bytes))
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                _write_file(os.path.join(self.path, "memory.swap.max"), "0")
        else:
            _write_file(os.path.join(self.path, "memory.limit_in_bytes"), str(limit_bytes))
            memsw = os.path.join(self.path, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # swap accounting: memory + swap, the same limit
                _write_file(memsw, str(limit_bytes))

    def add(self, pid):
        """Move process ``pid`` (and so everything it forks later) into the cgroup."""
        _write_file(os.path.join(self.path, "cgroup.procs"), str(pid))

    def oom_kills(self):
        """How many of the program's processes the kernel killed for exceeding the limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in _read(os.path.join(self.path, name)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            if self.version == 1:  # kernels without oom_kill in oom_control
                return int(_read(os.path.join(self.path, "memory.failcnt")).strip() != "0")
        except (OSError, ValueError):
            pass
        return 0

    def new_oom_kill(self):
        """True once for each OOM kill since the last call."""
        n = self.oom_kills()
        seen, self._oom_seen = self._oom_seen, n
        return n > seen

    def remove(self):
        """Kill whatever is left in the cgroup and remove it."""
        for _ in range(200):
            try:
                pids = [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
            except (OSError, ValueError):
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
