"""S's confinement, set up between ``fork`` and ``execve``: file system, limits, privileges.

Also the uid helpers J uses around it (a fresh uid per sandbox, killing all of a uid's processes,
a private working directory when there is no mount namespace).
"""

from __future__ import annotations

import math
import os
import random
import signal

from .bootstrap import _BOOTSTRAP
from .procs import _max_fd
from .protocol import _send
from .syscalls import (
    _MS_BIND,
    _MS_NODEV,
    _MS_NOEXEC,
    _MS_NOSUID,
    _MS_PRIVATE,
    _MS_RDONLY,
    _MS_REC,
    _MS_REMOUNT,
    _PR_SET_NO_NEW_PRIVS,
    _PR_SET_PDEATHSIG,
    _mount,
    _mount_setattr_readonly_recursive,
    _prctl,
    _remount_all_readonly,
    _statvfs_flags,
)
from .view import abandon_view, build_view


def _sandbox_uid():
    # A fresh uid per sandbox: RLIMIT_NPROC then counts only this sandbox's processes, and
    # "kill every process of this uid" is exactly "kill this sandbox".
    return 1_500_000_000 + random.SystemRandom().randrange(500_000_000)


def _path_world_accessible(path):
    """True when every directory on the way to ``path`` is world-searchable and ``path`` itself
    world-readable (so a fresh uid can execute the interpreter without a mount namespace)."""
    import stat

    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        p = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(p).st_mode
        except OSError:
            return False
        need = stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
        if not mode & need:
            return False
    return True


def _make_private_workdir(uid):
    import tempfile

    d = tempfile.mkdtemp(prefix="tracerl-sandbox-")
    if uid is not None:
        try:
            os.chown(d, uid, uid)
        except OSError:
            pass
    os.chmod(d, 0o700)
    return d


