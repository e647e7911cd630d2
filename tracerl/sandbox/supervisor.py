"""J's handle on one sandbox (:class:`_Sandbox`), and the intermediary C that creates it."""

from __future__ import annotations

import json
import os
import signal
import time

from .bootstrap import _harness_payload
from .cgroups import MemoryCgroup
from .isolation import _kill_uid, _make_private_workdir, _sandbox_exec, _sandbox_uid
from .procs import _reap_all
from .protocol import _Eof, _Protocol, _Timeout, _TooBig, _recv, _recv_raw, _send
from .syscalls import (
    _CLONE_NEWIPC,
    _CLONE_NEWNET,
    _CLONE_NEWNS,
    _CLONE_NEWPID,
    _CLONE_NEWUSER,
    _CLONE_NEWUTS,
    _PR_SET_DUMPABLE,
    _PR_SET_PDEATHSIG,
    _prctl,
    _unshare,
    _write_file,
)


# =============================================================================================
# Launching one sandbox (runs in J).
# =============================================================================================


class _InfraError(Exception):
    """The sandbox machinery itself failed (not the program's fault)."""


class _Sandbox:
    """One running sandbox, seen from J: a request/answer channel with deadlines."""

    def __init__(self, spec):
        self.spec = spec
        self.dead = False
        self.exit_detail = None
        self.protections = {}
        self.pid_u = None
        self.workdir = None
        self.oom_killed = False  # the memory cgroup killed a process of the program
        limits = spec["limits"]
        root = os.geteuid() == 0
        self.uid = _sandbox_uid() if root else None
        if spec["isolation"] == "none":
            self.workdir = _make_private_workdir(self.uid)
        self.cgroup, cgroup_errors = MemoryCgroup.create(int(limits["memory_mb"]) << 20)
        judge_pid = os.getpid()
        try:
            to_r, to_w = os.pipe()
            fr_r, fr_w = os.pipe()
            info_r, info_w = os.pipe()
            pid_c = os.fork()
        except OSError as exc:
            if self.cgroup is not None:
                self.cgroup.remove()
            raise _InfraError(f"cannot start a sandbox: {exc}") from None
        if pid_c == 0:  # C
            code = 127
            try:
                os.close(to_w)
                os.close(fr_r)
                os.close(info_r)
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)  # J's result pipe to P must not stay open in C
                os.close(null)
                _intermediary(spec, judge_pid, to_r, fr_w, info_w, self.uid, self.workdir)
            except BaseException:  # noqa: BLE001
                try:
                    import traceback

                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(to_r)
        os.close(fr_w)
        os.close(info_w)
        self.pid_c = pid_c
        self.to_w = to_w
        self.fr_r = fr_r
        os.set_blocking(to_w, False)
        deadline = time.monotonic() + limits["startup_timeout"]
        try:
            info = json.loads(_recv_raw(info_r, deadline, cap=1 << 20))
            os.close(info_r)
            self.pid_u = int(info["pid"])
            self.protections.update(info["report"])
            self._enter_cgroup(cgroup_errors)
            boot = _recv(fr_r, deadline, cap=1 << 20)
            if boot.get("t") != "boot":
                raise _Protocol(f"{boot.get('error', boot)}")
            report = dict(boot.get("report", {}))
            # One list of what fell short: C's (namespaces), J's (cgroup) and S's (mounts...).
            errors = self.protections.get("errors", []) + list(report.pop("errors", []))
            self.protections.update(report, errors=errors)
            _send(to_w, _harness_payload(), deadline)
            _send(to_w, {"t": "init", "mode": spec["mode"], "program": spec["program"],
                         "limits": limits, "python_path": spec["view"]["python_path"]}, deadline)
            started = _recv(fr_r, deadline, cap=1 << 20)
            if started.get("t") != "started":
                raise _Protocol(f"{started.get('error', started)}")
        except (_Timeout, _Eof, _TooBig, _Protocol, OSError, ValueError, KeyError) as exc:
            self.kill()
            raise _InfraError(f"sandbox failed to start ({type(exc).__name__}: {exc})") from None

    def _enter_cgroup(self, errors):
        """Move S into the memory cgroup while it sets itself up (a move takes milliseconds;
        done here it overlaps S's start).  The program arrives only after it, so everything
        the program and its children allocate is charged there."""
        self.protections.update(memory_cgroup=False, memory_scope="per-process")
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.pid_u)
                self.protections.update(memory_cgroup=f"v{self.cgroup.version}",
                                        memory_scope="all-processes")
            except OSError as exc:
                errors.append(f"memory cgroup: {exc.strerror}")
                self.cgroup.remove()
                self.cgroup = None
        self.protections["errors"] = errors + self.protections.get("errors", [])

    def memory_exceeded(self):
        """True once after the kernel killed one of the program's processes for exceeding the
        memory limit (its cgroup's); False where there is no cgroup."""
        if self.cgroup is not None and self.cgroup.new_oom_kill():
            self.oom_killed = True
        hit, self.oom_killed = self.oom_killed, False
        return hit

    # -- channel ----------------------------------------------------------------------------
    def send(self, obj, deadline):
        try:
            _send(self.to_w, obj, deadline)
        except _Eof:
            self._died()
            raise

    def recv(self, deadline, cap):
        try:
            return _recv(self.fr_r, deadline, cap)
        except _Eof:
            self._died()
            raise

    def _died(self):
        """S closed its channel: collect why (C exits with S's status)."""
        self.dead = True
        detail = self._reap(wait=0.5)
        self.exit_detail = None if detail == "gone" else detail
        self.kill()

    def _reap(self, wait):
        end = time.monotonic() + wait
        while True:
            if not self.pid_c:
                return "gone"
            try:
                pid, status = os.waitpid(self.pid_c, os.WNOHANG)
            except ChildProcessError:
                self.pid_c = None
                return "gone"
            if pid:
                self.pid_c = None
                code = os.waitstatus_to_exitcode(status)
                if code == 200:
                    return "exited (status 0)"
                if code >= 128:
                    try:
                        return f"killed by {signal.Signals(code - 128).name}"
                    except ValueError:
                        return f"exit status {code}"
                return f"exited (status {code})"
            if time.monotonic() >= end:
                return None
            time.sleep(0.005)

    def kill(self):
        """Kill S and everything it started; reap C."""
        self.dead = True
        if self.pid_u:
            for fn in (lambda: os.kill(self.pid_u, signal.SIGKILL),
                       lambda: os.killpg(self.pid_u, signal.SIGKILL)):
                try:
                    fn()
                except OSError:
                    pass
            if not self.protections.get("pid_namespace"):
                if self.uid is not None and self.protections.get("uid_switch"):
                    _kill_uid(self.uid)
                # Until the group is empty: members still exiting become orphans of J (a
                # child subreaper) and are reaped here instead of lingering as zombies.
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    _reap_all()
                    try:
                        os.killpg(self.pid_u, signal.SIGKILL)
                    except OSError:
                        break
                    time.sleep(0.005)
        if self.pid_c:
            # C exits by itself once it has reaped S (with a pid namespace: once every process
            # in it is gone); only a C that hangs is killed.
            if self._reap(wait=2.0) is None and self.pid_c:
                try:
                    os.kill(self.pid_c, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.waitpid(self.pid_c, 0)
                except ChildProcessError:
                    pass
            self.pid_c = None
        _reap_all()  # orphans re-parented to J (a child subreaper)
        for fd in ("to_w", "fr_r"):
            f = getattr(self, fd, None)
            if f is not None:
                try:
                    os.close(f)
                except OSError:
                    pass
                setattr(self, fd, None)
        if self.cgroup is not None:
            self.oom_killed = self.oom_killed or self.cgroup.new_oom_kill()
            self.cgroup.remove()
            self.cgroup = None
        if self.workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _intermediary(spec, judge_pid, to_r, fr_w, info_w, uid, workdir):
    """C: create namespaces, fork S, report S's pid, wait for S, exit with its status."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != judge_pid:
        os._exit(1)
    report = {"pid_namespace": False, "mount_namespace": False, "network_namespace": False,
              "ipc_namespace": False, "uts_namespace": False, "user_namespace": False,
              "isolation": spec["isolation"], "errors": []}
    rest = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    ns_mode = "none"
    if spec["isolation"] == "auto":
        attempts = []
        if os.geteuid() == 0:
            attempts.append(("root", rest))
        else:
            attempts.append(("user", _CLONE_NEWUSER | rest))
        for mode, flags in attempts:
            try:
                _unshare(flags)
                ns_mode = mode
                break
            except OSError as exc:
                report["errors"].append(f"unshare ({mode}): {exc.strerror}")
        if ns_mode == "user":
            # C inherits J's non-dumpable flag, which makes /proc/self/*_map root's files: C
            # becomes dumpable only while it writes its maps (S, in the new pid namespace,
            # cannot see C at all).
            try:
                _prctl(_PR_SET_DUMPABLE, 1)
                uid_, gid_ = os.getuid(), os.getgid()
                _write_file("/proc/self/setgroups", "deny")
                _write_file("/proc/self/uid_map", f"{uid_} {uid_} 1")
                _write_file("/proc/self/gid_map", f"{gid_} {gid_} 1")
            except OSError as exc:
                report["errors"].append(f"user namespace id maps: {exc}")
            finally:
                try:
                    _prctl(_PR_SET_DUMPABLE, 0)
                except OSError:
                    pass
        if ns_mode != "none":
            report.update(pid_namespace=True, mount_namespace=True, network_namespace=True,
                          ipc_namespace=True, uts_namespace=True,
                          user_namespace=(ns_mode == "user"))
    report["namespace_mode"] = ns_mode
    pid_u = os.fork()
    if pid_u == 0:  # S (pid 1 of the new pid namespace, when there is one)
        try:
            os.close(info_w)
            _sandbox_exec(spec, to_r, fr_w, ns_mode, uid, workdir)
        except BaseException as exc:  # noqa: BLE001
            try:
                _send(fr_w, {"t": "fatal", "error": f"{type(exc).__name__}: {exc}"})
            except BaseException:  # noqa: BLE001
                pass
        os._exit(71)
    os.close(to_r)
    os.close(fr_w)
    _send(info_w, json.dumps({"pid": pid_u, "report": report}).encode())
    os.close(info_w)
    while True:
        try:
            _, status = os.waitpid(pid_u, 0)
            break
        except ChildProcessError:
            os._exit(200)
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 + (-code) if code < 0 else (200 if code == 0 else min(code, 127)))