def _kill_uid(uid):
    """Kill every process of ``uid`` (a uid used by exactly one sandbox) from a helper."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _sandbox_exec(spec, to_r, fr_w, ns_mode, uid, workdir):
    """S before execve: file system, limits, privileges, fds; then exec a fresh interpreter."""
    report = {"errors": []}
    os.setsid()
    # Channel fds to 3 (requests in) and 4 (answers out); 0-2 to /dev/null; close the rest.
    import fcntl

    # Duplicates numbered >= 10 first, so no dup2 below can clobber a source.
    hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(fr_w, fcntl.F_DUPFD, 10)
    null = fcntl.fcntl(os.open("/dev/null", os.O_RDWR), fcntl.F_DUPFD, 10)
    for target, src in ((3, hi_r), (4, hi_w), (0, null), (1, null), (2, null)):
        os.dup2(src, target)
    os.closerange(5, _max_fd())
    try:
        _sandbox_setup_and_exec(spec, ns_mode, uid, workdir, report)
    except BaseException as exc:  # noqa: BLE001 - J reports it as an infrastructure error
        _send(4, {"t": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(71)


def _sandbox_setup_and_exec(spec, ns_mode, uid, workdir, report):
    limits = spec["limits"]
    in_ns = ns_mode != "none"

    # -- file system ----------------------------------------------------------------------------
    if in_ns:
        try:
            report.update(build_view(spec["view"], limits["disk_mb"], limits["disk_mb"]))
        except OSError as exc:  # before pivot_root: fall back to the read-only host (reported)
            report["errors"].append(f"allowlist file system view: {exc}")
            abandon_view()
            _setup_filesystem(spec, report)
            report["filesystem_view"] = "host-readonly"
        cwd = "/tmp"
    else:
        cwd = workdir
        report.update(readonly_filesystem=False, private_tmp=False, private_proc=False,
                      hidden_paths=[], filesystem_view="host")

    # -- resource limits ------------------------------------------------------------------------
    import resource

    mib = 1 << 20
    cpu = int(math.ceil(limits["total_time"])) + 1
    rl = {
        "RLIMIT_AS": limits["memory_mb"] * mib,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits["file_size_mb"] * mib,
        "RLIMIT_NOFILE": limits["open_files"],
        "RLIMIT_CORE": 0,
    }
    root_switch = os.geteuid() == 0 and uid is not None
    if not in_ns and os.geteuid() == 0 and not spec["interpreter_world_readable"]:
        root_switch = False
        report["errors"].append("interpreter not readable by a fresh uid: staying root")
    nproc_binds = False
    if root_switch or (os.geteuid() != 0 and ns_mode == "user"):
        rl["RLIMIT_NPROC"] = limits["max_processes"]
        nproc_binds = True
    elif os.geteuid() != 0:
        # Same uid as the caller, no namespaces: the count includes the caller's own tasks.
        rl["RLIMIT_NPROC"] = _count_user_tasks(os.getuid()) + limits["max_processes"]
        nproc_binds = True
    applied = {}
    for name, value in rl.items():
        res = getattr(resource, name)
        try:
            hard = resource.getrlimit(res)[1]
            v = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (v, v))
            applied[name[7:].lower()] = v
        except (OSError, ValueError) as exc:
            report["errors"].append(f"setrlimit {name}: {exc}")
    report["rlimits"] = applied

    # -- privileges -----------------------------------------------------------------------------
    report["uid_switch"] = False
    if root_switch:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            report["uid_switch"] = True
            report["uid"] = uid
        except OSError as exc:
            report["errors"].append(f"uid switch: {exc}")
            nproc_binds = False
    report["process_limit_enforced"] = nproc_binds
    try:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        report["no_new_privs"] = True
    except OSError:
        report["no_new_privs"] = False
    try:  # after the uid switch: changing credentials clears the parent-death signal
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    report["kill_scope"] = ("pid-namespace" if in_ns else
                            "uid" if report["uid_switch"] else "process-group")
    report["network_isolated"] = in_ns
    report["judge_non_dumpable"] = spec.get("judge_non_dumpable", False)
    os.chdir(cwd)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    _send(4, {"t": "boot", "report": report})
    argv = [spec["interpreter"]] + spec["interpreter_args"] + ["-c", _BOOTSTRAP]
    os.execve(spec["interpreter"], argv, env)


def _count_user_tasks(uid):
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                text = fh.read()
        except OSError:
            continue
        real_uid = threads = None
        for line in text.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            n += threads or 1
    return n


def _setup_filesystem(spec, report):
    """The fallback view (no pivot_root): the host read-only, fresh /proc, hidden directories,
    private writable /tmp."""
    errors = report["errors"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do propagates to the host
    keep = []
    for k in spec["keep_paths"]:
        try:
            keep.append((k, os.open(k, os.O_PATH | os.O_DIRECTORY)))
        except OSError as exc:
            errors.append(f"keep {k}: {exc}")
    ro = False
    try:
        _mount_setattr_readonly_recursive("/")
        ro = True
    except OSError as exc:
        errors.append(f"mount_setattr: {exc}")
        try:
            failed = _remount_all_readonly()
            ro = True
            if failed:
                errors.append(f"could not remount read-only: {failed[:10]}")
        except OSError as exc2:
            errors.append(f"remount read-only: {exc2}")
    report["readonly_filesystem"] = ro
    hidden = []
    tmp_mib = spec["limits"]["disk_mb"]
    targets = sorted(set(spec["hide_paths"]) | {"/tmp"}, key=lambda p: (p.count("/"), p))
    for h in targets:
        if not os.path.isdir(h) or os.path.islink(h):
            continue
        writable = h == "/tmp"
        data = f"size={tmp_mib}m,mode=1777" if writable else "size=1m,mode=755"
        try:
            _mount("tmpfs", h, "tmpfs", _MS_NOSUID | _MS_NODEV, data)
        except OSError as exc:
            errors.append(f"hide {h}: {exc}")
            continue
        for k, fd in keep:
            if k == h or k.startswith(h.rstrip("/") + "/"):
                try:
                    os.makedirs(k, exist_ok=True)
                    _mount(f"/proc/self/fd/{fd}", k, None, _MS_BIND | _MS_REC)
                    _mount(None, k, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
                           | _MS_NODEV | _statvfs_flags(k))
                except OSError as exc:
                    errors.append(f"keep {k}: {exc}")
        if not writable:
            try:
                _mount(None, h, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
                       "size=1m,mode=755")
            except OSError as exc:
                errors.append(f"read-only {h}: {exc}")
        hidden.append(h)
    report["hidden_paths"] = [h for h in hidden if h != "/tmp"]
    report["private_tmp"] = "/tmp" in hidden
    for _, fd in keep:
        os.close(fd)
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        report["private_proc"] = True
    except OSError as exc:
        errors.append(f"mount /proc: {exc}")
        try:  # cannot get a fresh /proc: at least hide the host's
            _mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "size=4k")
            report["private_proc"] = "hidden"
        except OSError as exc2:
            errors.append(f"hide /proc: {exc2}")
            report["private_proc"] = False
